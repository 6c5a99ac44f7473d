"""``cdvm attest``: produce evidence in a TEE, verify evidence anywhere.

    cdvm attest evidence [--provider auto|tsm|qgs|sev-guest|tdx-guest|sim] [--report-data HEX] -o FILE
    cdvm attest verify EVIDENCE [--collateral FILE] [--vcek FILE] [--certs FILE] [--roots DIR]
                       [--policy FILE] [--at ISO8601] [--offline] [--allow-simulated] [--json]

``evidence`` writes the JSON envelope (it carries the SNP certificate table too). ``verify``
reads the envelope or raw quote/report bytes (or their hex), tells the TEE from the bytes,
and exits 0 only when the evidence is authentic *and* the policy accepts it; otherwise each
reason is one line on stderr (and, with ``--json``, the verdict object is on stdout).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from attest.collateral import Collateral, collateral_from_json
from attest.errors import AttestError
from attest.evidence import Evidence, load_evidence
from attest.policy import Policy
from attest.providers import PROVIDER_NAMES, REPORT_DATA_LEN, get_evidence
from attest.verify import verify_evidence_online
from dvm.cli import run_async


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise AttestError(f"cannot read {what} {path}: {error.strerror}") from None


def _report_data(text: str) -> bytes:
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("REPORTDATA must be hex") from None
    if len(data) > REPORT_DATA_LEN:
        raise argparse.ArgumentTypeError(f"REPORTDATA is at most {REPORT_DATA_LEN} bytes, got {len(data)}")
    return data.ljust(REPORT_DATA_LEN, b"\0")


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2025-07-19T10:00:34Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cdvm attest evidence`` and ``cdvm attest verify``."""
    attest = subparsers.add_parser("attest", help="produce or verify TEE attestation evidence")
    commands = attest.add_subparsers(dest="attest_command", metavar="SUBCOMMAND", required=True)

    evidence = commands.add_parser("evidence", help="get a quote/report from this machine's TEE")
    evidence.add_argument("--provider", choices=PROVIDER_NAMES, default="auto",
                          help="where to get evidence (default: auto = tsm, sev-guest, qgs)")
    evidence.add_argument("--report-data", type=_report_data, default=bytes(REPORT_DATA_LEN), metavar="HEX",
                          help="up to 64 bytes to bind into REPORTDATA, zero-padded (default: zeros)")
    evidence.add_argument("--allow-simulated", action="store_true",
                          help="let --provider auto fall back to the simulated TEE (proves nothing)")
    evidence.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the evidence JSON")
    evidence.set_defaults(handler=_evidence)

    verify = commands.add_parser("verify", help="verify evidence and check it against a policy")
    verify.add_argument("evidence", metavar="EVIDENCE", help="evidence JSON, or a raw/hex quote or report")
    verify.add_argument("--collateral", metavar="FILE", help="Intel collateral (QuoteCollateralV3 JSON) for a TDX quote")
    verify.add_argument("--vcek", metavar="FILE", help="the VCEK or VLEK certificate (DER or PEM) for an SNP report")
    verify.add_argument("--certs", metavar="FILE", help="ASK/ARK chain (PEM) or an SNP certificate table")
    verify.add_argument("--roots", metavar="DIR", type=Path,
                        help="directory of CA certificates; self-signed ones count only if pinned")
    verify.add_argument("--policy", metavar="FILE", type=Path, help="policy TOML (default: the built-in policy)")
    verify.add_argument("--at", type=_moment, metavar="ISO8601", help="verify as of this time (default: now)")
    verify.add_argument("--offline", action="store_true", help="fetch nothing; use only files and the cache")
    verify.add_argument("--pccs-url", metavar="URL", help="PCCS to fetch TDX collateral from (default: Intel PCS)")
    verify.add_argument("--allow-simulated", action="store_true",
                        help="accept simulated-TEE evidence (testing only: it proves nothing)")
    verify.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    verify.set_defaults(handler=_verify)


def _evidence(args: argparse.Namespace) -> int:
    evidence = get_evidence(args.report_data, args.provider, allow_sim=args.allow_simulated)
    try:
        Path(args.output).write_text(evidence.to_json() + "\n", encoding="utf-8")
    except OSError as error:
        raise AttestError(f"cannot write {args.output}: {error.strerror}") from None
    print(f"wrote {evidence.tee} evidence from {evidence.provider} to {args.output}", file=sys.stderr)
    if evidence.tee == "sim":
        print("SIMULATED TEE: this evidence proves nothing about confidentiality", file=sys.stderr)
    elif evidence.tee == "tdreport":
        print("a TDREPORT is not remotely verifiable; use --provider tsm or qgs for a quote", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    evidence = load_evidence(_read(args.evidence, "evidence"))
    collateral = collateral_from_json(_read(args.collateral, "collateral")) if args.collateral else None
    policy = Policy.from_toml(args.policy) if args.policy else Policy.default()
    return run_async(_verify_async(args, evidence, collateral, policy))


async def _verify_async(args: argparse.Namespace, evidence: Evidence, collateral: Collateral | None,
                        policy: Policy) -> int:
    verdict = await verify_evidence_online(
        evidence,
        now=args.at or datetime.now(timezone.utc),
        collateral=collateral,
        vcek=_read(args.vcek, "VCEK file") if args.vcek else None,
        cert_chain=_read(args.certs, "certificate file") if args.certs else None,
        roots_dir=args.roots,
        policy=policy,
        allow_simulated=args.allow_simulated,
        offline=args.offline,
        pccs_url=args.pccs_url,
    )
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=1))
    else:
        print("\n".join(verdict.render_lines()))
    if verdict.simulated:
        print("cdvm: SIMULATED TEE evidence: not confidential", file=sys.stderr)
    for reason in verdict.reasons():
        print(f"cdvm: {reason}", file=sys.stderr)
    return 0 if verdict.verified else 1
