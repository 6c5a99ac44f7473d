"""Vendor root certificates, pinned by the SHA-256 of their DER encoding.

The certificates themselves are never shipped: they come from the evidence's own
chain (TDX PCK chains end in the Intel root), a directory the user configures
(``--roots DIR``), or the vendor's endpoint (AMD KDS ``cert_chain``). Whatever the
source, a root is trusted only when its fingerprint is listed here.
"""
from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
"""Intel SGX Root CA (P-256, serial 0x22650cd6…06ac, valid 2018-05-21..2049-12-31)."""

AMD_ARK_SHA256: dict[str, str] = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
"""AMD Root Keys (RSA-4096, self-signed, RSASSA-PSS/SHA-384) per product line."""

NVIDIA_DEVICE_IDENTITY_CA_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
"""NVIDIA Device Identity CA, the root of GPU attestation certificate chains."""


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Return the lowercase hex SHA-256 of a certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def is_pinned_intel_root(cert: x509.Certificate) -> bool:
    """True when ``cert`` is exactly the pinned Intel SGX Root CA."""
    return certificate_fingerprint(cert) == INTEL_SGX_ROOT_CA_SHA256


def pinned_amd_product(cert: x509.Certificate) -> str | None:
    """Return the product line ("Milan", "Genoa", "Turin") whose pinned ARK ``cert`` is, else None."""
    fingerprint = certificate_fingerprint(cert)
    for product, pinned in AMD_ARK_SHA256.items():
        if pinned == fingerprint:
            return product
    return None
