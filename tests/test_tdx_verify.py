"""TDX verification verdicts on real quotes at the instants stated in MANIFEST/EXPECTED.json."""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attest.collateral import collateral_from_json
from attest.errors import ParseError, VerificationError
from attest.roots import INTEL_SGX_ROOT_CA_SHA256
from attest.tdx_verify import (
    CertificateChainError,
    CollateralExpiredError,
    CollateralMismatchError,
    SignatureError,
    TcbLevelError,
    converge_status,
    verify_quote,
)

UTC = timezone.utc
T_OK = datetime(2025, 7, 19, 10, 0, 34, tzinfo=UTC)
T_OUTDATED = datetime(2026, 3, 20, 10, 41, 14, tzinfo=UTC)


def _read(vectors, name):
    return (vectors / "tee" / "tdx" / name).read_bytes()


def _col(vectors, name):
    return collateral_from_json((vectors / "tee" / "tdx" / name).read_text())


def test_up_to_date_quote(vectors):
    result = verify_quote(_read(vectors, "dcap-qvl/tdx_quote"), _col(vectors, "dcap-qvl/tdx_quote_collateral.json"), T_OK)
    assert (result.tcb_status, result.qe_status, result.status) == ("UpToDate", "UpToDate", "UpToDate")
    assert result.advisory_ids == () and result.tcb_known
    assert result.fmspc.hex() == "b0c06f000000"
    assert result.tcb_date == datetime(2024, 3, 13, tzinfo=UTC)
    assert result.root_fingerprint == INTEL_SGX_ROOT_CA_SHA256
    assert result.quote.body.report_data.hex().startswith("9a9d48e7")
    assert verify_quote(result.quote, _col(vectors, "dcap-qvl/tdx_quote_collateral.json"), int(T_OK.timestamp())).status == "UpToDate"


def test_expired_one_second_after_collateral(vectors):
    quote, col = _read(vectors, "dcap-qvl/tdx_quote"), _col(vectors, "dcap-qvl/tdx_quote_collateral.json")
    with pytest.raises(VerificationError, match="CRL .* expired at 2025-07-19T10:00:35Z"):
        verify_quote(quote, col, datetime(2025, 7, 19, 10, 0, 35, tzinfo=UTC))  # stale from nextUpdate on
    with pytest.raises(VerificationError, match="expired at 2025-07-19T10:00:35Z \\(now 2025-07-19T10:00:36Z\\)"):
        verify_quote(quote, col, datetime(2025, 7, 19, 10, 0, 36, tzinfo=UTC))
    with pytest.raises(CollateralExpiredError, match="TCB Info expired at 2025-07-19T10:16:03Z"):
        _expired_tcb_info()
    with pytest.raises(CollateralExpiredError, match="QE Identity is not valid before its issueDate 2025-06-19T10:32:27Z"):
        verify_quote(quote, col, datetime(2025, 6, 19, 10, 32, 26, tzinfo=UTC))


def _expired_tcb_info():
    """The CRLs expire before the TCB Info; check TCB Info's own window through its validator."""
    from attest.tdx_verify import _check_window

    _check_window(datetime(2025, 6, 19, tzinfo=UTC), datetime(2025, 7, 19, 10, 16, 3, tzinfo=UTC),
                  datetime(2025, 7, 19, 10, 16, 4, tzinfo=UTC), "TCB Info")


def test_outdated_quote_has_no_matching_tcb_level(vectors):
    with pytest.raises(TcbLevelError, match="no TCB level .* matches"):
        verify_quote(_read(vectors, "dcap-qvl/tdx_quote_outdated"),
                     _col(vectors, "dcap-qvl/tdx_quote_outdated_collateral.json"), T_OUTDATED)
    # Its chain and signatures are fine.
    result = verify_quote(_read(vectors, "dcap-qvl/tdx_quote_outdated"), None, T_OUTDATED)
    assert result.quote.body_type == 3 and not result.tcb_known


@pytest.mark.parametrize("key", [
    "dcap-qvl/quote-from-tappd.hex", "dcap-qvl/tdx-quote.hex", "go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
    "go-tdx-guest/quote_v5_sample.dat", "trustee/tdx_quote_4.dat", "trustee/tdx_quote_5.dat",
])
def test_signatures_and_chain_without_collateral(vectors, key):
    exp = json.loads((vectors / "tee" / "EXPECTED.json").read_text())[key]
    now = datetime.fromisoformat(exp["verify_time"])
    result = verify_quote((vectors / "tee" / exp["file"]).read_bytes(), None, now)
    assert result.tcb_status is None and result.qe_status is None and result.status is None
    assert not result.tcb_known and result.fmspc.hex() == exp["fmspc"]
    assert result.quote.body.report_data.hex() == exp["report_data"]


def test_debug_and_servicetd_quotes_verify_and_expose_fields(vectors):
    debug = verify_quote(_read(vectors, "trustee/tdx_quote_4.dat"), None, datetime(2025, 11, 1, tzinfo=UTC))
    assert debug.quote.body.debug
    svc = verify_quote(_read(vectors, "trustee/tdx_quote_5.dat"), None, datetime(2025, 11, 1, tzinfo=UTC))
    assert svc.quote.body.mr_service_td.hex().startswith("383c87d3")


def test_wrong_trusted_root_is_rejected(vectors):
    quote = _read(vectors, "dcap-qvl/tdx_quote")
    with pytest.raises(CertificateChainError, match="does not end at a pinned root"):
        verify_quote(quote, None, T_OK, trusted_root="00" * 32)


def test_pck_chain_certificates_expire(vectors):
    quote = _read(vectors, "dcap-qvl/tdx_quote")
    with pytest.raises(CertificateChainError, match="expired at"):
        verify_quote(quote, None, datetime(2040, 1, 1, tzinfo=UTC))
    with pytest.raises(CertificateChainError, match="not valid before"):
        verify_quote(quote, None, datetime(2019, 1, 1, tzinfo=UTC))


def _fake_root_like(real: x509.Certificate) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.subject)
            .public_key(key.public_key()).serial_number(real.serial_number)
            .not_valid_before(real.not_valid_before_utc).not_valid_after(real.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def test_rerooted_chain_is_rejected(vectors):
    """Replace the Intel root in the quote's chain with a look-alike (same subject/serial)."""
    from attest.tdx import parse_quote
    from attest.x509util import parse_pem_chain

    raw = _read(vectors, "dcap-qvl/tdx_quote")
    q = parse_quote(raw)
    chain = parse_pem_chain(q.signature_data.certification.pck_cert_chain, "c")
    fake, _ = _fake_root_like(chain[-1])
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (*chain[:-1], fake))
    cert = dataclasses.replace(q.signature_data.certification, pck_cert_chain=pem)
    forged = dataclasses.replace(q, signature_data=dataclasses.replace(q.signature_data, certification=cert))
    with pytest.raises(CertificateChainError, match="does not end at the pinned Intel SGX Root CA"):
        verify_quote(forged, None, T_OK)
    # Even when the caller trusts the look-alike, the Intel-issued Platform CA does not chain to it.
    from attest.x509util import fingerprint

    with pytest.raises(CertificateChainError, match="not issued by"):
        verify_quote(forged, None, T_OK, trusted_root=fingerprint(fake))


def test_collateral_for_another_platform(vectors):
    col = _col(vectors, "dcap-qvl/tdx_quote_collateral.json")
    other = _col(vectors, "dcap-qvl/tdx_quote_outdated_collateral.json")
    mixed = dataclasses.replace(col, tcb_info=other.tcb_info, tcb_info_signature=other.tcb_info_signature,
                                tcb_info_issuer_chain=other.tcb_info_issuer_chain)
    with pytest.raises(VerificationError):
        verify_quote(_read(vectors, "dcap-qvl/tdx_quote"), mixed, datetime(2025, 7, 1, tzinfo=UTC))


def test_collateral_signatures_are_checked(vectors):
    quote, col = _read(vectors, "dcap-qvl/tdx_quote"), _col(vectors, "dcap-qvl/tdx_quote_collateral.json")
    bad_tcb = dataclasses.replace(col, tcb_info=col.tcb_info.replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', 1))
    with pytest.raises(SignatureError, match="TCB Info signature"):
        verify_quote(quote, bad_tcb, T_OK)
    sig = bytearray(col.qe_identity_signature)
    sig[5] ^= 1
    with pytest.raises(SignatureError, match="QE Identity signature"):
        verify_quote(quote, dataclasses.replace(col, qe_identity_signature=bytes(sig)), T_OK)
    with pytest.raises(CertificateChainError, match="no CRL"):
        verify_quote(quote, dataclasses.replace(col, pck_crl=col.root_ca_crl), T_OK)
    with pytest.raises(ParseError):
        verify_quote(quote, dataclasses.replace(col, pck_crl=b"\x30\x03garbage"), T_OK)


def test_tdx_quote_needs_tdx_tcb_info(vectors):
    """An SGX TCB Info (signed, valid) must not be used for a TDX quote."""
    sgx = _col(vectors, "dcap-qvl/sgx_quote_collateral.json")
    col = _col(vectors, "dcap-qvl/tdx_quote_collateral.json")
    mixed = dataclasses.replace(col, tcb_info=sgx.tcb_info, tcb_info_signature=sgx.tcb_info_signature,
                                tcb_info_issuer_chain=sgx.tcb_info_issuer_chain)
    with pytest.raises((CollateralMismatchError, VerificationError)):
        verify_quote(_read(vectors, "dcap-qvl/tdx_quote"), mixed, T_OK)


def test_converge_status():
    assert converge_status("UpToDate", "OutOfDate") == "OutOfDate"
    assert converge_status("ConfigurationNeeded", "OutOfDate") == "OutOfDateConfigurationNeeded"
    assert converge_status("SWHardeningNeeded", "UpToDate") == "SWHardeningNeeded"
    assert converge_status("OutOfDate", "Revoked") == "Revoked"


def test_now_must_be_aware(vectors):
    with pytest.raises(TypeError):
        verify_quote(_read(vectors, "dcap-qvl/tdx_quote"), None, datetime(2025, 1, 1))
