"""The outcome of verifying one piece of evidence, for people (:meth:`Verdict.render_lines`)
and programs (:meth:`Verdict.to_dict`, the ``cdvm attest verify --json`` object).

``verified`` is true only when the cryptography held (no ``errors``) *and* the policy had
no objection (no ``policy_violations``). ``confidential`` is additionally false for the
simulated TEE, whose "evidence" proves nothing about where the code ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Verdict:
    """Everything a client needs to decide whether to trust a sandbox."""

    tee: str
    verified: bool
    tcb_status: str | None
    qe_status: str | None
    advisories: tuple[str, ...]
    report_data: str
    measurements: dict[str, str]
    policy_violations: tuple[str, ...]
    errors: tuple[str, ...]
    confidential: bool
    provider: str = "file"
    details: dict[str, object] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        return self.tee == "sim"

    def to_dict(self) -> dict[str, object]:
        """The JSON object ``cdvm attest verify --json`` prints."""
        return {
            "tee": self.tee,
            "verified": self.verified,
            "confidential": self.confidential,
            "tcb_status": self.tcb_status,
            "qe_status": self.qe_status,
            "advisories": list(self.advisories),
            "report_data": self.report_data,
            "measurements": dict(self.measurements),
            "policy_violations": list(self.policy_violations),
            "errors": list(self.errors),
            "provider": self.provider,
            "details": dict(self.details),
        }

    def reasons(self) -> list[str]:
        """One readable sentence per reason the evidence is not accepted (empty when verified)."""
        return [*self.errors, *(f"policy: {violation}" for violation in self.policy_violations)]

    def render_lines(self) -> list[str]:
        """Human-readable summary; a simulated verdict says so on its first line."""
        if self.simulated:
            head = "SIMULATED TEE — NOT CONFIDENTIAL: this evidence proves nothing about where the code runs"
        elif self.verified:
            head = f"VERIFIED: genuine {self.tee.upper()} evidence, accepted by the policy"
        else:
            head = f"NOT VERIFIED: {self.tee.upper()} evidence rejected"
        lines = [head]
        if self.simulated:
            lines.append(f"simulated evidence {'verified' if self.verified else 'rejected'}; confidential: no")
        else:
            lines.append(f"confidential: {'yes' if self.confidential else 'no'}")
        if self.tcb_status is not None:
            lines.append(f"platform TCB status: {self.tcb_status}")
        if self.qe_status is not None:
            lines.append(f"quoting enclave status: {self.qe_status}")
        if self.advisories:
            lines.append(f"advisories: {', '.join(self.advisories)}")
        if self.report_data:
            lines.append(f"report_data: {self.report_data}")
        lines.extend(f"{name}: {value}" for name, value in self.measurements.items())
        lines.extend(f"error: {error}" for error in self.errors)
        lines.extend(f"policy violation: {violation}" for violation in self.policy_violations)
        return lines
