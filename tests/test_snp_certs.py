"""The SEV-SNP extended-report certificate table (GHCB spec, SNP Extended Guest Request)."""
from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from attest.errors import ParseError
from attest.snp import SigningKey
from attest.snp_certs import (
    ARK_GUID,
    ASK_GUID,
    ENTRY_LEN,
    VCEK_GUID,
    VLEK_GUID,
    CertTable,
    CertTableEntry,
    SnpCertChain,
    chain_from_table,
    encode_cert_table,
    parse_cert_table,
)
from attest.x509util import parse_pem_chain


@pytest.fixture(scope="module")
def milan_certs(vectors: Path) -> tuple[bytes, bytes, bytes]:
    snp = vectors / "tee" / "snp" / "virtee-sev"
    ask, ark = parse_pem_chain((snp / "cert_chain_milan").read_bytes(), "chain")
    return (snp / "vcek_milan.der").read_bytes(), ask.public_bytes(Encoding.DER), ark.public_bytes(Encoding.DER)


def _header(guid: uuid.UUID, offset: int, length: int) -> bytes:
    return guid.bytes + struct.pack("<II", offset, length)


def test_guids_are_the_ghcb_values_in_rfc4122_byte_order() -> None:
    assert VCEK_GUID.bytes == bytes.fromhex("63da758de6644564adc5f4b93be8accd")
    assert VLEK_GUID == uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
    assert ASK_GUID == uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
    assert ARK_GUID == uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")


def test_round_trip_with_real_certificates(milan_certs: tuple[bytes, bytes, bytes]) -> None:
    vcek, ask, ark = milan_certs
    entries = [CertTableEntry(ARK_GUID, ark), CertTableEntry(ASK_GUID, ask), CertTableEntry(VCEK_GUID, vcek)]
    blob = encode_cert_table(entries)
    assert blob[:16] == ARK_GUID.bytes
    assert struct.unpack_from("<II", blob, 16) == (4 * ENTRY_LEN, len(ark))
    assert blob[3 * ENTRY_LEN:4 * ENTRY_LEN] == bytes(ENTRY_LEN)
    table = parse_cert_table(blob + bytes(4096 - len(blob) % 4096))  # padded to pages, as the kernel returns it
    assert table.entries == tuple(entries)
    assert (table.vcek, table.ask, table.ark, table.vlek) == (vcek, ask, ark, None)
    assert [entry.name for entry in table.entries] == ["ARK", "ASK", "VCEK"]
    assert chain_from_table(table, SigningKey.VCEK) == SnpCertChain(SigningKey.VCEK, vcek, ask, ark)
    assert chain_from_table(table, SigningKey.VLEK) is None


def test_vlek_table_and_unknown_guid(vectors: Path) -> None:
    vlek = (vectors / "tee" / "snp" / "trustee" / "test-vlek.der").read_bytes()
    extra = uuid.UUID("ecae0c0f-9502-43b1-afa2-0ae2e0d565b6")
    table = parse_cert_table(encode_cert_table([CertTableEntry(VLEK_GUID, vlek), CertTableEntry(extra, b"\x08\0\0\0")]))
    assert table.vlek == vlek and table.get(extra) == b"\x08\0\0\0"
    assert table.entries[1].name == str(extra)
    assert chain_from_table(table, SigningKey.VLEK) is None  # no ASVK/ARK


def test_empty_input_is_an_empty_table() -> None:
    assert parse_cert_table(b"") == CertTable()
    assert parse_cert_table(bytes(ENTRY_LEN)) == CertTable()
    assert encode_cert_table([]) == bytes(ENTRY_LEN)


def test_entries_may_overlap_and_share_blobs() -> None:
    blob = _header(VCEK_GUID, 72, 4) + _header(ASK_GUID, 72, 2) + bytes(ENTRY_LEN) + b"abcd"
    table = parse_cert_table(blob)
    assert (table.vcek, table.ask) == (b"abcd", b"ab")


@pytest.mark.parametrize(("blob", "message"), [
    (b"\x01", "truncated"),
    (_header(VCEK_GUID, 48, 1), "no all-zero terminator"),
    (_header(VCEK_GUID, 48, 1) + bytes(23), "truncated"),
    (_header(VCEK_GUID, 24, 4) + bytes(ENTRY_LEN) + b"abcd", "inside the 48-byte table header"),
    (_header(VCEK_GUID, 0, 4) + bytes(ENTRY_LEN) + b"abcd", "offset 0"),
    (_header(VCEK_GUID, 48, 5) + bytes(ENTRY_LEN) + b"abcd", r"spans \[48, 53\)"),
    (_header(VCEK_GUID, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(ENTRY_LEN), "spans"),
    (_header(VCEK_GUID, 48, 0) + bytes(ENTRY_LEN), "length 0"),
    (_header(VCEK_GUID, 72, 1) + _header(VCEK_GUID, 72, 1) + bytes(ENTRY_LEN) + b"a", "lists VCEK twice"),
    (_header(uuid.UUID(int=0), 48, 1) + bytes(ENTRY_LEN) + b"a", "only the all-zero terminator"),
])
def test_malformed_tables(blob: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_cert_table(blob)


@pytest.mark.parametrize("value", [None, "table", 7, [1, 2]])
def test_wrong_types(value: object) -> None:
    with pytest.raises(ParseError, match="must be bytes"):
        parse_cert_table(value)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_is_parse_error(data: bytes) -> None:
    try:
        table = parse_cert_table(data)
    except ParseError:
        return
    assert all(entry.data for entry in table.entries)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([VCEK_GUID, ASK_GUID, ARK_GUID, VLEK_GUID]), st.integers(0, 200),
                          st.integers(0, 200)), max_size=5), st.binary(max_size=200))
def test_structured_garbage_is_parse_error(headers: list[tuple[uuid.UUID, int, int]], body: bytes) -> None:
    blob = b"".join(_header(*header) for header in headers) + bytes(ENTRY_LEN) + body
    try:
        parse_cert_table(blob)
    except ParseError:
        pass
