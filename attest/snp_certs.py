"""The SEV-SNP extended-report certificate table, and the V(C|L)EK chain it carries.

An extended guest request (SNP_GET_EXT_REPORT; AMD "GHCB Standardization" 56421,
"SNP Extended Guest Request", certificate table) returns, beside the report, a table of
24-byte entries ``GUID (16 bytes) ‖ offset (u32 LE) ‖ length (u32 LE)`` terminated by an
all-zero entry; offsets count from the start of the table and point past the header to
DER certificates. GUIDs are stored in RFC 4122 byte order (as go-sev-guest and virtee/sev
read them):

* VCEK ``63da758d-e664-4564-adc5-f4b93be8accd``
* VLEK ``a8074bc2-a25a-483e-aae6-39c045a0b8a1``
* ASK  ``4ab7b379-bbac-4fe4-a02f-05aef327c782`` (the ASVK for a VLEK chain)
* ARK  ``c0b406a4-a803-4952-9743-3fb6014cd0ae``

Other GUIDs (for example go-sev-guest's extra platform info) are kept as they are. An
empty buffer is an empty table. A missing terminator, an entry that points into the header
or past the end, a zero-length entry or a duplicated GUID is a :class:`ParseError`.
"""
from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from attest.errors import ParseError
from attest.snp import SigningKey

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
ENTRY_LEN = 24
_ZERO_GUID = uuid.UUID(int=0)
_NAMES = {VCEK_GUID: "VCEK", VLEK_GUID: "VLEK", ASK_GUID: "ASK", ARK_GUID: "ARK"}


@dataclass(frozen=True, slots=True)
class CertTableEntry:
    """One table entry: its GUID and the bytes it points to."""

    guid: uuid.UUID
    data: bytes

    @property
    def name(self) -> str:
        """"VCEK", "VLEK", "ASK", "ARK", or the GUID for anything else."""
        return _NAMES.get(self.guid, str(self.guid))


@dataclass(frozen=True, slots=True)
class CertTable:
    """A parsed certificate table, entries in table order."""

    entries: tuple[CertTableEntry, ...] = ()

    def get(self, guid: uuid.UUID) -> bytes | None:
        """The bytes of the entry with ``guid``, or None."""
        for entry in self.entries:
            if entry.guid == guid:
                return entry.data
        return None

    @property
    def vcek(self) -> bytes | None:
        return self.get(VCEK_GUID)

    @property
    def vlek(self) -> bytes | None:
        return self.get(VLEK_GUID)

    @property
    def ask(self) -> bytes | None:
        return self.get(ASK_GUID)

    @property
    def ark(self) -> bytes | None:
        return self.get(ARK_GUID)


@dataclass(frozen=True, slots=True)
class SnpCertChain:
    """The DER certificates a report verifies against: the V(C|L)EK, the ASK (or ASVK for a
    VLEK) and the ARK. ``signing_key`` says which endorsement key ``vek`` is."""

    signing_key: SigningKey
    vek: bytes
    ask: bytes
    ark: bytes


def parse_cert_table(data: bytes | bytearray | memoryview) -> CertTable:
    """Parse a certificate table (GHCB spec, "SNP Extended Guest Request")."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"SNP certificate table must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        return CertTable()
    headers: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + ENTRY_LEN > len(data):
            raise ParseError(
                f"SNP certificate table truncated: entry {len(headers)} at offset {pos} needs "
                f"{ENTRY_LEN} bytes, {len(data) - pos} left (no all-zero terminator entry)"
            )
        guid = uuid.UUID(bytes=data[pos:pos + 16])
        offset, length = struct.unpack_from("<II", data, pos + 16)
        pos += ENTRY_LEN
        if guid == _ZERO_GUID:
            if offset or length:
                raise ParseError(
                    f"SNP certificate table entry {len(headers)} has the all-zero GUID but offset "
                    f"{offset} and length {length}; only the all-zero terminator may use it"
                )
            break
        headers.append((guid, offset, length))
    seen: set[uuid.UUID] = set()
    entries: list[CertTableEntry] = []
    for index, (guid, offset, length) in enumerate(headers):
        name = _NAMES.get(guid, str(guid))
        if guid in seen:
            raise ParseError(f"SNP certificate table lists {name} twice (entry {index})")
        seen.add(guid)
        if length == 0:
            raise ParseError(f"SNP certificate table entry {index} ({name}) has length 0")
        if offset < pos:
            raise ParseError(
                f"SNP certificate table entry {index} ({name}) has offset {offset}, inside the "
                f"{pos}-byte table header"
            )
        if offset + length > len(data):
            raise ParseError(
                f"SNP certificate table entry {index} ({name}) spans [{offset}, {offset + length}) "
                f"but the table is only {len(data)} bytes"
            )
        entries.append(CertTableEntry(guid, data[offset:offset + length]))
    return CertTable(tuple(entries))


def encode_cert_table(entries: Iterable[CertTableEntry]) -> bytes:
    """Serialize entries in the same format: header, zero terminator, then the blobs."""
    items = list(entries)
    header_len = (len(items) + 1) * ENTRY_LEN
    header = bytearray()
    body = bytearray()
    for entry in items:
        header += entry.guid.bytes + struct.pack("<II", header_len + len(body), len(entry.data))
        body += entry.data
    return bytes(header) + bytes(ENTRY_LEN) + bytes(body)


def chain_from_table(table: CertTable, signing_key: SigningKey) -> SnpCertChain | None:
    """The chain for a report signed by ``signing_key``, if the table holds all three
    certificates (the VCEK or VLEK, the ASK/ASVK, the ARK); None when any is missing."""
    vek = table.vlek if signing_key is SigningKey.VLEK else table.vcek
    ask, ark = table.ask, table.ark
    if vek is None or ask is None or ark is None:
        return None
    return SnpCertChain(signing_key, vek, ask, ark)
