"""Typed errors for attestation: parse → verify → validate each fail with their own class.

Every error carries a message a user can act on (which field, which offset, which time,
which certificate). Nothing else may escape the ``attest`` package on bad input.
"""
from __future__ import annotations

from dvm.errors import CdvmError


class AttestError(CdvmError):
    """Base class of every attestation error."""


class ParseError(AttestError):
    """Evidence or collateral bytes are malformed: truncated, wrong length, bad encoding."""


class VerificationError(AttestError):
    """Evidence is well formed but not authentic or not current: a chain, signature,
    CRL, validity window or TCB match failed."""


class CollateralError(AttestError):
    """Verification collateral (TCB Info, QE Identity, CRLs) is missing, malformed or unobtainable."""


class PolicyError(AttestError):
    """Evidence is authentic but the user's policy does not accept it."""


class ProviderError(AttestError):
    """An evidence provider (a TEE device, its driver, the simulated TEE) failed to produce evidence."""
