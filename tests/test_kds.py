"""AMD KDS client against a loopback aiohttp server that serves the recorded AMD files
(the vendor endpoint is the one thing faked), the disk cache, offline mode, and the other
certificate sources (the report's certificate table, user files)."""
from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from attest.errors import CollateralError, ParseError
from attest.kds import (
    KdsClient,
    cert_chain_path,
    certificate_der,
    crl_path,
    gather_chain,
    parse_cert_chain,
    select_ca_certs,
    vcek_path,
)
from attest.snp import SigningKey, SnpReport, TcbParts, TcbVersion, parse_report
from attest.snp_certs import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTableEntry,
    encode_cert_table,
    parse_cert_table,
)
from attest.snp_verify import verify_report, verify_vek_chain

UTC = timezone.utc
NOW = datetime(2025, 6, 1, tzinfo=UTC)
MILAN_CHIP = ("d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc"
              "15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6")


@dataclass
class FakeKds:
    """Serves ``routes`` (path with query → (status, body)); records every request path."""

    base_url: str = ""
    routes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
async def kds(vectors: Path) -> AsyncIterator[FakeKds]:
    fake = FakeKds()
    snp = vectors / "tee" / "snp"
    roots = vectors / "tee" / "roots" / "amd"
    fake.routes.update({
        f"/vcek/v1/Milan/{MILAN_CHIP}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115":
            (200, (snp / "virtee-sev" / "vcek_milan.der").read_bytes()),
        "/vcek/v1/Milan/cert_chain": (200, (snp / "virtee-sev" / "cert_chain_milan").read_bytes()),
        "/vlek/v1/Milan/cert_chain": (200, (roots / "go-sev-guest_ask_ark_milan_vlek.pem").read_bytes()),
        "/vcek/v1/Turin/1e550a8ee5cf9f4d?fmcSPL=00&blSPL=00&teeSPL=00&snpSPL=00&ucodeSPL=09":
            (200, (snp / "virtee-sev" / "vcek_turin.der").read_bytes()),
        "/vcek/v1/Turin/cert_chain": (200, (snp / "virtee-sev" / "cert_chain_turin").read_bytes()),
    })

    async def handler(request: web.Request) -> web.Response:
        fake.requests.append(request.path_qs)
        status, body = fake.routes.get(request.path_qs, (404, b"not found"))
        headers = {"Retry-After": "7"} if status == 429 else {}
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base_url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def client(kds: FakeKds, tmp_path: Path) -> AsyncIterator[KdsClient]:
    async with KdsClient(base_url=kds.base_url, cache_dir=tmp_path / "kds", timeout=5) as kds_client:
        yield kds_client


@pytest.fixture(scope="module")
def milan_report(vectors: Path) -> SnpReport:
    return parse_report((vectors / "tee" / "snp" / "virtee-sev" / "report_milan.bin").read_bytes())


def turin_report(vectors: Path) -> SnpReport:
    """A structurally valid v3 Turin report for the recorded Turin VCEK (unsigned: only the
    KDS lookup is exercised here)."""
    raw = bytearray((vectors / "tee" / "snp" / "virtee-sev" / "report_milan.bin").read_bytes())
    struct.pack_into("<I", raw, 0, 3)
    raw[0x188:0x18B] = b"\x1a\x02\x00"
    tcb = TcbVersion.compose(TcbParts("Turin", bootloader=0, tee=0, snp=0, microcode=9, fmc=0, reserved=bytes(3)))
    struct.pack_into("<Q", raw, 0x180, tcb.raw)
    raw[0x1A0:0x1E0] = bytes.fromhex("1e550a8ee5cf9f4d") + bytes(56)
    return parse_report(bytes(raw))


def test_paths() -> None:
    chip = bytes(range(64))
    milan = TcbParts("Milan", bootloader=3, tee=0, snp=8, microcode=115, fmc=None, reserved=bytes(4))
    assert vcek_path("Milan", chip, milan) == f"/vcek/v1/Milan/{chip.hex()}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115"
    turin = TcbParts("Turin", bootloader=1, tee=2, snp=3, microcode=4, fmc=5, reserved=bytes(3))
    assert vcek_path("Turin", chip, turin) == (
        "/vcek/v1/Turin/0001020304050607?fmcSPL=05&blSPL=01&teeSPL=02&snpSPL=03&ucodeSPL=04")
    assert cert_chain_path("Genoa") == "/vcek/v1/Genoa/cert_chain"
    assert cert_chain_path("Genoa", SigningKey.VLEK) == "/vlek/v1/Genoa/cert_chain"
    assert crl_path("Turin", SigningKey.VLEK) == "/vlek/v1/Turin/crl"
    with pytest.raises(CollateralError, match="unknown SEV-SNP product 'Rome'"):
        cert_chain_path("Rome")
    with pytest.raises(CollateralError, match="not NONE"):
        crl_path("Milan", SigningKey.NONE)
    with pytest.raises(CollateralError, match="decoded for Milan"):
        vcek_path("Turin", chip, milan)


async def test_fetch_vcek_and_chain_then_verify(kds: FakeKds, client: KdsClient, milan_report: SnpReport,
                                                tmp_path: Path) -> None:
    chain = await gather_chain(milan_report, client=client, product="Milan")
    assert kds.requests == [f"/vcek/v1/Milan/{MILAN_CHIP}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115",
                            "/vcek/v1/Milan/cert_chain"]
    assert verify_report(milan_report, chain, NOW).product == "Milan"
    assert await gather_chain(milan_report, client=client, product="Milan") == chain
    assert len(kds.requests) == 2, "the second lookup must come from the disk cache"
    offline = KdsClient(base_url="http://127.0.0.1:9", cache_dir=tmp_path / "kds", offline=True)
    assert await gather_chain(milan_report, client=offline, product="Milan") == chain
    cached = sorted(str(path.relative_to(tmp_path / "kds")) for path in (tmp_path / "kds").rglob("*") if path.is_file())
    assert cached == ["cert_chain/vcek_Milan.pem",
                      f"vcek/Milan/{MILAN_CHIP}_blSPL-03_teeSPL-00_snpSPL-08_ucodeSPL-115.der"]


async def test_turin_lookup_uses_fmc_and_eight_byte_hwid(vectors: Path, kds: FakeKds, client: KdsClient) -> None:
    report = turin_report(vectors)
    chain = await gather_chain(report, client=client)
    assert kds.requests[0] == "/vcek/v1/Turin/1e550a8ee5cf9f4d?fmcSPL=00&blSPL=00&teeSPL=00&snpSPL=00&ucodeSPL=09"
    verified = verify_vek_chain(chain, NOW)
    assert verified.product == "Turin"
    assert TcbVersion.compose(verified.extensions.tcb) == report.reported_tcb


async def test_vlek_chain_from_table_and_kds(vectors: Path, kds: FakeKds, client: KdsClient) -> None:
    snp = vectors / "tee" / "snp" / "trustee"
    report = parse_report((snp / "test-vlek-report.bin").read_bytes())
    table = parse_cert_table(encode_cert_table([CertTableEntry(VLEK_GUID, (snp / "test-vlek.der").read_bytes())]))
    chain = await gather_chain(report, cert_table=table, client=client)
    assert kds.requests == ["/vlek/v1/Milan/cert_chain"]
    assert verify_report(report, chain, NOW).signing_key == "VLEK"
    with pytest.raises(CollateralError, match="VLEK certificates are not public"):
        await gather_chain(report, client=client)


async def test_complete_table_needs_no_network(vectors: Path, milan_report: SnpReport) -> None:
    snp = vectors / "tee" / "snp" / "virtee-sev"
    ask, ark = parse_cert_chain((snp / "cert_chain_milan").read_bytes())
    table = parse_cert_table(encode_cert_table([
        CertTableEntry(VCEK_GUID, (snp / "vcek_milan.der").read_bytes()), CertTableEntry(ASK_GUID, ask),
        CertTableEntry(ARK_GUID, ark)]))
    chain = await gather_chain(milan_report, cert_table=table)
    assert verify_report(milan_report, chain, NOW).chip_id_checked


async def test_user_files(vectors: Path, milan_report: SnpReport) -> None:
    snp = vectors / "tee" / "snp"
    vcek_der = (snp / "virtee-sev" / "vcek_milan.der").read_bytes()
    body = base64.encodebytes(vcek_der).decode().replace("\n", "")
    vcek_pem = ("-----BEGIN CERTIFICATE-----\n" + "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
                + "\n-----END CERTIFICATE-----\n").encode()
    assert certificate_der(vcek_pem, "VCEK file") == certificate_der(vcek_der, "VCEK file") == vcek_der
    bundle = (vectors / "tee" / "roots" / "amd" / "trustee_milan_ask_ark_asvk.pem").read_bytes()
    chain = await gather_chain(milan_report, vek=vcek_pem, ca_bundle=bundle)
    assert verify_report(milan_report, chain, NOW).product == "Milan"
    asvk, ark = select_ca_certs(bundle, SigningKey.VLEK)
    assert x509.load_der_x509_certificate(asvk).subject.rfc4514_string().startswith("CN=SEV-VLEK-Milan")
    assert ark == chain.ark
    with pytest.raises(ParseError, match="one ARK .* and one ASVK"):
        select_ca_certs((snp / "virtee-sev" / "cert_chain_milan").read_bytes(), SigningKey.VLEK)
    with pytest.raises(ParseError, match="holds 2 certificates"):
        certificate_der(bundle[:bundle.index(b"-----END CERTIFICATE-----", 3000) + 25], "VCEK file")
    with pytest.raises(ParseError):
        certificate_der(b"garbage", "VCEK file")
    with pytest.raises(CollateralError, match="missing VCEK certificate"):
        await gather_chain(milan_report, ca_bundle=bundle)
    with pytest.raises(CollateralError, match="missing ASK/ARK"):
        await gather_chain(milan_report, vek=vcek_der)


async def test_product_of_v2_report_from_user_vcek(vectors: Path, kds: FakeKds, client: KdsClient,
                                                   milan_report: SnpReport) -> None:
    with pytest.raises(CollateralError, match="Milan, Genoa or Turin"):
        await gather_chain(milan_report, client=client)
    vcek = (vectors / "tee" / "snp" / "virtee-sev" / "vcek_milan.der").read_bytes()
    chain = await gather_chain(milan_report, vek=vcek, client=client)
    assert kds.requests == ["/vcek/v1/Milan/cert_chain"]
    assert verify_report(milan_report, chain, NOW)


async def test_offline_without_cache_names_the_file(tmp_path: Path, milan_report: SnpReport) -> None:
    offline = KdsClient(base_url="http://127.0.0.1:9", cache_dir=tmp_path, offline=True)
    with pytest.raises(CollateralError, match=f"offline: .* not in the KDS cache \\(expected {tmp_path}/vcek/Milan/"):
        await gather_chain(milan_report, client=offline, product="Milan")


async def test_http_errors_are_collateral_errors(kds: FakeKds, client: KdsClient, tmp_path: Path) -> None:
    kds.routes["/vcek/v1/Genoa/cert_chain"] = (429, b"")
    with pytest.raises(CollateralError, match="rate-limits .* after 7 seconds"):
        await client.cert_chain("Genoa")
    kds.routes["/vcek/v1/Genoa/cert_chain"] = (500, b"")
    with pytest.raises(CollateralError, match="HTTP 500"):
        await client.cert_chain("Genoa")
    with pytest.raises(CollateralError, match="404"):
        await client.cert_chain("Turin", SigningKey.VLEK)
    kds.routes["/vcek/v1/Genoa/cert_chain"] = (200, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CollateralError, match="unusable"):
        await client.cert_chain("Genoa")
    assert not (tmp_path / "kds" / "cert_chain" / "vcek_Genoa.pem").exists()
    unreachable = KdsClient(base_url="http://127.0.0.1:9", cache_dir=tmp_path / "other", timeout=2)
    with pytest.raises(CollateralError, match="cannot fetch"):
        await unreachable.cert_chain("Milan")
    await unreachable.aclose()


async def test_masked_chip_id_cannot_be_looked_up(client: KdsClient) -> None:
    tcb = TcbParts("Milan", bootloader=3, tee=0, snp=8, microcode=115, fmc=None, reserved=bytes(4))
    with pytest.raises(CollateralError, match="CHIP_ID is masked"):
        await client.vcek("Milan", bytes(64), tcb)


async def test_corrupt_cache_entry_is_refetched(kds: FakeKds, client: KdsClient, tmp_path: Path) -> None:
    cached = tmp_path / "kds" / "cert_chain" / "vcek_Milan.pem"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    ask, ark = await client.cert_chain("Milan")
    assert kds.requests == ["/vcek/v1/Milan/cert_chain"]
    assert parse_cert_chain(cached.read_bytes()) == (ask, ark)


def _crl(this_update: datetime, days: int) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ARK-Milan")])
    builder = x509.CertificateRevocationListBuilder().issuer_name(name).last_update(this_update)
    return builder.next_update(this_update + timedelta(days=days)).sign(key, hashes.SHA384()).public_bytes(Encoding.DER)


async def test_crl_is_cached_until_next_update(kds: FakeKds, client: KdsClient) -> None:
    first = _crl(datetime(2025, 1, 1, tzinfo=UTC), 30)
    kds.routes["/vcek/v1/Milan/crl"] = (200, first)
    assert await client.crl("Milan", now=datetime(2025, 1, 2, tzinfo=UTC)) == first
    assert await client.crl("Milan", now=datetime(2025, 1, 20, tzinfo=UTC)) == first
    assert kds.requests == ["/vcek/v1/Milan/crl"]
    second = _crl(datetime(2025, 2, 1, tzinfo=UTC), 30)
    kds.routes["/vcek/v1/Milan/crl"] = (200, second)
    assert await client.crl("Milan", now=datetime(2025, 2, 5, tzinfo=UTC)) == second
    assert len(kds.requests) == 2
    client.offline = True
    assert await client.crl("Milan", now=datetime(2026, 1, 1, tzinfo=UTC)) == second
    kds.routes["/vlek/v1/Milan/crl"] = (200, b"not a crl")
    client.offline = False
    with pytest.raises(CollateralError, match="unusable"):
        await client.crl("Milan", SigningKey.VLEK)
