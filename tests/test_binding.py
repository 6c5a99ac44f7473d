"""The REPORTDATA binding: exact layout, and every mismatch named."""
from __future__ import annotations

import hashlib

import pytest

from attest.binding import (
    BINDING_DOMAIN,
    BindingError,
    binding_digest,
    bound_pubkey,
    build_report_data,
    check_report_data,
)
from attest.errors import AttestError

PUB = bytes(range(32))
JOB = bytes([0xA1]) * 32
NONCE = bytes([0xB2]) * 32
MODEL = hashlib.sha256(b"model file").digest()
GPU = hashlib.sha256(b"gpu evidence").digest()


def test_layout_is_pubkey_then_domain_separated_hash() -> None:
    data = build_report_data(PUB, JOB, NONCE, MODEL)
    assert len(data) == 64
    assert data[:32] == PUB
    assert data[32:] == hashlib.sha256(b"cdvm-attest-v1" + JOB + NONCE + MODEL + bytes(32)).digest()
    assert BINDING_DOMAIN == b"cdvm-attest-v1"
    assert bound_pubkey(data) == PUB


def test_gpu_evidence_hash_replaces_the_zero_block() -> None:
    with_gpu = build_report_data(PUB, JOB, NONCE, MODEL, GPU)
    assert with_gpu[32:] == hashlib.sha256(BINDING_DOMAIN + JOB + NONCE + MODEL + GPU).digest()
    assert with_gpu != build_report_data(PUB, JOB, NONCE, MODEL)


def test_hex_inputs_are_accepted() -> None:
    assert build_report_data(PUB.hex(), JOB.hex(), NONCE.hex(), MODEL.hex()) == build_report_data(PUB, JOB, NONCE, MODEL)


def test_check_accepts_the_matching_binding() -> None:
    check_report_data(build_report_data(PUB, JOB, NONCE, MODEL, GPU), PUB, JOB, NONCE, MODEL, GPU)


@pytest.mark.parametrize(
    ("change", "part"),
    [
        ({"pubkey": bytes(32)}, "REPORTDATA[0:32]"),
        ({"job_id": bytes(32)}, "REPORTDATA[32:64]"),
        ({"nonce": bytes(32)}, "REPORTDATA[32:64]"),
        ({"model_sha256": bytes(32)}, "REPORTDATA[32:64]"),
        ({"gpu_evidence_sha256": GPU}, "REPORTDATA[32:64]"),
    ],
)
def test_each_mismatch_is_reported_with_its_part(change: dict, part: str) -> None:
    data = build_report_data(PUB, JOB, NONCE, MODEL)
    inputs = {"pubkey": PUB, "job_id": JOB, "nonce": NONCE, "model_sha256": MODEL, "gpu_evidence_sha256": None}
    inputs.update(change)
    with pytest.raises(BindingError) as caught:
        check_report_data(data, **inputs)
    assert part in str(caught.value)
    other = "REPORTDATA[32:64]" if part == "REPORTDATA[0:32]" else "REPORTDATA[0:32]"
    assert other not in str(caught.value)
    assert isinstance(caught.value, AttestError)


def test_both_halves_wrong_names_both() -> None:
    with pytest.raises(BindingError) as caught:
        check_report_data(bytes(64), PUB, JOB, NONCE, MODEL)
    assert "REPORTDATA[0:32]" in str(caught.value) and "REPORTDATA[32:64]" in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((PUB[:31], JOB, NONCE, MODEL), "public key must be 32 bytes, got 31"),
        ((PUB, JOB + b"x", NONCE, MODEL), "job request event id must be 32 bytes, got 33"),
        ((PUB, JOB, "zz" * 32, MODEL), "nonce must be 32 bytes or 64 hex digits"),
        ((PUB, JOB, NONCE, 42), "model SHA-256 must be 32 bytes, got int"),
        ((PUB, JOB, NONCE, MODEL, b""), "GPU evidence SHA-256 must be 32 bytes, got 0"),
    ],
)
def test_inputs_are_length_checked(args: tuple, message: str) -> None:
    with pytest.raises(BindingError, match=message):
        build_report_data(*args)


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), "00" * 64, None])
def test_report_data_must_be_64_bytes(bad: object) -> None:
    with pytest.raises(BindingError, match="REPORTDATA must be 64 bytes"):
        check_report_data(bad, PUB, JOB, NONCE, MODEL)  # type: ignore[arg-type]


def test_digest_is_generic_for_other_requests() -> None:
    key_request_nonce = bytes([7]) * 32
    assert binding_digest(JOB, key_request_nonce, MODEL) == build_report_data(PUB, JOB, key_request_nonce, MODEL)[32:]


def test_attestation_agent_encoding_of_the_binding_is_accepted() -> None:
    from attest.binding import attestation_agent_report_data

    key, job, nonce, model = (bytes([i]) * 32 for i in (1, 2, 3, 4))
    expected = build_report_data(key, job, nonce, model)
    encoded = attestation_agent_report_data(expected)
    assert len(encoded) == 64 and encoded.isascii()
    check_report_data(encoded, key, job, nonce, model)
    with pytest.raises(BindingError):
        check_report_data(attestation_agent_report_data(build_report_data(key, job, bytes(32), model)), key, job, nonce, model)
