"""The key binding: what a TEE's 64-byte REPORTDATA must contain for cdvm.

REPORTDATA is the only field the guest chooses in a TDX quote or an SNP report, so cdvm
puts there everything a client needs to know the evidence is for *this* job:

    REPORTDATA[0:32]  = the sandbox's one-time x-only Nostr public key (BIP-340, 32 bytes)
    REPORTDATA[32:64] = SHA-256( b"cdvm-attest-v1"
                                 ‖ job request event id   (32 bytes)
                                 ‖ client nonce           (32 bytes)
                                 ‖ SHA-256 of the model   (32 bytes)
                                 ‖ SHA-256 of GPU evidence, or 32 zero bytes without a GPU )

The same layout binds other requests (the model key daemon puts its key-request nonce
where the client nonce goes); the names below are generic on purpose.
"""
from __future__ import annotations

import base64
import hashlib
import hmac

from attest.errors import AttestError

BINDING_DOMAIN = b"cdvm-attest-v1"
REPORT_DATA_LEN = 64
NO_GPU = bytes(32)


class BindingError(AttestError):
    """REPORTDATA does not bind the expected key, job, nonce, model or GPU evidence."""


def _bytes32(value: object, name: str) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise BindingError(f"{name} must be 32 bytes or 64 hex digits, got a non-hex string") from None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BindingError(f"{name} must be 32 bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != 32:
        raise BindingError(f"{name} must be 32 bytes, got {len(value)}")
    return value


def binding_digest(
    job_id: bytes | str,
    nonce: bytes | str,
    model_sha256: bytes | str,
    gpu_evidence_sha256: bytes | str | None = None,
) -> bytes:
    """REPORTDATA[32:64]: SHA-256 over the domain tag and the four 32-byte inputs."""
    gpu = NO_GPU if gpu_evidence_sha256 is None else _bytes32(gpu_evidence_sha256, "GPU evidence SHA-256")
    return hashlib.sha256(
        BINDING_DOMAIN
        + _bytes32(job_id, "job request event id")
        + _bytes32(nonce, "nonce")
        + _bytes32(model_sha256, "model SHA-256")
        + gpu
    ).digest()


def build_report_data(
    pubkey: bytes | str,
    job_id: bytes | str,
    nonce: bytes | str,
    model_sha256: bytes | str,
    gpu_evidence_sha256: bytes | str | None = None,
) -> bytes:
    """The 64 REPORTDATA bytes for a one-time public key and the job's binding inputs."""
    return _bytes32(pubkey, "public key") + binding_digest(job_id, nonce, model_sha256, gpu_evidence_sha256)


def _report_data(report_data: object) -> bytes:
    if not isinstance(report_data, (bytes, bytearray, memoryview)):
        raise BindingError(f"REPORTDATA must be {REPORT_DATA_LEN} bytes, got {type(report_data).__name__}")
    report_data = bytes(report_data)
    if len(report_data) != REPORT_DATA_LEN:
        raise BindingError(f"REPORTDATA must be {REPORT_DATA_LEN} bytes, got {len(report_data)}")
    return report_data


def bound_pubkey(report_data: bytes) -> bytes:
    """The one-time public key REPORTDATA[0:32] names."""
    return _report_data(report_data)[:32]


def attestation_agent_report_data(report_data: bytes) -> bytes:
    """What REPORTDATA holds when the evidence came from a Confidential Containers attestation
    agent asked for ``report_data``: its REST API takes at most 64 characters of text, so cdvm
    sends base64url (unpadded) of SHA-384(report_data) — exactly 64 ASCII bytes — and the quote
    carries those characters. It is a collision-resistant function of the same binding, so
    :func:`check_report_data` accepts it in place of the plain form."""
    digest = hashlib.sha384(_report_data(report_data)).digest()
    return base64.urlsafe_b64encode(digest)


def check_report_data(
    report_data: bytes,
    pubkey: bytes | str,
    job_id: bytes | str,
    nonce: bytes | str,
    model_sha256: bytes | str,
    gpu_evidence_sha256: bytes | str | None = None,
) -> None:
    """Raise :class:`BindingError` naming each part of REPORTDATA that does not match.

    The public key half is compared directly; the hash half cannot say which of its inputs
    differs, only that one of them (job id, nonce, model or GPU evidence) does.
    """
    report_data = _report_data(report_data)
    expected_key = _bytes32(pubkey, "public key")
    expected_digest = binding_digest(job_id, nonce, model_sha256, gpu_evidence_sha256)
    if hmac.compare_digest(report_data, attestation_agent_report_data(expected_key + expected_digest)):
        return
    problems = []
    if not hmac.compare_digest(report_data[:32], expected_key):
        problems.append(
            f"REPORTDATA[0:32] binds public key {report_data[:32].hex()}, expected {expected_key.hex()}"
        )
    if not hmac.compare_digest(report_data[32:], expected_digest):
        problems.append(
            "REPORTDATA[32:64] does not match SHA-256 of the job request id, nonce, model SHA-256 "
            f"and GPU evidence hash{' (none: 32 zero bytes)' if gpu_evidence_sha256 is None else ''}"
        )
    if problems:
        raise BindingError("; ".join(problems))
