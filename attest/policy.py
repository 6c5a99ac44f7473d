"""The validate step: does authentic evidence describe a TEE this user accepts?

A policy is a small TOML file (every key is documented in docs/attestation.md and shown in
docs/policy.example.toml). :meth:`Policy.default` is what cdvm uses without one:

* debug TDs (TDATTRIBUTES bit 0) and debug SNP guests (POLICY bit 19) are refused — the
  host can read their memory;
* TDX guests must set SEPT_VE_DISABLE (TDATTRIBUTES bit 28), as Linux TD guests do, so
  the host cannot inject #VE through secure-EPT violations;
* MRSERVICETD (TDX 1.5) must be zero: no service TD (e.g. a migration TD) is bound to the TD
  unless its measurement is listed;
* the Intel platform TCB status must be UpToDate or SWHardeningNeeded and the QE identity
  status UpToDate; anything else (OutOfDate, ConfigurationNeeded, Revoked, no matching TCB
  level, or no collateral at all) is refused until listed;
* simulated evidence is refused.

Measurement allow-lists are empty by default (any value): a client pins its own image.
:func:`validate` returns the violations as sentences; it never raises for evidence.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from attest.binding import BindingError, check_report_data
from attest.errors import PolicyError
from attest.snp import SnpReport
from attest.tdx import TdxQuote

DEFAULT_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded")
DEFAULT_QE_STATUSES = ("UpToDate",)
UNKNOWN_STATUS = "Unknown"
"""The status a policy sees when no collateral was available to determine it."""

SNP_TCB_COMPONENTS = ("bl", "tee", "snp", "ucode", "fmc")
_TDX_MR_KEYS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "mr_signer_seam",
                "mr_config_id", "mr_owner", "mr_owner_config")
_SNP_DIGEST_KEYS = {"measurement": 48, "host_data": 32, "id_key_digest": 48, "author_key_digest": 48}


def _hex(value: object, key: str, length: int) -> bytes:
    if not isinstance(value, str):
        raise PolicyError(f"policy key {key}: expected a hex string of {length} bytes, got {type(value).__name__}")
    try:
        decoded = bytes.fromhex(value)
    except ValueError:
        raise PolicyError(f"policy key {key}: {value[:100]!r} is not hex") from None
    if len(decoded) != length:
        raise PolicyError(f"policy key {key}: expected {length} bytes ({2 * length} hex digits), got {len(decoded)}")
    return decoded


def _hex_list(value: object, key: str, length: int) -> tuple[bytes, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise PolicyError(f"policy key {key}: expected a list of hex strings")
    return tuple(_hex(item, key, length) for item in value)


def _str_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"policy key {key}: expected a list of strings")
    return tuple(value)


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"policy key {key}: expected true or false, got {repr(value)[:100]}")
    return value


def _check_keys(table: object, allowed: set[str], prefix: str) -> dict:
    if not isinstance(table, dict):
        raise PolicyError(f"policy key {prefix or 'root'}: expected a table")
    for key in table:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else key
            raise PolicyError(f"unknown policy key {name[:100]!r} (known here: {', '.join(sorted(allowed))})")
    return table


@dataclass(frozen=True, slots=True)
class TdxPolicy:
    """Rules for Intel TDX quotes (and the simulated TEE, which uses the TDX layout)."""

    allow_debug: bool = False
    require_sept_ve_disable: bool = True
    allowed_mr_servicetd: tuple[bytes, ...] = ()
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_TCB_STATUSES
    accepted_qe_statuses: tuple[str, ...] = DEFAULT_QE_STATUSES
    min_tee_tcb_svn: bytes | None = None
    mr_td: tuple[bytes, ...] = ()
    rtmr0: tuple[bytes, ...] = ()
    rtmr1: tuple[bytes, ...] = ()
    rtmr2: tuple[bytes, ...] = ()
    rtmr3: tuple[bytes, ...] = ()
    mr_seam: tuple[bytes, ...] = ()
    mr_signer_seam: tuple[bytes, ...] = ()
    mr_config_id: tuple[bytes, ...] = ()
    mr_owner: tuple[bytes, ...] = ()
    mr_owner_config: tuple[bytes, ...] = ()

    @classmethod
    def from_table(cls, table: object) -> TdxPolicy:
        table = _check_keys(table, {f.name for f in fields(cls)}, "tdx")
        values: dict[str, object] = {}
        for key, value in table.items():
            name = f"tdx.{key}"
            if key in ("allow_debug", "require_sept_ve_disable"):
                values[key] = _bool(value, name)
            elif key in ("accepted_tcb_statuses", "accepted_qe_statuses"):
                values[key] = _str_list(value, name)
            elif key == "min_tee_tcb_svn":
                values[key] = _hex(value, name, 16)
            else:
                values[key] = _hex_list(value, name, 48)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class SnpPolicy:
    """Rules for AMD SEV-SNP attestation reports."""

    allow_debug: bool = False
    allowed_vmpls: tuple[int, ...] = ()
    min_reported_tcb: dict[str, int] = field(default_factory=dict)
    measurement: tuple[bytes, ...] = ()
    host_data: tuple[bytes, ...] = ()
    id_key_digest: tuple[bytes, ...] = ()
    author_key_digest: tuple[bytes, ...] = ()

    @classmethod
    def from_table(cls, table: object) -> SnpPolicy:
        table = _check_keys(table, {f.name for f in fields(cls)}, "snp")
        values: dict[str, object] = {}
        for key, value in table.items():
            name = f"snp.{key}"
            if key == "allow_debug":
                values[key] = _bool(value, name)
            elif key == "allowed_vmpls":
                if not isinstance(value, list) or not all(type(v) is int and 0 <= v <= 3 for v in value):
                    raise PolicyError(f"policy key {name}: expected a list of VMPLs 0..3")
                values[key] = tuple(value)
            elif key == "min_reported_tcb":
                tcb = _check_keys(value, set(SNP_TCB_COMPONENTS), name)
                for component, svn in tcb.items():
                    if type(svn) is not int or not 0 <= svn <= 255:
                        raise PolicyError(f"policy key {name}.{component}: expected an SVN 0..255")
                values[key] = dict(tcb)
            else:
                values[key] = _hex_list(value, name, _SNP_DIGEST_KEYS[key])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class BindingPolicy:
    """What REPORTDATA must be: either exactly ``report_data``, or the binding of a public key,
    job request id, nonce, one of the ``model_sha256`` digests and the GPU evidence hash."""

    report_data: bytes | None = None
    pubkey: bytes | None = None
    job_id: bytes | None = None
    nonce: bytes | None = None
    model_sha256: tuple[bytes, ...] = ()
    gpu_evidence_sha256: bytes | None = None

    @property
    def binds_inputs(self) -> bool:
        return self.pubkey is not None

    @classmethod
    def from_table(cls, table: object) -> BindingPolicy:
        table = _check_keys(table, {f.name for f in fields(cls)}, "binding")
        values: dict[str, object] = {}
        for key, value in table.items():
            name = f"binding.{key}"
            if key == "report_data":
                values[key] = _hex(value, name, 64)
            elif key == "model_sha256":
                values[key] = _hex_list(value, name, 32)
            else:
                values[key] = _hex(value, name, 32)
        policy = cls(**values)
        inputs = {"pubkey": policy.pubkey, "job_id": policy.job_id, "nonce": policy.nonce,
                  "model_sha256": policy.model_sha256 or None}
        given = [name for name, value in inputs.items() if value is not None]
        if given and len(given) != len(inputs) or (policy.gpu_evidence_sha256 is not None and not given):
            missing = [name for name, value in inputs.items() if value is None]
            raise PolicyError(
                "policy table [binding] must give pubkey, job_id, nonce and model_sha256 together; "
                f"missing: {', '.join(missing)}"
            )
        return policy


@dataclass(frozen=True, slots=True)
class Policy:
    """A complete attestation policy."""

    allow_simulated: bool = False
    tdx: TdxPolicy = field(default_factory=TdxPolicy)
    snp: SnpPolicy = field(default_factory=SnpPolicy)
    binding: BindingPolicy = field(default_factory=BindingPolicy)

    @classmethod
    def default(cls) -> Policy:
        return cls()

    @classmethod
    def from_toml(cls, source: str | Path) -> Policy:
        """Load a policy from a TOML file path or TOML text; unknown keys are errors."""
        if isinstance(source, Path):
            try:
                text = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise PolicyError(f"cannot read policy file {source}: {error}") from None
        else:
            text = source
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise PolicyError(f"policy is not valid TOML: {error}") from None
        except RecursionError:
            raise PolicyError("policy is not valid TOML: arrays or tables nest too deeply") from None
        _check_keys(document, {"allow_simulated", "tdx", "snp", "binding"}, "")
        return cls(
            allow_simulated=_bool(document.get("allow_simulated", False), "allow_simulated"),
            tdx=TdxPolicy.from_table(document.get("tdx", {})),
            snp=SnpPolicy.from_table(document.get("snp", {})),
            binding=BindingPolicy.from_table(document.get("binding", {})),
        )


def _allowed(violations: list[str], name: str, value: bytes | None, allowed: tuple[bytes, ...]) -> None:
    if allowed and value not in allowed:
        shown = value.hex() if value is not None else "absent"
        violations.append(f"{name} {shown} is not in the policy's allow-list")


def _validate_tdx(policy: TdxPolicy, quote: TdxQuote, verification: object | None) -> list[str]:
    body = quote.body
    violations: list[str] = []
    if body.debug and not policy.allow_debug:
        violations.append("the TD is a debug TD (TDATTRIBUTES bit 0): the host can read and change its memory")
    if policy.require_sept_ve_disable and not body.sept_ve_disable:
        violations.append("the TD does not set SEPT_VE_DISABLE (TDATTRIBUTES bit 28)")
    if body.mr_service_td is not None and any(body.mr_service_td) and body.mr_service_td not in policy.allowed_mr_servicetd:
        violations.append(
            f"MRSERVICETD is {body.mr_service_td.hex()}: a service TD is bound to this TD and the policy "
            "does not list it (tdx.allowed_mr_servicetd)"
        )
    for key in _TDX_MR_KEYS:
        _allowed(violations, key.upper().replace("_", ""), getattr(body, key), getattr(policy, key))
    if policy.min_tee_tcb_svn is not None:
        low = [i for i, (have, need) in enumerate(zip(body.tee_tcb_svn, policy.min_tee_tcb_svn)) if have < need]
        if low:
            violations.append(
                f"TEE_TCB_SVN {body.tee_tcb_svn.hex()} is below the policy minimum "
                f"{policy.min_tee_tcb_svn.hex()} (component(s) {', '.join(map(str, low))})"
            )
    if verification is not None:
        tcb = getattr(verification, "tcb_status", None) or UNKNOWN_STATUS
        qe = getattr(verification, "qe_status", None) or UNKNOWN_STATUS
        if tcb not in policy.accepted_tcb_statuses:
            hint = (" (no collateral: give --collateral FILE or verify online)" if tcb == UNKNOWN_STATUS else "")
            violations.append(
                f"platform TCB status {tcb}{hint} is not accepted (tdx.accepted_tcb_statuses: "
                f"{', '.join(policy.accepted_tcb_statuses) or 'none'})"
            )
        if qe not in policy.accepted_qe_statuses:
            violations.append(
                f"quoting enclave status {qe} is not accepted (tdx.accepted_qe_statuses: "
                f"{', '.join(policy.accepted_qe_statuses) or 'none'})"
            )
    return violations


def _validate_snp(policy: SnpPolicy, report: SnpReport, verification: object | None) -> list[str]:
    violations: list[str] = []
    if report.debug_allowed and not policy.allow_debug:
        violations.append("the SNP guest policy allows debugging (POLICY bit 19): the host can read its memory")
    if policy.allowed_vmpls and report.vmpl not in policy.allowed_vmpls:
        violations.append(f"the report was requested at VMPL {report.vmpl}; the policy allows {list(policy.allowed_vmpls)}")
    for key in _SNP_DIGEST_KEYS:
        _allowed(violations, key.upper(), getattr(report, key), getattr(policy, key))
    if policy.min_reported_tcb:
        product = getattr(verification, "product", None) or report.product
        if product is None:
            violations.append("cannot check REPORTED_TCB against snp.min_reported_tcb: the product line is unknown")
            return violations
        reported = report.reported_tcb.decode(product).as_dict()
        for component, minimum in policy.min_reported_tcb.items():
            have = reported.get(component)
            if have is None:
                if minimum:
                    violations.append(f"{product} REPORTED_TCB has no {component} component; the policy requires >= {minimum}")
            elif have < minimum:
                violations.append(f"REPORTED_TCB {component} SVN {have} is below the policy minimum {minimum}")
    return violations


def _validate_binding(policy: BindingPolicy, report_data: bytes) -> list[str]:
    if policy.report_data is not None and report_data != policy.report_data:
        return [f"REPORTDATA {report_data.hex()} is not the expected {policy.report_data.hex()}"]
    if not policy.binds_inputs:
        return []
    failures = []
    for model in policy.model_sha256:
        try:
            check_report_data(report_data, policy.pubkey, policy.job_id, policy.nonce, model,
                              policy.gpu_evidence_sha256)
            return []
        except BindingError as error:
            failures.append(str(error))
    if len(policy.model_sha256) > 1 and all("REPORTDATA[0:32]" not in f for f in failures):
        return ["REPORTDATA[32:64] does not bind the job request id, nonce, GPU evidence and any of the "
                f"{len(policy.model_sha256)} accepted model digests"]
    return [failures[0]]


def validate(
    policy: Policy,
    parsed: object,
    verification: object | None,
    *,
    simulated: bool = False,
) -> list[str]:
    """Every way ``parsed`` evidence (with its crypto ``verification`` result) breaks ``policy``.

    ``parsed`` is a :class:`attest.tdx.TdxQuote` (TDX or simulated) or an SNP report;
    ``verification`` may be None when verification failed (only the static rules apply).
    """
    violations: list[str] = []
    if simulated and not policy.allow_simulated:
        violations.append("simulated TEE evidence is not accepted (allow_simulated is false)")
    if isinstance(parsed, TdxQuote):
        violations.extend(_validate_tdx(policy.tdx, parsed, verification))
    elif isinstance(parsed, SnpReport):
        violations.extend(_validate_snp(policy.snp, parsed, verification))
    else:
        raise TypeError(f"validate() takes a TdxQuote or an SnpReport, not {type(parsed).__name__}")
    violations.extend(_validate_binding(policy.binding, parsed.report_data))
    return violations
