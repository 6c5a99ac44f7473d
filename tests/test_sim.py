"""The simulated TEE: same quote layout, same verifier, its own root — never trusted by default."""
from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone

import pytest

from attest import sim
from attest.errors import ProviderError
from attest.roots import is_pinned_intel_root
from attest.tdx import parse_quote
from attest.tdx_verify import CertificateChainError, verify_quote


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CDVM_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_round_trip_with_sim_root():
    report_data = os.urandom(64)
    quote = sim.make_quote(report_data)
    parsed = parse_quote(quote)
    assert parsed.header.version == 4 and parsed.signed_length == 632
    assert parsed.report_data == report_data
    now = datetime.now(timezone.utc)
    result = verify_quote(quote, sim.sim_collateral(), now, trusted_root=sim.sim_root_fingerprint())
    assert result.quote.report_data == report_data
    assert (result.status, result.tcb_status, result.qe_status) == ("UpToDate", "UpToDate", "UpToDate")
    assert not result.quote.body.debug and result.quote.body.sept_ve_disable
    assert verify_quote(quote, None, now, trusted_root=sim.sim_root_fingerprint()).tcb_known is False


def test_rejected_with_the_default_intel_root():
    quote = sim.make_quote(bytes(64))
    with pytest.raises(CertificateChainError, match="pinned Intel SGX Root CA"):
        verify_quote(quote, sim.sim_collateral(), datetime.now(timezone.utc))
    with pytest.raises(CertificateChainError):
        verify_quote(quote, None, datetime.now(timezone.utc))


def test_marked_as_simulated_and_persisted(_state_dir):
    root = sim.sim_root_certificate()
    assert sim.is_sim_root(root) and not is_pinned_intel_root(root)
    assert "SIMULATED TEE" in root.subject.rfc4514_string() and "NOT CONFIDENTIAL" in root.subject.rfc4514_string()
    directory = _state_dir / "sim-tee"
    keys = sorted(directory.glob("*.key"))
    assert len(keys) == 5
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    sim._loaded.clear()
    assert sim.sim_root_certificate() == root  # reloaded from disk, not regenerated


def test_tampered_sim_quote_is_rejected():
    quote = bytearray(sim.make_quote(b"\x01" * 64))
    quote[600] ^= 1
    with pytest.raises(Exception) as info:
        verify_quote(bytes(quote), sim.sim_collateral(), datetime.now(timezone.utc),
                     trusted_root=sim.sim_root_fingerprint())
    assert "signature" in str(info.value)


def test_sim_collateral_expires():
    collateral = sim.sim_collateral()
    later = datetime.now(timezone.utc) + timedelta(days=40)
    with pytest.raises(Exception, match="expired"):
        verify_quote(sim.make_quote(bytes(64)), collateral, later, trusted_root=sim.sim_root_fingerprint())


def test_intel_root_is_not_a_sim_root(vectors):
    from attest.x509util import parse_pem_chain

    raw = (vectors / "tee" / "tdx" / "dcap-qvl/tdx_quote").read_bytes()
    intel_root = parse_pem_chain(parse_quote(raw).signature_data.certification.pck_cert_chain, "c")[-1]
    assert not sim.is_sim_root(intel_root)


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), "x" * 64])
def test_report_data_must_be_64_bytes(bad):
    with pytest.raises(ProviderError):
        sim.make_quote(bad)  # type: ignore[arg-type]
