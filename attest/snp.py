"""AMD SEV-SNP ATTESTATION_REPORT parser (report versions 2, 3 and 5), no cryptography.

Layout: AMD "SEV Secure Nested Paging Firmware ABI Specification" (56860), table
"ATTESTATION_REPORT Structure". The report is 1184 (0x4A0) bytes, little-endian; the
signature covers bytes [0x000, 0x2A0) and sits at 0x2A0 as ECDSA-P384 R and S, each a
72-byte little-endian integer (table "ECDSA P-384 with SHA-384 Signature"). Version 3 adds
CPUID_FAM_ID/CPUID_MOD_ID/CPUID_STEP at 0x188..0x18A; version 5 adds LAUNCH_MIT_VECTOR
(0x1F8) and CURRENT_MIT_VECTOR (0x200). Version 4 exists but its layout is under AMD
embargo, so it is rejected rather than guessed.

Every reserved byte must be zero, POLICY bit 17 must be one and POLICY bits 63:26 zero,
SIGNER_INFO bits 31:5 zero and SIGNING_KEY one of 0 (VCEK), 1 (VLEK), 7 (none) — the checks
google/go-sev-guest's ``abi.ReportToProto`` makes. Anything else is a :class:`ParseError`
naming the field and its offset.

TCB_VERSION fields are product-dependent (table "TCB_VERSION Structure"): Milan and Genoa
put the boot loader, TEE, SNP and microcode SPLs in bytes 0, 1, 6, 7; Turin puts FMC, boot
loader, TEE, SNP, microcode in bytes 0, 1, 2, 3, 7. :class:`TcbVersion` therefore keeps the
raw 64-bit value and decodes only when told the product (:meth:`TcbVersion.decode`). The
product comes from a v3+ report's CPUID fields (:attr:`SnpReport.product`) or, for v2
reports, from the certificate chain the report verifies against.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from attest.errors import ParseError

REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
SIGNATURE_OFFSET = 0x2A0
ECDSA_COMPONENT_LEN = 72
P384_LEN = 48
SIG_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = (2, 3, 5)
PRODUCTS = ("Milan", "Genoa", "Turin")

_POLICY_RESERVED_ONE = 1 << 17
_POLICY_MBZ = ~((1 << 26) - 1) & 0xFFFF_FFFF_FFFF_FFFF
_SIGNER_INFO_MBZ = ~((1 << 5) - 1) & 0xFFFF_FFFF


class SigningKey(IntEnum):
    """SIGNER_INFO.SIGNING_KEY (bits 4:2): which key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7


def product_from_cpuid(family: int, model: int) -> str | None:
    """The KDS product line for a CPUID family/model (AMD KDS spec, "Determining the Product
    Name"; model ranges as virtee/snpguest): family 19h models 00h-0Fh Milan, 10h-1Fh and
    A0h-AFh Genoa (Genoa, Bergamo, Siena); family 1Ah models 00h-11h Turin."""
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    elif family == 0x1A and model <= 0x11:
        return "Turin"
    return None


@dataclass(frozen=True, slots=True)
class TcbParts:
    """A TCB_VERSION decoded for one product; ``fmc`` is None before Turin.

    ``reserved`` holds the reserved bytes (Milan/Genoa bytes 2-5, Turin bytes 4-6), which
    the VCEK certificate certifies as SPL4..SPL7 / SPL5..SPL7.
    """

    product: str
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    reserved: bytes

    def as_dict(self) -> dict[str, int]:
        """``{"bl", "tee", "snp", "ucode"}`` (plus ``"fmc"`` on Turin), as in EXPECTED.json."""
        parts = {"bl": self.bootloader, "tee": self.tee, "snp": self.snp, "ucode": self.microcode}
        if self.fmc is not None:
            parts["fmc"] = self.fmc
        return parts

    def components(self) -> tuple[int, ...]:
        """Every byte-sized SPL, reserved ones included, in a fixed order."""
        return (self.fmc or 0, self.bootloader, self.tee, self.snp, self.microcode, *self.reserved)

    def le(self, other: TcbParts) -> bool:
        """True when every component is <= the same component of ``other`` (same product)."""
        if self.product != other.product:
            raise ParseError(f"cannot compare a {self.product} TCB with a {other.product} TCB")
        return all(a <= b for a, b in zip(self.components(), other.components(), strict=True))

    def __str__(self) -> str:
        fmc = f"fmc={self.fmc} " if self.fmc is not None else ""
        return f"{fmc}bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A raw 64-bit TCB_VERSION; decode it with the product it belongs to."""

    raw: int

    @property
    def le_bytes(self) -> bytes:
        """The 8 bytes as they appear in the report."""
        return self.raw.to_bytes(8, "little")

    def decode(self, product: str) -> TcbParts:
        """Split into SPLs using the layout of ``product`` ("Milan", "Genoa" or "Turin")."""
        b = self.le_bytes
        if product in ("Milan", "Genoa"):
            return TcbParts(product, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7], fmc=None, reserved=b[2:6])
        if product == "Turin":
            return TcbParts(product, bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0], reserved=b[4:7])
        raise ParseError(f"unknown SEV-SNP product {product!r}; known: {', '.join(PRODUCTS)}")

    @classmethod
    def compose(cls, parts: TcbParts) -> TcbVersion:
        """Inverse of :meth:`decode`."""
        if parts.product == "Turin":
            layout = bytes([parts.fmc or 0, parts.bootloader, parts.tee, parts.snp, *parts.reserved, parts.microcode])
        else:
            layout = bytes([parts.bootloader, parts.tee, *parts.reserved, parts.snp, parts.microcode])
        return cls(int.from_bytes(layout, "little"))

    def __str__(self) -> str:
        return f"0x{self.raw:016x}"


@dataclass(frozen=True, slots=True)
class GuestPolicy:
    """POLICY (table "Guest Policy Structure"): bits 7:0 ABI minor, 15:8 ABI major, 16 SMT,
    17 reserved (must be 1), 18 MIGRATE_MA, 19 DEBUG, 20 SINGLE_SOCKET, 21 CXL_ALLOW,
    22 MEM_AES_256_XTS, 23 RAPL_DIS, 24 CIPHERTEXT_HIDING, 25 PAGE_SWAP_DISABLE."""

    raw: int
    abi_minor: int
    abi_major: int
    smt: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    cxl_allowed: bool
    mem_aes_256_xts: bool
    rapl_dis: bool
    ciphertext_hiding: bool
    page_swap_disable: bool

    @classmethod
    def from_int(cls, value: int) -> GuestPolicy:
        if not value & _POLICY_RESERVED_ONE:
            raise ParseError(f"SNP report POLICY (offset 0x08) is 0x{value:x}: reserved bit 17 must be 1")
        if value & _POLICY_MBZ:
            raise ParseError(f"SNP report POLICY (offset 0x08) is 0x{value:x}: reserved bits 63:26 must be 0")
        return cls(
            raw=value,
            abi_minor=value & 0xFF,
            abi_major=(value >> 8) & 0xFF,
            smt=bool(value >> 16 & 1),
            migrate_ma=bool(value >> 18 & 1),
            debug=bool(value >> 19 & 1),
            single_socket=bool(value >> 20 & 1),
            cxl_allowed=bool(value >> 21 & 1),
            mem_aes_256_xts=bool(value >> 22 & 1),
            rapl_dis=bool(value >> 23 & 1),
            ciphertext_hiding=bool(value >> 24 & 1),
            page_swap_disable=bool(value >> 25 & 1),
        )


@dataclass(frozen=True, slots=True)
class PlatformInfo:
    """PLATFORM_INFO: bit 0 SMT_EN, 1 TSME_EN, 2 ECC_EN, 3 RAPL_DIS, 4 CIPHERTEXT_HIDING_EN,
    5 ALIAS_CHECK_COMPLETE. Later bits are kept in ``raw`` (newer firmware adds some)."""

    raw: int
    smt_enabled: bool
    tsme_enabled: bool
    ecc_enabled: bool
    rapl_disabled: bool
    ciphertext_hiding_enabled: bool
    alias_check_complete: bool

    @classmethod
    def from_int(cls, value: int) -> PlatformInfo:
        return cls(value, *(bool(value >> bit & 1) for bit in range(6)))


@dataclass(frozen=True, slots=True)
class SignerInfo:
    """The 32-bit word at 0x48: AUTHOR_KEY_EN (bit 0), MASK_CHIP_KEY (bit 1), SIGNING_KEY (4:2)."""

    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey

    @classmethod
    def from_int(cls, value: int) -> SignerInfo:
        if value & _SIGNER_INFO_MBZ:
            raise ParseError(f"SNP report SIGNER_INFO (offset 0x48) is 0x{value:x}: reserved bits 31:5 must be 0")
        key = (value >> 2) & 7
        if key not in (0, 1, 7):
            raise ParseError(f"SNP report SIGNING_KEY (offset 0x48 bits 4:2) is {key}: values 2-6 are reserved")
        return cls(author_key_en=bool(value & 1), mask_chip_key=bool(value & 2), signing_key=SigningKey(key))


@dataclass(frozen=True, slots=True)
class SnpReport:
    """A parsed ATTESTATION_REPORT. ``raw`` is the exact 1184 input bytes."""

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    signer_info: SignerInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    raw: bytes

    @property
    def signed_bytes(self) -> bytes:
        """Bytes [0x000, 0x2A0): what the VCEK/VLEK signature covers."""
        return self.raw[:SIGNED_LEN]

    @property
    def product(self) -> str | None:
        """The product line from CPUID_FAM_ID/CPUID_MOD_ID (v3+), None for v2 or unknown CPUs."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def debug_allowed(self) -> bool:
        """POLICY.DEBUG: the host may decrypt this guest's memory. A policy must reject it."""
        return self.policy.debug

    @property
    def signing_key(self) -> SigningKey:
        return self.signer_info.signing_key

    @property
    def chip_id_masked(self) -> bool:
        """CHIP_ID is all zeros (MASK_CHIP_ID platform setting, or a VLEK-signed report)."""
        return not any(self.chip_id)


def _mbz(data: bytes, start: int, end: int, field: str) -> None:
    if any(data[start:end]):
        raise ParseError(
            f"SNP report {field} [0x{start:03X}, 0x{end:03X}) must be zero, "
            f"found {data[start:end].hex()}"
        )


def parse_report(data: bytes | bytearray | memoryview) -> SnpReport:
    """Parse and structurally validate one 1184-byte ATTESTATION_REPORT."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"SNP report must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != REPORT_LEN:
        raise ParseError(
            f"SNP report is {len(data)} bytes, an ATTESTATION_REPORT is exactly {REPORT_LEN} bytes "
            "(strip the certificate table of an extended report before parsing)"
        )
    version, guest_svn, policy_raw = struct.unpack_from("<IIQ", data, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise ParseError(
            f"SNP report VERSION (offset 0x00) is {version}; supported versions are "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    vmpl, signature_algo, current_tcb, platform_info, signer_info = struct.unpack_from("<IIQQI", data, 0x30)
    if signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise ParseError(
            f"SNP report SIGNATURE_ALGO (offset 0x34) is {signature_algo}; only 1 "
            "(ECDSA P-384 with SHA-384) is defined"
        )
    policy = GuestPolicy.from_int(policy_raw)
    signer = SignerInfo.from_int(signer_info)
    _mbz(data, 0x4C, 0x50, "reserved field")
    reported_tcb, = struct.unpack_from("<Q", data, 0x180)
    cpuid: tuple[int | None, int | None, int | None] = (None, None, None)
    if version >= 3:
        cpuid = (data[0x188], data[0x189], data[0x18A])
        _mbz(data, 0x18B, 0x1A0, "reserved field")
    else:
        _mbz(data, 0x188, 0x1A0, "reserved field (CPUID fields exist from version 3)")
    committed_tcb, = struct.unpack_from("<Q", data, 0x1E0)
    _mbz(data, 0x1EB, 0x1EC, "reserved byte after CURRENT_MAJOR")
    _mbz(data, 0x1EF, 0x1F0, "reserved byte after COMMITTED_MAJOR")
    launch_tcb, = struct.unpack_from("<Q", data, 0x1F0)
    launch_mit: int | None = None
    current_mit: int | None = None
    if version >= 5:
        launch_mit, current_mit = struct.unpack_from("<QQ", data, 0x1F8)
        _mbz(data, 0x208, SIGNED_LEN, "reserved field")
    else:
        _mbz(data, 0x1F8, SIGNED_LEN, "reserved field (mitigation vectors exist from version 5)")
    sig = data[SIGNATURE_OFFSET:]
    _mbz(data, SIGNATURE_OFFSET + P384_LEN, SIGNATURE_OFFSET + ECDSA_COMPONENT_LEN, "signature R high bytes")
    _mbz(data, SIGNATURE_OFFSET + ECDSA_COMPONENT_LEN + P384_LEN, SIGNATURE_OFFSET + 2 * ECDSA_COMPONENT_LEN,
         "signature S high bytes")
    _mbz(data, SIGNATURE_OFFSET + 2 * ECDSA_COMPONENT_LEN, REPORT_LEN, "reserved signature field")
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=TcbVersion(current_tcb),
        platform_info=PlatformInfo.from_int(platform_info),
        signer_info=signer,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=TcbVersion(reported_tcb),
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=TcbVersion(committed_tcb),
        current_build=data[0x1E8],
        current_minor=data[0x1E9],
        current_major=data[0x1EA],
        committed_build=data[0x1EC],
        committed_minor=data[0x1ED],
        committed_major=data[0x1EE],
        launch_tcb=TcbVersion(launch_tcb),
        launch_mit_vector=launch_mit,
        current_mit_vector=current_mit,
        signature_r=int.from_bytes(sig[:ECDSA_COMPONENT_LEN], "little"),
        signature_s=int.from_bytes(sig[ECDSA_COMPONENT_LEN:2 * ECDSA_COMPONENT_LEN], "little"),
        raw=data,
    )
