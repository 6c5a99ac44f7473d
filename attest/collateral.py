"""Intel DCAP verification collateral: model, parsers, and the PCS/PCCS fetcher with a disk cache.

Collateral is what a verifier needs besides the quote (Intel PCS API v4): the PCK CRL and
root CA CRL with the PCK CRL issuer chain, the TDX TCB Info (``/tdx/certification/v4/tcb``)
and the TD QE Identity (``/tdx/certification/v4/qe/identity``), each a signed JSON body
``{"tcbInfo"|"enclaveIdentity": {...}, "signature": "<hex r‖s>"}`` whose issuer chain comes
in a response header. The signature covers the exact bytes of the inner JSON object, so the
raw text is kept. Parsing is strict: anything malformed raises :class:`CollateralError`.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attest.errors import CollateralError, ParseError
from attest.x509util import iso

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
TCB_STATUSES = (
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked",
)
"""Intel's TCB statuses, best first (the order Intel's QVL uses to converge statuses)."""


@dataclass(frozen=True, slots=True)
class Collateral:
    """Everything besides the quote that DCAP verification needs (dcap-qvl's QuoteCollateralV3)."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    def __repr__(self) -> str:
        return f"Collateral(tcb_info={len(self.tcb_info)} chars, qe_identity={len(self.qe_identity)} chars)"


@dataclass(frozen=True, slots=True)
class TcbLevel:
    """One TCB Info level: minimum SVNs and the status a platform meeting them has."""

    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModuleTcbLevel:
    """An ISVSVN-keyed TCB level (TDX module identities, QE identity)."""

    isv_svn: int
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    """``tdxModule`` (id ``None``) or one entry of ``tdxModuleIdentities`` (id ``TDX_01``...)."""

    id: str | None
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[ModuleTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    """TCB Info v3 (TDX) — Intel PCS API v4 "TDX TCB Info" model."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


@dataclass(frozen=True, slots=True)
class QeIdentity:
    """Enclave Identity v2 (here the TD QE's)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[ModuleTcbLevel, ...]


# ---------------------------------------------------------------------------- JSON field helpers


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise CollateralError(f"{where} must be a JSON object")
    if key not in obj:
        raise CollateralError(f"{where} lacks \"{key}\"")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CollateralError(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _int(obj: Any, key: str, where: str, limit: int) -> int:
    value = _get(obj, key, int, where)
    if isinstance(value, bool) or not 0 <= value <= limit:
        raise CollateralError(f"{where}.{key} = {repr(value)[:40]} is not an integer in 0..{limit}")
    return value


def _hex(obj: Any, key: str, where: str, size: int) -> bytes:
    text = _get(obj, key, str, where)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise CollateralError(f"{where}.{key} is not hex") from None
    if len(value) != size or len(text) != 2 * size:
        raise CollateralError(f"{where}.{key} must be {size} bytes of hex")
    return value


def _time(obj: Any, key: str, where: str) -> datetime:
    text = _get(obj, key, str, where)
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text):
        raise CollateralError(f"{where}.{key} = {text[:40]!r} is not an RFC 3339 time")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise CollateralError(f"{where}.{key} = {text[:40]!r} is not a valid time") from None


def _status(obj: Any, where: str) -> str:
    status = _get(obj, "tcbStatus", str, where)
    if status not in TCB_STATUSES:
        raise CollateralError(f"{where}.tcbStatus {status[:40]!r} is not an Intel TCB status")
    return status


def _advisories(obj: Any, where: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CollateralError(f"{where}.advisoryIDs must be a list of strings")
    return tuple(ids)


def _svns(obj: Any, key: str, where: str) -> tuple[int, ...]:
    comps = _get(obj, key, list, where)
    if len(comps) != 16:
        raise CollateralError(f"{where}.{key} must have 16 components, has {len(comps)}")
    return tuple(_int(c, "svn", f"{where}.{key}[{i}]", 255) for i, c in enumerate(comps))


def _isv_levels(obj: Any, where: str) -> tuple[ModuleTcbLevel, ...]:
    levels = _get(obj, "tcbLevels", list, where)
    out = []
    for i, level in enumerate(levels):
        w = f"{where}.tcbLevels[{i}]"
        out.append(ModuleTcbLevel(
            isv_svn=_int(_get(level, "tcb", dict, w), "isvsvn", f"{w}.tcb", 65535),
            tcb_date=_time(level, "tcbDate", w),
            tcb_status=_status(level, w),
            advisory_ids=_advisories(level, w),
        ))
    return tuple(out)


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CollateralError(f"{what} is not valid JSON: it nests too deeply") from None


def parse_tcb_info(raw: str) -> TcbInfo:
    """Parse the TCB Info JSON object (the signed ``tcbInfo`` value); TDX needs id "TDX", version 3."""
    obj = _load_json(raw, "TCB Info")
    w = "tcbInfo"
    if not isinstance(obj, dict):
        raise CollateralError(f"{w} must be a JSON object")
    tdx_module = None
    if "tdxModule" in obj:
        m = _get(obj, "tdxModule", dict, w)
        tdx_module = TdxModuleIdentity(
            id=None,
            mrsigner=_hex(m, "mrsigner", f"{w}.tdxModule", 48),
            attributes=_hex(m, "attributes", f"{w}.tdxModule", 8),
            attributes_mask=_hex(m, "attributesMask", f"{w}.tdxModule", 8),
            tcb_levels=(),
        )
    identities = []
    for i, ident in enumerate(_get(obj, "tdxModuleIdentities", list, w) if "tdxModuleIdentities" in obj else []):
        wi = f"{w}.tdxModuleIdentities[{i}]"
        identities.append(TdxModuleIdentity(
            id=_get(ident, "id", str, wi),
            mrsigner=_hex(ident, "mrsigner", wi, 48),
            attributes=_hex(ident, "attributes", wi, 8),
            attributes_mask=_hex(ident, "attributesMask", wi, 8),
            tcb_levels=_isv_levels(ident, wi),
        ))
    levels = []
    for i, level in enumerate(_get(obj, "tcbLevels", list, w)):
        wl = f"{w}.tcbLevels[{i}]"
        tcb = _get(level, "tcb", dict, wl)
        levels.append(TcbLevel(
            sgx_components=_svns(tcb, "sgxtcbcomponents", f"{wl}.tcb"),
            pce_svn=_int(tcb, "pcesvn", f"{wl}.tcb", 65535),
            tdx_components=_svns(tcb, "tdxtcbcomponents", f"{wl}.tcb") if "tdxtcbcomponents" in tcb else (),
            tcb_date=_time(level, "tcbDate", wl),
            tcb_status=_status(level, wl),
            advisory_ids=_advisories(level, wl),
        ))
    return TcbInfo(
        id=_get(obj, "id", str, w),
        version=_int(obj, "version", w, 255),
        issue_date=_time(obj, "issueDate", w),
        next_update=_time(obj, "nextUpdate", w),
        fmspc=_hex(obj, "fmspc", w, 6),
        pce_id=_hex(obj, "pceId", w, 2),
        tcb_type=_int(obj, "tcbType", w, 255),
        tcb_evaluation_data_number=_int(obj, "tcbEvaluationDataNumber", w, 2**32 - 1),
        tdx_module=tdx_module,
        tdx_module_identities=tuple(identities),
        tcb_levels=tuple(levels),
    )


def parse_qe_identity(raw: str) -> QeIdentity:
    """Parse the Enclave Identity JSON object (the signed ``enclaveIdentity`` value)."""
    obj = _load_json(raw, "QE Identity")
    w = "enclaveIdentity"
    return QeIdentity(
        id=_get(obj, "id", str, w),
        version=_int(obj, "version", w, 255),
        issue_date=_time(obj, "issueDate", w),
        next_update=_time(obj, "nextUpdate", w),
        tcb_evaluation_data_number=_int(obj, "tcbEvaluationDataNumber", w, 2**32 - 1),
        miscselect=int.from_bytes(_hex(obj, "miscselect", w, 4), "little"),
        miscselect_mask=int.from_bytes(_hex(obj, "miscselectMask", w, 4), "little"),
        attributes=_hex(obj, "attributes", w, 16),
        attributes_mask=_hex(obj, "attributesMask", w, 16),
        mrsigner=_hex(obj, "mrsigner", w, 32),
        isv_prod_id=_int(obj, "isvprodid", w, 65535),
        tcb_levels=_isv_levels(obj, w),
    )


# ---------------------------------------------------------------------------- wire formats


def split_signed_body(body: str | bytes, key: str) -> tuple[str, bytes]:
    """Split a PCS body ``{"<key>": {...}, "signature": "<hex>"}`` into the exact signed JSON
    text of ``<key>`` and the 64-byte signature."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise CollateralError(f"{key} response is not UTF-8") from None
    obj = _load_json(body, f"{key} response")
    if not isinstance(obj, dict) or key not in obj or "signature" not in obj:
        raise CollateralError(f"{key} response must be an object with \"{key}\" and \"signature\"")
    match = re.search(r'"%s"\s*:\s*' % re.escape(key), body)
    decoder = json.JSONDecoder()
    while match is not None:
        try:
            value, end = decoder.raw_decode(body, match.end())
        except ValueError:
            value, end = None, match.end()
        if value == obj[key] and isinstance(value, dict):
            return body[match.end() : end], _signature(obj["signature"], f"{key} signature")
        match = re.compile(r'"%s"\s*:\s*' % re.escape(key)).search(body, match.end())
    raise CollateralError(f"could not locate the signed \"{key}\" object in the response")


def _signature(value: Any, what: str) -> bytes:
    raw = _bytes_field(value, what)
    if len(raw) != 64:
        raise CollateralError(f"{what} must be 64 bytes (r‖s), got {len(raw)}")
    return raw


def _bytes_field(value: Any, what: str) -> bytes:
    """dcap-qvl JSON encodes byte fields as hex strings (older versions: arrays of ints)."""
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise CollateralError(f"{what} is not hex") from None
    if isinstance(value, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value):
        return bytes(value)
    raise CollateralError(f"{what} must be a hex string")


_FIELDS = ("pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
           "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature")
_BYTE_FIELDS = {"root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature"}


def collateral_from_json(text: str | bytes) -> Collateral:
    """Read dcap-qvl's QuoteCollateralV3 JSON (byte fields hex-encoded, text fields verbatim)."""
    obj = _load_json(text, "collateral")
    if not isinstance(obj, dict):
        raise CollateralError("collateral JSON must be an object")
    values = {}
    for name in _FIELDS:
        if name not in obj:
            raise CollateralError(f"collateral JSON lacks \"{name}\"")
        if name in _BYTE_FIELDS:
            values[name] = _bytes_field(obj[name], f"collateral {name}")
        elif isinstance(obj[name], str):
            values[name] = obj[name]
        else:
            raise CollateralError(f"collateral {name} must be a string")
    for name in ("tcb_info_signature", "qe_identity_signature"):
        _signature(values[name].hex(), f"collateral {name}")
    return Collateral(**values)


def collateral_to_json(collateral: Collateral) -> str:
    """Write dcap-qvl's QuoteCollateralV3 JSON."""
    return json.dumps({
        name: value.hex() if isinstance(value, bytes) else value
        for name in _FIELDS for value in [getattr(collateral, name)]
    }, indent=1)


def collateral_from_pcs(
    *,
    tcb_info_body: str | bytes,
    tcb_info_issuer_chain: str,
    qe_identity_body: str | bytes,
    qe_identity_issuer_chain: str,
    pck_crl: bytes,
    pck_crl_issuer_chain: str,
    root_ca_crl: bytes,
) -> Collateral:
    """Assemble collateral from raw Intel PCS / PCCS responses (bodies and issuer-chain headers)."""
    tcb_info, tcb_sig = split_signed_body(tcb_info_body, "tcbInfo")
    qe_identity, qe_sig = split_signed_body(qe_identity_body, "enclaveIdentity")
    return Collateral(
        pck_crl_issuer_chain=pck_crl_issuer_chain,
        root_ca_crl=_crl_bytes(root_ca_crl),
        pck_crl=_crl_bytes(pck_crl),
        tcb_info_issuer_chain=tcb_info_issuer_chain,
        tcb_info=tcb_info,
        tcb_info_signature=tcb_sig,
        qe_identity_issuer_chain=qe_identity_issuer_chain,
        qe_identity=qe_identity,
        qe_identity_signature=qe_sig,
    )


def _crl_bytes(data: bytes) -> bytes:
    """CRLs come as DER, or (from a PCCS) as hex text of the DER."""
    stripped = data.strip()
    if stripped[:1] != b"\x30" and re.fullmatch(rb"[0-9a-fA-F]+", stripped or b"-"):
        return bytes.fromhex(stripped.decode())
    return data


# ---------------------------------------------------------------------------- fetching and cache


def _cache_path(cache_dir: Path, fmspc: bytes, ca: str) -> Path:
    return cache_dir / "collateral" / f"tdx-{fmspc.hex().upper()}-{ca}.json"


def collateral_fresh_until(collateral: Collateral) -> datetime:
    """The earliest nextUpdate among TCB Info, QE Identity and the two CRLs."""
    from attest.x509util import load_crl

    ends = [parse_tcb_info(collateral.tcb_info).next_update, parse_qe_identity(collateral.qe_identity).next_update]
    for data, what in ((collateral.pck_crl, "PCK CRL"), (collateral.root_ca_crl, "root CA CRL")):
        try:
            crl = load_crl(data, what)
        except ParseError as exc:
            raise CollateralError(str(exc)) from None
        if crl.next_update_utc is None:
            raise CollateralError(f"{what} has no nextUpdate")
        ends.append(crl.next_update_utc)
    return min(ends)


def read_cached_collateral(fmspc: bytes, ca: str, cache_dir: Path | None = None) -> Collateral | None:
    """The cached collateral for ``fmspc``/``ca``, or None."""
    path = _cache_path(_cache_root(cache_dir), fmspc, ca)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CollateralError(f"cannot read cached collateral {path}: {exc}") from None
    return collateral_from_json(text)


def write_cached_collateral(collateral: Collateral, fmspc: bytes, ca: str, cache_dir: Path | None = None) -> Path:
    """Store collateral atomically under ``<cache>/collateral/tdx-<FMSPC>-<ca>.json``."""
    path = _cache_path(_cache_root(cache_dir), fmspc, ca)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(collateral_to_json(collateral))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from dvm.paths import cache_dir as default_cache_dir

    return default_cache_dir()


async def fetch_collateral(
    quote: bytes,
    pccs_url: str | None = None,
    cache_dir: Path | None = None,
    offline: bool = False,
    *,
    now: datetime | None = None,
    timeout: float = 30.0,
) -> Collateral:
    """Collateral for a TDX quote's platform (FMSPC and PCK CA from its PCK certificate).

    Uses the disk cache while everything in it is before its nextUpdate; otherwise fetches
    from ``pccs_url`` (default Intel PCS) and refreshes the cache. ``offline`` only reads
    the cache and raises :class:`CollateralError` when nothing usable is there.
    """
    from attest.pck import pck_ca_type, pck_extension
    from attest.tdx import parse_quote
    from attest.x509util import parse_pem_chain

    parsed = parse_quote(quote)
    leaf = parse_pem_chain(parsed.signature_data.certification.pck_cert_chain, "PCK certificate chain")[0]
    fmspc, ca = pck_extension(leaf).fmspc, pck_ca_type(leaf)
    moment = now or datetime.now(timezone.utc)
    cached = read_cached_collateral(fmspc, ca, cache_dir)
    if cached is not None and collateral_fresh_until(cached) >= moment:
        return cached
    if offline:
        path = _cache_path(_cache_root(cache_dir), fmspc, ca)
        if cached is None:
            raise CollateralError(f"offline and no cached collateral for FMSPC {fmspc.hex().upper()} at {path}")
        raise CollateralError(
            f"offline and the cached collateral for FMSPC {fmspc.hex().upper()} at {path} expired at "
            f"{iso(collateral_fresh_until(cached))} (now {iso(moment)})")
    collateral = await download_collateral(fmspc, ca, pccs_url, timeout=timeout)
    write_cached_collateral(collateral, fmspc, ca, cache_dir)
    return collateral


async def download_collateral(fmspc: bytes, ca: str, pccs_url: str | None = None, *, timeout: float = 30.0) -> Collateral:
    """GET the TDX collateral for ``fmspc`` from Intel PCS or a PCCS (API v4)."""
    import aiohttp

    base = (pccs_url or INTEL_PCS_URL).rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    is_pcs = pccs_url is None or base.startswith(INTEL_PCS_URL)
    fmspc_hex = fmspc.hex().upper()

    async def get(session: aiohttp.ClientSession, url: str, chain_headers: tuple[str, ...]) -> tuple[bytes, str]:
        try:
            async with session.get(url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise CollateralError(f"GET {url} answered HTTP {resp.status}")
                chain = ""
                for header in chain_headers:
                    if header in resp.headers:
                        chain = urllib.parse.unquote(resp.headers[header])
                        break
                else:
                    if chain_headers:
                        raise CollateralError(f"GET {url}: response lacks the {chain_headers[0]} header")
                return body, chain
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError) as exc:
            raise CollateralError(f"GET {url} failed: {exc.__class__.__name__}: {exc}") from None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        tcb, tcb_chain = await get(session, f"{base}/tdx/certification/v4/tcb?fmspc={fmspc_hex}",
                                   ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"))
        qe, qe_chain = await get(session, f"{base}/tdx/certification/v4/qe/identity",
                                 ("SGX-Enclave-Identity-Issuer-Chain",))
        pck_crl, crl_chain = await get(session, f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
                                       ("SGX-PCK-CRL-Issuer-Chain",))
        root_url = INTEL_ROOT_CA_CRL_URL if is_pcs else f"{base}/sgx/certification/v4/rootcacrl"
        root_crl, _ = await get(session, root_url, ())
    return collateral_from_pcs(
        tcb_info_body=tcb, tcb_info_issuer_chain=tcb_chain,
        qe_identity_body=qe, qe_identity_issuer_chain=qe_chain,
        pck_crl=pck_crl, pck_crl_issuer_chain=crl_chain, root_ca_crl=root_crl,
    )
