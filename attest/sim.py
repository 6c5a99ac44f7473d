"""The simulated TEE: TDX-v4-layout quotes that run the *same* verification code as real ones.

On first use a simulated PKI is created under ``dvm.paths.state_dir()/sim-tee/`` (private
keys mode 0600): a root CA, a "PCK Platform CA", a PCK certificate carrying an SGX
extension, a TCB signing certificate, and an attestation key. :func:`make_quote` builds a
quote whose QE report is signed by the PCK key and binds the attestation key exactly as a
real Quoting Enclave does; :func:`sim_collateral` signs matching TCB Info / QE Identity and
CRLs. Every subject says "cdvm SIMULATED TEE — NOT CONFIDENTIAL": a simulated quote proves
nothing about confidentiality. Each job sandbox may create its own simulated PKI (its state
directory is a private tmpfs) and ships :func:`sim_collateral` with its evidence; a verifier
accepts such a quote, against the simulated root its own chain ends in, only when told to
(``allow_simulated``): see attest.verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attest.collateral import Collateral
from attest.errors import ProviderError
from attest.pck import SGX_EXTENSION_OID
from attest.x509util import fingerprint

SIM_MARKER = "cdvm SIMULATED TEE \u2014 NOT CONFIDENTIAL"
"""Organization name of every simulated certificate."""

_FMSPC = bytes.fromhex("00C0DE000000")
_PCE_ID = bytes(2)
_PCE_SVN = 13
_SGX_SVNS = (3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)
_TEE_TCB_SVN = bytes([5, 0, 2]) + bytes(13)
_QE_MRSIGNER = hashlib.sha256(b"cdvm simulated TD quoting enclave").digest()
_QE_ISVPRODID, _QE_ISVSVN = 2, 4
_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_MR_TD = hashlib.sha384(b"cdvm simulated TD").digest()
_TD_ATTRIBUTES = (1 << 28).to_bytes(8, "little")  # SEPT_VE_DISABLE, not DEBUG
_XFAM = bytes.fromhex("e702060000000000")
_CERT_YEARS = 10
_COLLATERAL_DAYS = 30
_KEYS = ("root", "platform-ca", "pck", "tcb-signing", "attestation")


@dataclass(frozen=True)
class _SimPki:
    root: x509.Certificate
    platform_ca: x509.Certificate
    pck: x509.Certificate
    tcb_signing: x509.Certificate
    keys: dict[str, ec.EllipticCurvePrivateKey]

    def __repr__(self) -> str:
        return f"_SimPki(root={fingerprint(self.root)[:16]}…)"


_lock = threading.Lock()
_loaded: dict[Path, _SimPki] = {}
_collateral: dict[Path, tuple[datetime, Collateral]] = {}


def _name(role: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{SIM_MARKER} {role}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIM_MARKER),
    ])


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _der_uint(tag: int, n: int) -> bytes:
    raw = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big")
    return _der(tag, raw)


def _pair(oid: str, value: bytes) -> bytes:
    return _der(0x30, _der_oid(oid) + value)


def sgx_extension_der(ppid: bytes, sgx_svns: tuple[int, ...], pce_svn: int, pce_id: bytes, fmspc: bytes) -> bytes:
    """DER of an SGX extension (Intel PCK certificate profile §1.3.5) for a simulated PCK certificate."""
    base = SGX_EXTENSION_OID
    tcb = b"".join(_pair(f"{base}.2.{i + 1}", _der_uint(0x02, svn)) for i, svn in enumerate(sgx_svns))
    tcb += _pair(f"{base}.2.17", _der_uint(0x02, pce_svn))
    tcb += _pair(f"{base}.2.18", _der(0x04, bytes(sgx_svns)))
    return _der(0x30, b"".join([
        _pair(f"{base}.1", _der(0x04, ppid)),
        _pair(f"{base}.2", _der(0x30, tcb)),
        _pair(f"{base}.3", _der(0x04, pce_id)),
        _pair(f"{base}.4", _der(0x04, fmspc)),
        _pair(f"{base}.5", _der_uint(0x0A, 0)),
    ]))


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, path_length: int | None,
          extra: list[x509.ExtensionType] | None = None) -> x509.Certificate:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365 * _CERT_YEARS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=not ca, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
            critical=True)
    )
    for ext in extra or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _create(directory: Path) -> None:
    """Create the simulated PKI in a fresh directory and move it into place atomically."""
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sim-tee-", dir=directory.parent))
    try:
        keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in _KEYS}
        root = _cert(_name("Root CA"), keys["root"], _name("Root CA"), keys["root"], ca=True, path_length=1)
        platform = _cert(_name("PCK Platform CA"), keys["platform-ca"], root.subject, keys["root"],
                         ca=True, path_length=0)
        ppid = hashlib.sha256(fingerprint(root).encode()).digest()[:16]
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID),
                                         sgx_extension_der(ppid, _SGX_SVNS, _PCE_SVN, _PCE_ID, _FMSPC))
        pck = _cert(_name("PCK Certificate"), keys["pck"], platform.subject, keys["platform-ca"],
                    ca=False, path_length=None, extra=[ext])
        tcb = _cert(_name("TCB Signing"), keys["tcb-signing"], root.subject, keys["root"], ca=False, path_length=None)
        for name, key in keys.items():
            path = tmp / f"{name}.key"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        for name, cert in (("root", root), ("platform-ca", platform), ("pck", pck), ("tcb-signing", tcb)):
            (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path) -> _SimPki:
    try:
        keys = {}
        for name in _KEYS:
            key = serialization.load_pem_private_key((directory / f"{name}.key").read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{name}.key is not an EC key")
            keys[name] = key
        certs = {name: x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
                 for name in ("root", "platform-ca", "pck", "tcb-signing")}
    except (OSError, ValueError) as exc:
        raise ProviderError(f"simulated TEE state in {directory} is unreadable ({exc}); remove the directory to recreate it") from None
    return _SimPki(root=certs["root"], platform_ca=certs["platform-ca"], pck=certs["pck"],
                   tcb_signing=certs["tcb-signing"], keys=keys)


def _directory() -> Path:
    from dvm.paths import state_dir

    return state_dir() / "sim-tee"


def _pki() -> _SimPki:
    directory = _directory()
    with _lock:
        pki = _loaded.get(directory)
        if pki is None:
            if not (directory / "root.pem").is_file():
                _create(directory)
            pki = _loaded[directory] = _load(directory)
    return pki


def sim_root_certificate() -> x509.Certificate:
    """The simulated root CA certificate (created on first use)."""
    return _pki().root


def sim_root_fingerprint() -> str:
    """SHA-256 of the simulated root: pass as ``trusted_root`` to verify simulated quotes."""
    return fingerprint(_pki().root)


def is_sim_root(cert: x509.Certificate) -> bool:
    """True when ``cert`` is a self-issued cdvm simulated-TEE root (from any machine)."""
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return cert.subject == cert.issuer and any(attr.value == SIM_MARKER for attr in orgs)


def _sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem_chain(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def make_quote(report_data: bytes) -> bytes:
    """A simulated TDX quote (v4 layout) carrying ``report_data`` (exactly 64 bytes)."""
    if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
        raise ProviderError("REPORTDATA must be exactly 64 bytes")
    pki = _pki()
    header = struct.pack("<HHIHH", 4, 2, 0x81, 0, _PCE_SVN) + _QE_VENDOR_ID + bytes(20)
    body = b"".join([
        _TEE_TCB_SVN, hashlib.sha384(b"cdvm simulated TDX module").digest(), bytes(48), bytes(8),
        _TD_ATTRIBUTES, _XFAM, _MR_TD, bytes(48), bytes(48), bytes(48),
        bytes(48), bytes(48), bytes(48), bytes(48), bytes(report_data),
    ])
    signed = header + body
    att_pub = pki.keys["attestation"].public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]
    auth_data = hashlib.sha256(b"cdvm simulated QE auth data").digest()
    qe_report = b"".join([
        bytes(16), struct.pack("<I", 0), bytes(28), _QE_ATTRIBUTES,
        hashlib.sha256(b"cdvm simulated QE").digest(), bytes(32), _QE_MRSIGNER, bytes(96),
        struct.pack("<HH", _QE_ISVPRODID, _QE_ISVSVN), bytes(60),
        hashlib.sha256(att_pub + auth_data).digest() + bytes(32),
    ])
    chain = _pem_chain(pki.pck, pki.platform_ca, pki.root)
    cert_data = (qe_report + _sign_raw(pki.keys["pck"], qe_report) + struct.pack("<H", len(auth_data)) + auth_data
                 + struct.pack("<HI", 5, len(chain)) + chain)
    sig_data = _sign_raw(pki.keys["attestation"], signed) + att_pub + struct.pack("<HI", 6, len(cert_data)) + cert_data
    return signed + struct.pack("<I", len(sig_data)) + sig_data


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, start: datetime, end: datetime) -> bytes:
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
           .last_update(start).next_update(end).sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.DER)


def sim_collateral() -> Collateral:
    """Collateral for simulated quotes, signed by the simulated TCB signing key (valid 30 days)."""
    pki = _pki()
    directory = _directory()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with _lock:
        cached = _collateral.get(directory)
        if cached is not None and cached[0] - now > timedelta(days=1):
            return cached[1]
    start, end = now - timedelta(hours=1), now + timedelta(days=_COLLATERAL_DAYS)
    zero48 = "00" * 48
    tcb_info = json.dumps({
        "id": "TDX", "version": 3, "issueDate": _stamp(start), "nextUpdate": _stamp(end),
        "fmspc": _FMSPC.hex().upper(), "pceId": _PCE_ID.hex(), "tcbType": 0, "tcbEvaluationDataNumber": 1,
        "tdxModule": {"mrsigner": zero48, "attributes": "0000000000000000", "attributesMask": "FFFFFFFFFFFFFFFF"},
        "tdxModuleIdentities": [],
        "tcbLevels": [{
            "tcb": {"sgxtcbcomponents": [{"svn": s} for s in _SGX_SVNS], "pcesvn": _PCE_SVN,
                    "tdxtcbcomponents": [{"svn": s} for s in _TEE_TCB_SVN]},
            "tcbDate": _stamp(start), "tcbStatus": "UpToDate"}],
    }, separators=(",", ":"))
    qe_identity = json.dumps({
        "id": "TD_QE", "version": 2, "issueDate": _stamp(start), "nextUpdate": _stamp(end),
        "tcbEvaluationDataNumber": 1, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
        "attributes": _QE_ATTRIBUTES.hex().upper(), "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": _QE_MRSIGNER.hex().upper(), "isvprodid": _QE_ISVPRODID,
        "tcbLevels": [{"tcb": {"isvsvn": _QE_ISVSVN}, "tcbDate": _stamp(start), "tcbStatus": "UpToDate"}],
    }, separators=(",", ":"))
    tcb_chain = _pem_chain(pki.tcb_signing, pki.root).decode()
    collateral = Collateral(
        pck_crl_issuer_chain=_pem_chain(pki.platform_ca, pki.root).decode(),
        root_ca_crl=_crl(pki.root, pki.keys["root"], start, end),
        pck_crl=_crl(pki.platform_ca, pki.keys["platform-ca"], start, end),
        tcb_info_issuer_chain=tcb_chain,
        tcb_info=tcb_info,
        tcb_info_signature=_sign_raw(pki.keys["tcb-signing"], tcb_info.encode()),
        qe_identity_issuer_chain=tcb_chain,
        qe_identity=qe_identity,
        qe_identity_signature=_sign_raw(pki.keys["tcb-signing"], qe_identity.encode()),
    )
    with _lock:
        _collateral[directory] = (end, collateral)
    return collateral
