"""Certificates for SEV-SNP verification: AMD's Key Distribution Service, a disk cache,
the report's certificate table, and certificates the user supplies.

KDS endpoints (AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification", 57230):

* ``/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..`` — the VCEK (DER) for
  a chip at a TCB; hwid is CHIP_ID in hex (Turin: its first 8 bytes, and ``fmcSPL`` first);
* ``/vcek/v1/{product}/cert_chain`` — PEM ASK then ARK; ``/vlek/v1/{product}/cert_chain`` —
  PEM ASVK then ARK;
* ``/vcek/v1/{product}/crl`` and ``/vlek/v1/{product}/crl`` — the ARK-signed CRL (DER).

VLEK certificates are not public (the cloud provider installs them), so a VLEK-signed report
must bring its VLEK in the certificate table or from the user.

Responses are validated before they are cached under ``dvm.paths.cache_dir()/kds``. VCEKs
and chains never change for a given URL and are served from the cache; a cached CRL is used
until its nextUpdate. With ``offline=True`` only the cache is read, and a missing entry is a
:class:`CollateralError` naming the file that was expected.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from attest.errors import CollateralError, ParseError
from attest.snp import PRODUCTS, SigningKey, SnpReport, TcbParts
from attest.snp_certs import CertTable, SnpCertChain
from attest.snp_verify import load_certificate, parse_vek_extensions
from attest.x509util import load_crl, parse_pem_chain
from dvm import paths

KDS_BASE_URL = "https://kdsintf.amd.com"
MAX_RESPONSE = 1 << 20
TURIN_HWID_LEN = 8


def _kind(signing_key: SigningKey) -> str:
    if signing_key is SigningKey.VCEK:
        return "vcek"
    if signing_key is SigningKey.VLEK:
        return "vlek"
    raise CollateralError(f"the KDS serves VCEK and VLEK chains, not {signing_key.name}")


def _product(product: str) -> str:
    if product not in PRODUCTS:
        raise CollateralError(f"unknown SEV-SNP product {product!r}; the KDS knows {', '.join(PRODUCTS)}")
    return product


def vcek_path(product: str, chip_id: bytes, tcb: TcbParts) -> str:
    """The KDS path of the VCEK for ``chip_id`` at ``tcb`` (decoded for ``product``)."""
    _product(product)
    if tcb.product != product:
        raise CollateralError(f"the TCB is decoded for {tcb.product}, not {product}")
    if product == "Turin":
        hwid = chip_id[:TURIN_HWID_LEN]
        query = f"fmcSPL={tcb.fmc or 0:02d}&"
    else:
        hwid = chip_id
        query = ""
    query += f"blSPL={tcb.bootloader:02d}&teeSPL={tcb.tee:02d}&snpSPL={tcb.snp:02d}&ucodeSPL={tcb.microcode:02d}"
    return f"/vcek/v1/{product}/{hwid.hex()}?{query}"


def cert_chain_path(product: str, signing_key: SigningKey = SigningKey.VCEK) -> str:
    """``/vcek/v1/{product}/cert_chain`` (ASK, ARK) or ``/vlek/...`` (ASVK, ARK)."""
    return f"/{_kind(signing_key)}/v1/{_product(product)}/cert_chain"


def crl_path(product: str, signing_key: SigningKey = SigningKey.VCEK) -> str:
    """``/vcek/v1/{product}/crl`` or ``/vlek/v1/{product}/crl``."""
    return f"/{_kind(signing_key)}/v1/{_product(product)}/crl"


def certificate_der(data: bytes, what: str) -> bytes:
    """One certificate, DER or PEM, as strict DER."""
    if not isinstance(data, (bytes, bytearray)):
        raise ParseError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data.lstrip().startswith(b"-----BEGIN"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certs = parse_pem_chain(data, what)
        if len(certs) != 1:
            raise ParseError(f"{what} holds {len(certs)} certificates, expected one")
        return certs[0].public_bytes(Encoding.DER)
    load_certificate(data, what)
    return data


def parse_cert_chain(pem: bytes, signing_key: SigningKey = SigningKey.VCEK) -> tuple[bytes, bytes]:
    """A KDS ``cert_chain`` body: exactly two PEM certificates, the ASK (or ASVK) then the ARK.
    Returns their DER encodings in that order."""
    intermediate = "ASVK" if signing_key is SigningKey.VLEK else "ASK"
    certs = parse_pem_chain(pem, f"AMD {intermediate}/ARK chain")
    if len(certs) != 2:
        raise ParseError(f"an AMD cert_chain holds the {intermediate} and the ARK, found {len(certs)} certificates")
    return certs[0].public_bytes(Encoding.DER), certs[1].public_bytes(Encoding.DER)


def select_ca_certs(pem: bytes, signing_key: SigningKey) -> tuple[bytes, bytes]:
    """From a user's PEM bundle (a KDS cert_chain, or trustee's ASK+ARK+ASVK file), pick the
    ASK (or ASVK for a VLEK) and the ARK by their AMD common names. Returns DER (ask, ark)."""
    certs = parse_pem_chain(pem, "AMD certificate bundle")
    vlek = signing_key is SigningKey.VLEK
    arks: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for cert in certs:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(names[0].value) if len(names) == 1 else ""
        if cn.startswith("ARK-"):
            arks.append(cert)
        elif cn.startswith("SEV-VLEK-") if vlek else (cn.startswith("SEV-") and not cn.startswith("SEV-VLEK-")):
            intermediates.append(cert)
    role = "ASVK (CN=SEV-VLEK-<product>)" if vlek else "ASK (CN=SEV-<product>)"
    if len(arks) != 1 or len(intermediates) != 1:
        raise ParseError(
            f"the AMD certificate bundle must hold one ARK (CN=ARK-<product>) and one {role}; "
            f"found {len(arks)} and {len(intermediates)}")
    return intermediates[0].public_bytes(Encoding.DER), arks[0].public_bytes(Encoding.DER)


def _validate_vcek(body: bytes) -> None:
    load_certificate(body, "VCEK from the KDS")


def _validate_chain(signing_key: SigningKey) -> Callable[[bytes], None]:
    def validate(body: bytes) -> None:
        parse_cert_chain(body, signing_key)
    return validate


def _validate_crl(body: bytes) -> None:
    load_crl(body, "AMD CRL")


class KdsClient:
    """Fetches VCEKs, CA chains and CRLs from the AMD KDS through an on-disk cache.

    ``base_url`` is the KDS (tests point it at a loopback server); ``session`` an optional
    aiohttp session to reuse (otherwise one is opened on first use and closed by
    :meth:`aclose`).
    """

    def __init__(self, *, base_url: str = KDS_BASE_URL, cache_dir: Path | None = None, offline: bool = False,
                 session: aiohttp.ClientSession | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "kds"
        self.offline = offline
        self._session = session
        self._own_session = False
        self._timeout = timeout

    async def __aenter__(self) -> KdsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session this client opened (a session passed in stays open)."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
            self._own_session = False

    async def vcek(self, product: str, chip_id: bytes, tcb: TcbParts) -> bytes:
        """The DER VCEK of ``chip_id`` at ``tcb``."""
        if not any(chip_id):
            raise CollateralError(
                "CHIP_ID is masked (all zero), so the KDS cannot be asked for this chip's VCEK; "
                "supply the VCEK from the report's certificate table or a file")
        path = vcek_path(product, chip_id, tcb)
        hwid, _, query = path.rsplit("/", 1)[1].partition("?")
        name = f"{hwid}_{query.replace('&', '_').replace('=', '-')}.der"
        return await self._fetch(path, self.cache_dir / "vcek" / product / name, _validate_vcek,
                                 f"the {product} VCEK for this chip and TCB")

    async def cert_chain(self, product: str, signing_key: SigningKey = SigningKey.VCEK) -> tuple[bytes, bytes]:
        """DER (ASK or ASVK, ARK) for ``product``."""
        path = cert_chain_path(product, signing_key)
        body = await self._fetch(path, self.cache_dir / "cert_chain" / f"{_kind(signing_key)}_{product}.pem",
                                 _validate_chain(signing_key), f"the {product} {_kind(signing_key).upper()} CA chain")
        return parse_cert_chain(body, signing_key)

    async def crl(self, product: str, signing_key: SigningKey = SigningKey.VCEK, *,
                  now: datetime | None = None) -> bytes:
        """The DER CRL for ``product``; a cached one is reused until its nextUpdate."""
        moment = now or datetime.now(timezone.utc)

        def fresh(body: bytes) -> bool:
            next_update = load_crl(body, "cached AMD CRL").next_update_utc
            return next_update is not None and moment < next_update

        return await self._fetch(crl_path(product, signing_key),
                                 self.cache_dir / "crl" / f"{_kind(signing_key)}_{product}.der",
                                 _validate_crl, f"the {product} CRL", fresh=fresh)

    async def _fetch(self, path: str, cache_file: Path, validate: Callable[[bytes], None], what: str,
                     fresh: Callable[[bytes], bool] | None = None) -> bytes:
        cached = _read_valid(cache_file, validate)
        if cached is not None and (self.offline or fresh is None or fresh(cached)):
            return cached
        if self.offline:
            raise CollateralError(
                f"offline: {what} is not in the KDS cache (expected {cache_file}); "
                "run once with network access or supply the certificates yourself")
        body = await self._get(path, what)
        try:
            validate(body)
        except ParseError as error:
            raise CollateralError(f"AMD KDS answered {self.base_url}{path} with something unusable: {error}") from None
        _write_atomic(cache_file, body)
        return body

    async def _get(self, path: str, what: str) -> bytes:
        url = self.base_url + path
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self._timeout),
                                         allow_redirects=False) as response:
                if response.status == 429:
                    retry = response.headers.get("Retry-After", "a few")
                    raise CollateralError(f"AMD KDS rate-limits requests: retry {what} after {retry} seconds")
                if response.status == 404:
                    raise CollateralError(f"AMD KDS has no {what} ({url} answered 404)")
                if response.status != 200:
                    raise CollateralError(f"AMD KDS answered HTTP {response.status} for {what} ({url})")
                body = await response.content.read(MAX_RESPONSE + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            reason = str(error) or type(error).__name__
            raise CollateralError(f"cannot fetch {what} from AMD KDS ({url}): {reason}") from None
        if len(body) > MAX_RESPONSE:
            raise CollateralError(f"AMD KDS answer for {what} exceeds {MAX_RESPONSE} bytes")
        return body


def _read_valid(path: Path, validate: Callable[[bytes], None]) -> bytes | None:
    try:
        body = path.read_bytes()
        validate(body)
    except (OSError, ParseError):
        return None
    return body


def _write_atomic(path: Path, body: bytes) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
        os.replace(tmp, path)
    except OSError as error:
        raise CollateralError(f"cannot write the KDS cache file {path}: {error}") from None


def _product_of(report: SnpReport, vek: bytes | None, product: str | None) -> str | None:
    if product is not None:
        return _product(product)
    if report.product is not None:
        return report.product
    if vek is not None:
        return parse_vek_extensions(load_certificate(vek, report.signing_key.name), report.signing_key).product
    return None


async def gather_chain(
    report: SnpReport,
    *,
    cert_table: CertTable | None = None,
    vek: bytes | None = None,
    ca_bundle: bytes | None = None,
    client: KdsClient | None = None,
    product: str | None = None,
) -> SnpCertChain:
    """The certificate chain for ``report``, each certificate from the first source that has
    it: the user's ``vek`` (DER or PEM) and ``ca_bundle`` (PEM), then the report's certificate
    table, then the KDS through ``client`` (None: no fetching). ``product`` names the CPU line
    of a version-2 report when no VCEK is at hand to tell it."""
    if not isinstance(report, SnpReport) or not isinstance(cert_table, (CertTable, type(None))):
        raise ParseError("gather_chain needs a parsed SnpReport and, optionally, a parsed CertTable")
    kind = report.signing_key
    if kind is SigningKey.NONE:
        raise CollateralError("the report is unsigned (SIGNING_KEY = 7): there is no certificate chain for it")
    table = cert_table or CertTable()
    vek_der = certificate_der(vek, f"user-supplied {kind.name}") if vek is not None else (
        table.vlek if kind is SigningKey.VLEK else table.vcek)
    ask, ark = select_ca_certs(ca_bundle, kind) if ca_bundle is not None else (table.ask, table.ark)
    if vek_der is not None and ask is not None and ark is not None:
        return SnpCertChain(kind, vek_der, ask, ark)
    missing = ([kind.name] if vek_der is None else []) + (
        [("ASVK" if kind is SigningKey.VLEK else "ASK") + "/ARK"] if ask is None or ark is None else [])
    if client is None:
        raise CollateralError(
            f"missing {' and '.join(missing)} certificate(s): supply them or allow fetching from the AMD KDS")
    line = _product_of(report, vek_der, product)
    if line is None:
        raise CollateralError(
            "cannot tell whether this version-2 report comes from a Milan, Genoa or Turin CPU: "
            "name the product or supply the VCEK")
    if vek_der is None:
        if kind is SigningKey.VLEK:
            raise CollateralError(
                "the report is VLEK-signed and VLEK certificates are not public: take the VLEK from the "
                "report's certificate table (extended report) or from the cloud provider")
        vek_der = await client.vcek(line, report.chip_id, report.reported_tcb.decode(line))
    if ask is None or ark is None:
        ask, ark = await client.cert_chain(line, kind)
    return SnpCertChain(kind, vek_der, ask, ark)
