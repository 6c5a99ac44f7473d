"""SEV-SNP verification: real reports and AMD chains (roots pinned in attest.roots), and a
test-generated AMD-shaped hierarchy for what no recorded vector covers (Turin reports,
CRLs, malformed certificate profiles)."""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from attest.errors import AttestError, ParseError, VerificationError
from attest.roots import AMD_ARK_SHA256, pinned_amd_product
from attest.snp import SigningKey, TcbParts, TcbVersion, parse_report
from attest.snp_certs import SnpCertChain
from attest.snp_verify import (
    CertificateChainError,
    CertificateValidityError,
    ChipIdMismatchError,
    ProductMismatchError,
    ReportSignatureError,
    RevokedError,
    SigningKeyMismatchError,
    SnpVerificationError,
    TcbMismatchError,
    UntrustedRootError,
    verify_report,
    verify_vek_chain,
)
from attest.x509util import fingerprint, parse_pem_chain

UTC = timezone.utc
GO_SEV_GUEST_NOW = datetime(2022, 9, 24, 1, 0, tzinfo=UTC)
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def _pem(path: Path) -> list[bytes]:
    return [cert.public_bytes(Encoding.DER) for cert in parse_pem_chain(path.read_bytes(), path.name)]


@pytest.fixture(scope="module")
def snp(vectors: Path) -> Path:
    return vectors / "tee" / "snp"


@pytest.fixture(scope="module")
def roots(vectors: Path) -> dict[str, list[bytes]]:
    """AMD roots as published by go-sev-guest and virtee, keyed by file stem."""
    amd = vectors / "tee" / "roots" / "amd"
    return {path.stem: _pem(path) for path in sorted(amd.glob("*.pem"))}


def _chain(snp: Path, vek: str, ca: list[bytes], kind: SigningKey = SigningKey.VCEK) -> SnpCertChain:
    return SnpCertChain(kind, (snp / vek).read_bytes(), ca[0], ca[1])


def test_vendor_roots_match_the_pins(roots: dict[str, list[bytes]]) -> None:
    for stem, product in (("virtee_milan_ark", "Milan"), ("virtee_genoa_ark", "Genoa"), ("virtee_turin_ark", "Turin")):
        cert = x509.load_der_x509_certificate(roots[stem][0])
        assert pinned_amd_product(cert) == product
        assert fingerprint(cert) == AMD_ARK_SHA256[product]


def test_go_sev_guest_report_verifies_and_exposes_debug(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "go-sev-guest/vcek.testcer", roots["go-sev-guest_ask_ark_milan"])
    result = verify_report((snp / "go-sev-guest" / "attestation.bin").read_bytes(), chain, GO_SEV_GUEST_NOW)
    assert (result.product, result.signing_key, result.chip_id_checked) == ("Milan", "VCEK", True)
    assert result.reported_tcb.as_dict() == {"bl": 2, "tee": 0, "snp": 5, "ucode": 68}
    assert result.report.debug_allowed
    assert result.extensions.product_name == "Milan-B0" and result.extensions.stepping == "B0"
    assert result.extensions.hwid == result.report.chip_id


def test_virtee_milan_report_verifies(snp: Path, roots: dict[str, list[bytes]]) -> None:
    ca = [roots["virtee_milan_ask"][0], roots["virtee_milan_ark"][0]]
    result = verify_report((snp / "virtee-sev" / "report_milan.bin").read_bytes(),
                           _chain(snp, "virtee-sev/vcek_milan.der", ca), NOW)
    assert result.product == "Milan" and not result.report.debug_allowed
    assert str(result.reported_tcb) == "bl=3 tee=0 snp=8 ucode=115"


def test_trustee_report_verifies_against_reported_not_current_tcb(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "trustee/test-vcek.der", roots["trustee_milan_ask_ark_asvk"][:2])
    result = verify_report(parse_report((snp / "trustee" / "test-report.bin").read_bytes()), chain, NOW)
    assert result.report.current_tcb.decode("Milan").microcode == 206
    assert result.reported_tcb.microcode == 115 == result.extensions.tcb.microcode


def test_vlek_report_verifies_only_within_the_vlek_validity(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "trustee/test-vlek.der", roots["go-sev-guest_ask_ark_milan_vlek"], SigningKey.VLEK)
    report = (snp / "trustee" / "test-vlek-report.bin").read_bytes()
    for now in (datetime(2024, 12, 10, 22, 15, tzinfo=UTC), NOW, datetime(2025, 12, 10, 22, 14, tzinfo=UTC)):
        result = verify_report(report, chain, now)
        assert (result.product, result.signing_key, result.chip_id_checked) == ("Milan", "VLEK", False)
        assert result.extensions.csp_id == "CN=cc-us-east-2.amazonaws.com" and result.extensions.hwid is None
    with pytest.raises(CertificateValidityError, match="VLEK certificate .* is not valid before 2024-12-10T22:14:21Z"):
        verify_report(report, chain, datetime(2024, 12, 10, tzinfo=UTC))
    with pytest.raises(CertificateValidityError, match="VLEK certificate .* expired at 2025-12-10T22:14:21Z"):
        verify_report(report, chain, datetime(2025, 12, 11, tzinfo=UTC))


def test_turin_vcek_chains_to_ark_turin(snp: Path, roots: dict[str, list[bytes]]) -> None:
    for ca in (_pem(snp / "virtee-sev" / "cert_chain_turin"), roots["go-sev-guest_ask_ark_turin_vcek"]):
        verified = verify_vek_chain(_chain(snp, "virtee-sev/vcek_turin.der", ca), NOW)
        assert (verified.product, verified.signing_key) == ("Turin", "VCEK")
        assert verified.extensions.hwid == bytes.fromhex("1e550a8ee5cf9f4d")
        assert verified.extensions.tcb.as_dict() == {"fmc": 0, "bl": 0, "tee": 0, "snp": 0, "ucode": 9}


def test_wrong_product_chain_is_rejected(snp: Path, roots: dict[str, list[bytes]]) -> None:
    report = (snp / "virtee-sev" / "report_milan.bin").read_bytes()
    for stem in ("go-sev-guest_ask_ark_genoa", "go-sev-guest_ask_ark_turin_vcek"):
        with pytest.raises(CertificateChainError, match="issuer .* is not the ASK"):
            verify_report(report, _chain(snp, "virtee-sev/vcek_milan.der", roots[stem]), NOW)
    mixed = [roots["go-sev-guest_ask_ark_milan"][0], roots["virtee_genoa_ark"][0]]
    with pytest.raises(CertificateChainError, match="ASK subject"):
        verify_report(report, _chain(snp, "virtee-sev/vcek_milan.der", mixed), NOW)


def test_unpinned_root_is_rejected(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "virtee-sev/vcek_milan.der", roots["go-sev-guest_ask_ark_milan"])
    with pytest.raises(UntrustedRootError, match="is not a pinned AMD root"):
        verify_report((snp / "virtee-sev" / "report_milan.bin").read_bytes(), chain, NOW,
                      ark_fingerprints={"Milan": AMD_ARK_SHA256["Genoa"]})
    with pytest.raises(UntrustedRootError):
        verify_vek_chain(replace(chain, ark=roots["go-sev-guest_ask_ark_milan"][0]), NOW)


def test_vcek_with_other_tcb_is_rejected(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "virtee-sev/vcek_milan.der", roots["go-sev-guest_ask_ark_milan"])
    with pytest.raises(TcbMismatchError, match=r"REPORTED_TCB .*bl=2 tee=0 snp=5 ucode=68.*\(bl=3 tee=0 snp=8"):
        verify_report((snp / "go-sev-guest" / "attestation.bin").read_bytes(), chain, NOW)


def test_vcek_of_another_chip_is_rejected(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "trustee/test-vcek.der", roots["go-sev-guest_ask_ark_milan"])
    with pytest.raises(ChipIdMismatchError, match="another chip"):
        verify_report((snp / "virtee-sev" / "report_milan.bin").read_bytes(), chain, NOW)


def test_signing_key_kind_must_match(snp: Path, roots: dict[str, list[bytes]]) -> None:
    vlek_report = (snp / "trustee" / "test-vlek-report.bin").read_bytes()
    vcek_chain = _chain(snp, "virtee-sev/vcek_milan.der", roots["go-sev-guest_ask_ark_milan"])
    with pytest.raises(SigningKeyMismatchError, match="signed by its VLEK but a VCEK"):
        verify_report(vlek_report, vcek_chain, NOW)
    vlek_as_vcek = _chain(snp, "trustee/test-vlek.der", roots["go-sev-guest_ask_ark_milan_vlek"])
    with pytest.raises(CertificateChainError, match="ASK subject"):
        verify_vek_chain(vlek_as_vcek, NOW)
    vlek_under_ask = _chain(snp, "trustee/test-vlek.der", roots["go-sev-guest_ask_ark_milan"], SigningKey.VLEK)
    with pytest.raises(CertificateChainError, match="ASVK subject"):
        verify_vek_chain(vlek_under_ask, NOW)


def test_cached_chain_is_rechecked_against_now(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "go-sev-guest/vcek.testcer", roots["go-sev-guest_ask_ark_milan"])
    report = (snp / "go-sev-guest" / "attestation.bin").read_bytes()
    verify_report(report, chain, GO_SEV_GUEST_NOW)
    with pytest.raises(CertificateValidityError, match="VCEK certificate .* expired at 2029-09-24T00:55:28Z"):
        verify_report(report, chain, datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(CertificateValidityError, match="not valid before 2022-09-24T00:55:28Z"):
        verify_report(report, chain, datetime(2022, 9, 24, tzinfo=UTC))
    verify_report(report, chain, GO_SEV_GUEST_NOW)


def test_bad_arguments_are_typed_errors(snp: Path, roots: dict[str, list[bytes]]) -> None:
    chain = _chain(snp, "go-sev-guest/vcek.testcer", roots["go-sev-guest_ask_ark_milan"])
    report = (snp / "go-sev-guest" / "attestation.bin").read_bytes()
    with pytest.raises(SnpVerificationError, match="timezone-aware"):
        verify_report(report, chain, datetime(2022, 9, 25))
    with pytest.raises(ParseError):
        verify_report(report[:100], chain, NOW)
    with pytest.raises(ParseError, match="SnpCertChain"):
        verify_report(report, (chain.vek, chain.ask, chain.ark), GO_SEV_GUEST_NOW)  # type: ignore[arg-type]
    with pytest.raises(ParseError, match="VCEK certificate"):
        verify_report(report, replace(chain, vek=b"not a certificate"), GO_SEV_GUEST_NOW)
    with pytest.raises(ParseError, match="must be DER bytes"):
        verify_report(report, replace(chain, ask="pem"), GO_SEV_GUEST_NOW)  # type: ignore[arg-type]


# --- A test-generated hierarchy shaped like AMD's -------------------------------------------

PSS48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
KDS = "1.3.6.1.4.1.3704.1."


def amd_name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _u8(value: int) -> bytes:
    return bytes([2, 2, 0, value]) if value & 0x80 else bytes([2, 1, value])


def turin_extensions(tcb: TcbParts, hwid: bytes) -> dict[str, bytes]:
    return {
        KDS + "1": _u8(1), KDS + "2": b"\x16\x05Turin", KDS + "3.9": _u8(tcb.fmc or 0),
        KDS + "3.1": _u8(tcb.bootloader), KDS + "3.2": _u8(tcb.tee), KDS + "3.3": _u8(tcb.snp),
        KDS + "3.5": _u8(0), KDS + "3.6": _u8(0), KDS + "3.7": _u8(0), KDS + "3.8": _u8(tcb.microcode),
        KDS + "4": hwid,
    }


@dataclass
class Hierarchy:
    """A Turin ARK → ASK → VCEK made at test time, and the means to sign reports and CRLs."""

    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    vcek_key: ec.EllipticCurvePrivateKey
    ark: x509.Certificate
    ask: x509.Certificate
    tcb: TcbParts
    hwid: bytes

    @property
    def pins(self) -> dict[str, str]:
        return {"Turin": fingerprint(self.ark)}

    def vcek(self, *, extensions: dict[str, bytes] | None = None, salt: int = 48,
             extra: Callable[[x509.CertificateBuilder], x509.CertificateBuilder] | None = None) -> bytes:
        builder = (x509.CertificateBuilder().subject_name(amd_name("SEV-VCEK")).issuer_name(self.ask.subject)
                   .public_key(self.vcek_key.public_key()).serial_number(1)
                   .not_valid_before(datetime(2024, 1, 1, tzinfo=UTC))
                   .not_valid_after(datetime(2031, 1, 1, tzinfo=UTC)))
        for oid, value in (extensions or turin_extensions(self.tcb, self.hwid)).items():
            extension = x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)
            builder = builder.add_extension(extension, critical=False)
        if extra is not None:
            builder = extra(builder)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=salt)
        return builder.sign(self.ask_key, hashes.SHA384(), rsa_padding=pss).public_bytes(Encoding.DER)

    def chain(self, vcek: bytes | None = None) -> SnpCertChain:
        return SnpCertChain(SigningKey.VCEK, vcek or self.vcek(), self.ask.public_bytes(Encoding.DER),
                            self.ark.public_bytes(Encoding.DER))

    def report(self, *, version: int = 3, cpuid: bytes = b"\x1a\x02\x00", chip_id: bytes | None = None,
               tcb: TcbVersion | None = None, signer_info: int = 0) -> bytes:
        raw = bytearray(0x4A0)
        struct.pack_into("<IIQ", raw, 0, version, 0, 0x30000)
        struct.pack_into("<IIQQI", raw, 0x30, 0, 1, 0, 0, signer_info)
        raw[0x50:0x90] = bytes(range(64))
        reported = (tcb or TcbVersion.compose(self.tcb)).raw
        for offset in (0x38, 0x180, 0x1E0, 0x1F0):
            struct.pack_into("<Q", raw, offset, reported)
        if version >= 3:
            raw[0x188:0x18B] = cpuid
        raw[0x1A0:0x1E0] = chip_id if chip_id is not None else self.hwid + bytes(56)
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
        raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
        raw[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(raw)

    def crl(self, *, revoked: tuple[int, ...] = (), key: rsa.RSAPrivateKey | None = None,
            this_update: datetime = datetime(2025, 1, 1, tzinfo=UTC), days: int = 365) -> bytes:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ark.subject)
                   .last_update(this_update).next_update(this_update + timedelta(days=days)))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build())
        return builder.sign(key or self.ark_key, hashes.SHA384(), rsa_padding=PSS48).public_bytes(Encoding.DER)


def _ca(subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey, serial: int,
        path_length: int | None, crl_url: str, crl_sign: bool) -> x509.Certificate:
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=crl_sign,
                          encipher_only=False, decipher_only=False)
    point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(serial).not_valid_before(datetime(2023, 5, 15, tzinfo=UTC))
            .not_valid_after(datetime(2048, 5, 15, tzinfo=UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.CRLDistributionPoints([point]), critical=False)
            .sign(signer, hashes.SHA384(), rsa_padding=PSS48))


@pytest.fixture(scope="module")
def turin() -> Hierarchy:
    ark_key = rsa.generate_private_key(65537, 2048)
    ask_key = rsa.generate_private_key(65537, 2048)
    url = "https://kdsintf.amd.com/vcek/v1/Turin/crl"
    ark = _ca(amd_name("ARK-Turin"), amd_name("ARK-Turin"), ark_key, ark_key, 0x30000, None, url, True)
    ask = _ca(amd_name("SEV-Turin"), ark.subject, ask_key, ark_key, 0x30001, 0, url, False)
    tcb = TcbParts("Turin", bootloader=3, tee=1, snp=4, microcode=0x44, fmc=2, reserved=bytes(3))
    return Hierarchy(ark_key, ask_key, ec.generate_private_key(ec.SECP384R1()), ark, ask, tcb,
                     bytes.fromhex("0123456789abcdef"))


def test_turin_report_verifies_with_turin_layout(turin: Hierarchy) -> None:
    result = verify_report(turin.report(), turin.chain(), NOW, ark_fingerprints=turin.pins)
    assert (result.product, result.chip_id_checked) == ("Turin", True)
    assert result.reported_tcb.as_dict() == {"fmc": 2, "bl": 3, "tee": 1, "snp": 4, "ucode": 0x44}
    assert result.report.reported_tcb.decode("Milan").as_dict() != result.reported_tcb.as_dict()


def test_turin_chip_id_compares_first_eight_bytes(turin: Hierarchy) -> None:
    chain = turin.chain()
    for chip_id in (bytes.fromhex("0123456789abcdee") + bytes(56), turin.hwid + b"\x01" + bytes(55)):
        with pytest.raises(ChipIdMismatchError):
            verify_report(turin.report(chip_id=chip_id), chain, NOW, ark_fingerprints=turin.pins)
    masked = verify_report(turin.report(chip_id=bytes(64)), chain, NOW, ark_fingerprints=turin.pins)
    assert not masked.chip_id_checked


def test_turin_tcb_mismatch_and_product_mismatch(turin: Hierarchy) -> None:
    chain, pins = turin.chain(), turin.pins
    other = TcbVersion.compose(replace(turin.tcb, fmc=3))
    with pytest.raises(TcbMismatchError, match="fmc=3"):
        verify_report(turin.report(tcb=other), chain, NOW, ark_fingerprints=pins)
    with pytest.raises(ProductMismatchError, match="is Milan, but the certificates are for Turin"):
        verify_report(turin.report(cpuid=b"\x19\x01\x01"), chain, NOW, ark_fingerprints=pins)
    with pytest.raises(ProductMismatchError, match="not a known SEV-SNP product"):
        verify_report(turin.report(cpuid=b"\x17\x31\x00"), chain, NOW, ark_fingerprints=pins)
    with pytest.raises(ProductMismatchError, match="version 2"):
        verify_report(turin.report(version=2), chain, NOW, ark_fingerprints=pins)


def test_unsigned_and_wrongly_signed_reports(turin: Hierarchy) -> None:
    chain, pins = turin.chain(), turin.pins
    with pytest.raises(ReportSignatureError, match="unsigned"):
        verify_report(turin.report(signer_info=7 << 2), chain, NOW, ark_fingerprints=pins)
    report = bytearray(turin.report())
    report[0x2A0:0x2E8] = (int.from_bytes(report[0x2A0:0x2E8], "little") ^ 1).to_bytes(72, "little")
    with pytest.raises(ReportSignatureError, match="altered"):
        verify_report(bytes(report), chain, NOW, ark_fingerprints=pins)


def test_crl(turin: Hierarchy) -> None:
    chain, pins = turin.chain(), turin.pins
    report = turin.report()
    assert verify_report(report, chain, NOW, crl=turin.crl(revoked=(99,)), ark_fingerprints=pins)
    with pytest.raises(RevokedError, match="revokes the ASK"):
        verify_report(report, chain, NOW, crl=turin.crl(revoked=(turin.ask.serial_number,)), ark_fingerprints=pins)
    with pytest.raises(CertificateValidityError, match="CRL expired at 2025-01-31"):
        verify_report(report, chain, NOW, crl=turin.crl(days=30), ark_fingerprints=pins)
    with pytest.raises(CertificateValidityError, match="CRL is not valid before"):
        verify_report(report, chain, datetime(2024, 6, 1, tzinfo=UTC), crl=turin.crl(), ark_fingerprints=pins)
    with pytest.raises(CertificateChainError, match="CRL signature"):
        verify_report(report, chain, NOW, crl=turin.crl(key=turin.ask_key), ark_fingerprints=pins)
    with pytest.raises(ParseError, match="CRL"):
        verify_report(report, chain, NOW, crl=b"\x30\x03\x02\x01\x00", ark_fingerprints=pins)


def test_salt_other_than_48_is_rejected(turin: Hierarchy) -> None:
    with pytest.raises(CertificateChainError, match="48-byte salt"):
        verify_vek_chain(turin.chain(turin.vcek(salt=32)), NOW, ark_fingerprints=turin.pins)


def _without(key: str, turin: Hierarchy) -> dict[str, bytes]:
    extensions = turin_extensions(turin.tcb, turin.hwid)
    del extensions[key]
    return extensions


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: _without(KDS + "3.9", t), "fmcSPL"),
    (lambda t: _without(KDS + "4", t), "hwID"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "4": bytes(64)}, "hwID extension is 64 bytes"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "2": b"\x16\x04Rome"}, "not a known SEV-SNP product"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "2": b"\x0c\x05Turin"}, "IA5String"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "3.1": b"\x02\x02\x00\x05"}, "minimal"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "3.1": b"\x02\x01\xff"}, "non-negative"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "3.1": b"\x04\x01\x01"}, "INTEGER"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "5": b"\x16\x03CSP"}, "no cspID"),
    (lambda t: {**turin_extensions(t.tcb, t.hwid), KDS + "9": b"\x05\x00"}, "unexpected extension"),
])
def test_malformed_vcek_extensions(turin: Hierarchy, change: Callable[[Hierarchy], dict[str, bytes]],
                                   message: str) -> None:
    with pytest.raises(CertificateChainError, match=message):
        verify_vek_chain(turin.chain(turin.vcek(extensions=change(turin))), NOW, ark_fingerprints=turin.pins)


def test_vcek_of_another_product_is_rejected(turin: Hierarchy) -> None:
    milan = {**turin_extensions(turin.tcb, turin.hwid), KDS + "2": b"\x16\x08Milan-B0", KDS + "3.4": _u8(0),
             KDS + "4": bytes(64)}
    with pytest.raises(ProductMismatchError, match="'Milan-B0' does not belong to the Turin chain"):
        verify_vek_chain(turin.chain(turin.vcek(extensions=milan)), NOW, ark_fingerprints=turin.pins)


def test_hwid_as_octet_string_is_accepted(turin: Hierarchy) -> None:
    extensions = {**turin_extensions(turin.tcb, turin.hwid), KDS + "4": b"\x04\x08" + turin.hwid}
    chain = turin.chain(turin.vcek(extensions=extensions))
    assert verify_report(turin.report(), chain, NOW, ark_fingerprints=turin.pins).chip_id_checked


def test_foreign_vcek_key_and_names_are_rejected(turin: Hierarchy) -> None:
    def wrong_issuer(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        return builder.add_extension(x509.SubjectKeyIdentifier(b"1" * 20), critical=False)
    with pytest.raises(CertificateChainError, match="unexpected extension 2.5.29.14"):
        verify_vek_chain(turin.chain(turin.vcek(extra=wrong_issuer)), NOW, ark_fingerprints=turin.pins)
    p256 = x509.CertificateBuilder().subject_name(amd_name("SEV-VCEK")).issuer_name(turin.ask.subject)
    p256 = p256.public_key(ec.generate_private_key(ec.SECP256R1()).public_key()).serial_number(1)
    p256 = p256.not_valid_before(datetime(2024, 1, 1)).not_valid_after(datetime(2030, 1, 1))
    der = p256.sign(turin.ask_key, hashes.SHA384(), rsa_padding=PSS48).public_bytes(Encoding.DER)
    with pytest.raises(CertificateChainError, match="P-384"):
        verify_vek_chain(turin.chain(der), NOW, ark_fingerprints=turin.pins)


def test_every_failure_is_a_verification_or_parse_error() -> None:
    for error in (UntrustedRootError, CertificateChainError, CertificateValidityError, RevokedError,
                  SigningKeyMismatchError, ProductMismatchError, TcbMismatchError, ChipIdMismatchError,
                  ReportSignatureError):
        assert issubclass(error, VerificationError) and issubclass(error, AttestError)
