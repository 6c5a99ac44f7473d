"""Framing of the host↔sandbox channel (jobs/channel.py): encode, incremental decode, adapters."""
from __future__ import annotations

import asyncio
import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.channel import BlockingChannel, FrameDecoder, encode_frame, read_frame, write_frame
from jobs.sandbox_errors import ChannelError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.dictionaries(st.text(max_size=8), json_values, max_size=5).map(lambda d: {"op": "t", **d})


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_encode_layout() -> None:
    assert encode_frame({"op": "ping", "n": "é"}) == frame('{"op":"ping","n":"é"}'.encode())


@given(st.lists(messages, max_size=6), st.data())
@settings(max_examples=200, deadline=None)
def test_decoder_any_chunking(msgs: list[dict], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out: list[dict] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        out += decoder.feed(stream[start:end])
    decoder.close()
    assert out == msgs
    assert decoder.pending == 0


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_decoder_garbage_is_typed(garbage: bytes) -> None:
    decoder = FrameDecoder(max_frame=32)
    try:
        decoder.feed(garbage)
        decoder.close()
    except ChannelError:
        pass


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"not json", b"[1,2]", b'"s"', b"", b"NaN", b'{"a":Infinity}',
                                     b"[" * 100000])
def test_bad_payloads(payload: bytes) -> None:
    with pytest.raises(ChannelError):
        FrameDecoder(max_frame=1 << 20).feed(frame(payload))


def test_oversize_refused_from_header_alone() -> None:
    decoder = FrameDecoder(max_frame=16)
    with pytest.raises(ChannelError, match="exceeds"):
        decoder.feed(struct.pack(">I", 17))
    with pytest.raises(ChannelError, match="exceeds"):
        encode_frame({"op": "x" * 20}, max_frame=16)
    assert len(encode_frame({"op": "x" * 5}, max_frame=16)) == 4 + 14


@pytest.mark.parametrize("obj", [["op"], {"op": float("nan")}, {"op": object()}, {1: object()}])
def test_encode_rejects(obj: object) -> None:
    with pytest.raises(ChannelError):
        encode_frame(obj)  # type: ignore[arg-type]


def test_truncated_stream() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame({"op": "a"})[:-1]) == []
    with pytest.raises(ChannelError, match="inside a frame"):
        decoder.close()


async def test_async_adapters_roundtrip() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode_frame({"op": "a"}) + encode_frame({"op": "b"}))
    reader.feed_eof()
    assert await read_frame(reader) == {"op": "a"}
    assert await read_frame(reader) == {"op": "b"}
    assert await read_frame(reader) is None

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await write_frame(w, {"op": "echo", "got": await read_frame(r)})
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await write_frame(w, {"op": "hi"})
        assert await read_frame(r) == {"op": "echo", "got": {"op": "hi"}}
        w.close()


@pytest.mark.parametrize("data", [b"\x00\x00", encode_frame({"op": "a"})[:-2], struct.pack(">I", 1 << 30)])
async def test_async_reader_errors(data: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    with pytest.raises(ChannelError):
        await read_frame(reader)


class Trickle(io.RawIOBase):
    """A raw file returning at most 3 bytes per read, like a pipe under load."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk, self._data = self._data[:min(size, 3)], self._data[min(size, 3):]
        return chunk


def test_blocking_channel() -> None:
    out = io.BytesIO()
    channel = BlockingChannel(Trickle(encode_frame({"op": "a", "v": [1]}) + encode_frame({"op": "b"})), out)
    assert channel.recv() == {"op": "a", "v": [1]}
    assert channel.recv() == {"op": "b"}
    assert channel.recv() is None
    channel.send({"op": "c"})
    assert FrameDecoder().feed(out.getvalue()) == [{"op": "c"}]
    with pytest.raises(ChannelError):
        BlockingChannel(Trickle(encode_frame({"op": "a"})[:5]), out).recv()
    with pytest.raises(ChannelError):
        BlockingChannel(Trickle(b"\x00\x01"), out).recv()


def test_blocking_send_finishes_short_writes() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
            piece = bytes(b[:1000])
            self.data += piece
            return len(piece)

    sink = Trickle()
    BlockingChannel(io.BytesIO(), sink).send({"op": "publish", "blob": "x" * 50_000})
    assert FrameDecoder().feed(bytes(sink.data)) == [{"op": "publish", "blob": "x" * 50_000}]
