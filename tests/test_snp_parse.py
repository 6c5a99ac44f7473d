"""SEV-SNP ATTESTATION_REPORT parsing: real reports against EXPECTED.json, layouts, and
every malformation ending in ParseError."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attest.errors import ParseError
from attest.snp import (
    REPORT_LEN,
    SigningKey,
    TcbParts,
    TcbVersion,
    parse_report,
    product_from_cpuid,
)

SNP_VECTORS = {
    "go-sev-guest/attestation.bin": "snp/go-sev-guest/attestation.bin",
    "trustee/test-report.bin": "snp/trustee/test-report.bin",
    "trustee/test-vlek-report.bin (VLEK, AWS)": "snp/trustee/test-vlek-report.bin",
    "virtee-sev/report_milan": "snp/virtee-sev/report_milan.bin",
}


@pytest.fixture(scope="module")
def expected(vectors: Path) -> dict[str, dict]:
    return json.loads((vectors / "tee" / "EXPECTED.json").read_text())


@pytest.fixture(scope="module")
def milan_report(vectors: Path) -> bytes:
    return (vectors / "tee" / "snp" / "virtee-sev" / "report_milan.bin").read_bytes()


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(data)
    out[offset:offset + len(value)] = value
    return bytes(out)


@pytest.mark.parametrize("key", sorted(SNP_VECTORS))
def test_vectors_parse_to_expected_fields(vectors: Path, expected: dict[str, dict], key: str) -> None:
    want = expected[key]
    raw = (vectors / "tee" / want["file"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == want["sha256"]
    report = parse_report(raw)
    # Every report here is from a Milan; v2 reports do not say so, so decode as Milan.
    product = report.product or "Milan"
    assert report.version == want["version"]
    assert report.guest_svn == want["guest_svn"]
    assert report.policy.raw == want["policy"]
    assert report.debug_allowed is want["debug_allowed"]
    assert report.vmpl == want["vmpl"]
    assert report.platform_info.raw == want["platform_info"]
    assert report.signing_key.name == want["signing_key"]
    assert report.chip_id.hex() == want["chip_id"]
    assert report.measurement.hex() == want["measurement"]
    assert report.report_data.hex() == want["report_data"]
    assert report.host_data.hex() == want["host_data"]
    assert report.id_key_digest.hex() == want["id_key_digest"]
    assert report.reported_tcb.decode(product).as_dict() == want["reported_tcb_decoded"]
    assert report.current_tcb.decode(product).as_dict() == want["current_tcb_decoded"]
    assert report.signed_bytes == raw[:0x2A0]
    assert report.raw == raw


def test_go_sev_guest_policy_has_debug(vectors: Path) -> None:
    report = parse_report((vectors / "tee" / "snp" / "go-sev-guest" / "attestation.bin").read_bytes())
    policy = report.policy
    assert (policy.abi_major, policy.abi_minor) == (0, 0)
    assert policy.smt and policy.debug and not policy.migrate_ma and not policy.single_socket
    assert report.signer_info == report.signer_info.__class__(False, False, SigningKey.VCEK)
    assert report.cpuid_fam_id is None and report.product is None
    assert report.launch_mit_vector is None and report.current_mit_vector is None
    assert (report.current_major, report.current_minor, report.current_build) == (1, 49, 3)


def test_vlek_report_is_v3_milan_with_masked_chip_id(vectors: Path) -> None:
    report = parse_report((vectors / "tee" / "snp" / "trustee" / "test-vlek-report.bin").read_bytes())
    assert report.version == 3
    assert (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == (0x19, 0x01, 0x01)
    assert report.product == "Milan"
    assert report.signing_key is SigningKey.VLEK
    assert report.chip_id_masked
    assert report.platform_info.smt_enabled and report.platform_info.tsme_enabled
    assert report.platform_info.ecc_enabled and report.platform_info.alias_check_complete
    assert not report.platform_info.rapl_disabled


def test_trustee_report_current_differs_from_reported(vectors: Path) -> None:
    report = parse_report((vectors / "tee" / "snp" / "trustee" / "test-report.bin").read_bytes())
    assert report.current_tcb != report.reported_tcb
    assert report.committed_tcb == report.reported_tcb == report.launch_tcb
    assert str(report.reported_tcb.decode("Milan")) == "bl=3 tee=0 snp=8 ucode=115"


def test_version_5_mitigation_vectors_and_turin_cpuid(milan_report: bytes) -> None:
    raw = _patch(milan_report, 0x00, struct.pack("<I", 5))
    raw = _patch(raw, 0x188, bytes([0x1A, 0x02, 0x00]))
    raw = _patch(raw, 0x1F8, struct.pack("<QQ", 0x11, 0x13))
    report = parse_report(raw)
    assert (report.launch_mit_vector, report.current_mit_vector) == (0x11, 0x13)
    assert report.product == "Turin"


def test_version_3_rejects_mitigation_vectors(milan_report: bytes) -> None:
    raw = _patch(_patch(milan_report, 0x00, struct.pack("<I", 3)), 0x1F8, b"\x01")
    with pytest.raises(ParseError, match="mitigation vectors exist from version 5"):
        parse_report(raw)


@pytest.mark.parametrize(("family", "model", "product"), [
    (0x19, 0x01, "Milan"), (0x19, 0x11, "Genoa"), (0x19, 0xA0, "Genoa"), (0x1A, 0x02, "Turin"),
    (0x1A, 0x11, "Turin"), (0x19, 0x21, None), (0x17, 0x31, None), (0x1A, 0x50, None),
])
def test_product_from_cpuid(family: int, model: int, product: str | None) -> None:
    assert product_from_cpuid(family, model) == product


def test_tcb_layouts() -> None:
    raw = TcbVersion(int.from_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 8]), "little"))
    milan = raw.decode("Milan")
    assert (milan.bootloader, milan.tee, milan.snp, milan.microcode, milan.fmc) == (1, 2, 7, 8, None)
    assert milan.reserved == bytes([3, 4, 5, 6])
    turin = raw.decode("Turin")
    assert (turin.fmc, turin.bootloader, turin.tee, turin.snp, turin.microcode) == (1, 2, 3, 4, 8)
    assert turin.as_dict() == {"fmc": 1, "bl": 2, "tee": 3, "snp": 4, "ucode": 8}
    for product in ("Milan", "Genoa", "Turin"):
        assert TcbVersion.compose(raw.decode(product)) == raw
    assert raw.decode("Genoa").le(raw.decode("Genoa"))
    lower = TcbVersion.compose(TcbParts("Turin", 1, 0, 0, 0, 0, bytes(3))).decode("Turin")
    assert lower.le(turin) and not turin.le(lower)
    with pytest.raises(ParseError, match="cannot compare"):
        milan.le(turin)
    with pytest.raises(ParseError, match="unknown SEV-SNP product"):
        raw.decode("Rome")


@pytest.mark.parametrize("length", [0, 1, 0x2A0, REPORT_LEN - 1, REPORT_LEN + 1, 4096])
def test_wrong_size(milan_report: bytes, length: int) -> None:
    data = (milan_report * 4)[:length]
    with pytest.raises(ParseError, match=f"is {length} bytes"):
        parse_report(data)


@pytest.mark.parametrize(("offset", "value", "message"), [
    (0x00, struct.pack("<I", 1), "VERSION .* is 1"),
    (0x00, struct.pack("<I", 4), "VERSION .* is 4"),
    (0x00, struct.pack("<I", 6), "VERSION .* is 6"),
    (0x34, struct.pack("<I", 0), "SIGNATURE_ALGO .* is 0"),
    (0x34, struct.pack("<I", 2), "SIGNATURE_ALGO .* is 2"),
    (0x08, struct.pack("<Q", 0x10000), "reserved bit 17 must be 1"),
    (0x08, struct.pack("<Q", 0x30000 | 1 << 26), "bits 63:26 must be 0"),
    (0x08, struct.pack("<Q", 0x30000 | 1 << 63), "bits 63:26 must be 0"),
    (0x48, struct.pack("<I", 1 << 5), "SIGNER_INFO .* bits 31:5"),
    (0x48, struct.pack("<I", 2 << 2), "values 2-6 are reserved"),
    (0x48, struct.pack("<I", 6 << 2), "values 2-6 are reserved"),
    (0x4C, b"\x01", r"\[0x04C, 0x050\)"),
    (0x188, b"\x19", "CPUID fields exist from version 3"),
    (0x19F, b"\x01", r"\[0x188, 0x1A0\)"),
    (0x1EB, b"\x01", "after CURRENT_MAJOR"),
    (0x1EF, b"\x01", "after COMMITTED_MAJOR"),
    (0x1F8, b"\x01", "mitigation vectors exist from version 5"),
    (0x29F, b"\x01", r"\[0x1F8, 0x2A0\)"),
    (0x2A0 + 48, b"\x01", "signature R high bytes"),
    (0x2A0 + 72 + 71, b"\x01", "signature S high bytes"),
    (0x2A0 + 144, b"\x01", "reserved signature field"),
    (0x49F, b"\x01", "reserved signature field"),
])
def test_malformed_fields(milan_report: bytes, offset: int, value: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_report(_patch(milan_report, offset, value))


def test_v3_and_v5_reserved_ranges(milan_report: bytes) -> None:
    v3 = _patch(milan_report, 0x00, struct.pack("<I", 3))
    assert parse_report(_patch(v3, 0x188, b"\x19\x01\x01")).product == "Milan"
    with pytest.raises(ParseError, match=r"\[0x18B, 0x1A0\)"):
        parse_report(_patch(v3, 0x18B, b"\x01"))
    v5 = _patch(milan_report, 0x00, struct.pack("<I", 5))
    with pytest.raises(ParseError, match=r"\[0x208, 0x2A0\)"):
        parse_report(_patch(v5, 0x208, b"\x01"))


@pytest.mark.parametrize("value", [None, "02000000", 1184, [0] * 1184])
def test_wrong_types(value: object) -> None:
    with pytest.raises(ParseError, match="must be bytes"):
        parse_report(value)  # type: ignore[arg-type]


def test_bytearray_and_memoryview(milan_report: bytes) -> None:
    assert parse_report(bytearray(milan_report)) == parse_report(memoryview(milan_report))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * REPORT_LEN))
def test_garbage_is_parse_error(data: bytes) -> None:
    try:
        parse_report(data)
    except ParseError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_reports_parse_or_raise_parse_error(milan_report: bytes, data: st.DataObject) -> None:
    mutated = bytearray(milan_report)
    for _ in range(data.draw(st.integers(1, 8))):
        mutated[data.draw(st.integers(0, REPORT_LEN - 1))] = data.draw(st.integers(0, 255))
    try:
        report = parse_report(bytes(mutated))
    except ParseError:
        return
    for product in ("Milan", "Turin"):
        report.reported_tcb.decode(product)
