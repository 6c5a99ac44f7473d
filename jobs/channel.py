"""Framing of the narrow host↔sandbox channel.

The channel is a plain byte stream (pipes for the process backend, virtio-serial for a
microVM, a stream for a confidential pod) carrying frames: a 4-byte big-endian payload
length followed by the payload, one UTF-8 JSON object (RFC 8259, no NaN/Infinity).
Frames larger than ``max_frame`` bytes (default 4 MiB) are refused on both ends, so a
misbehaving peer can never make the other side buffer without bound.

The core (:func:`encode_frame`, :class:`FrameDecoder`) is sans-I/O; :func:`read_frame` /
:func:`write_frame` adapt it to asyncio streams (host side) and :class:`BlockingChannel`
to blocking binary files (runner side).
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, BinaryIO

from jobs.sandbox_errors import ChannelError

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
HEADER = struct.Struct(">I")


def _reject_constant(name: str) -> Any:
    raise ChannelError(f"frame holds the non-JSON number {name}")


def _check_length(length: int, max_frame: int) -> None:
    if length > max_frame:
        raise ChannelError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")


def encode_frame(obj: dict[str, Any], *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one JSON object as a length-prefixed frame."""
    if not isinstance(obj, dict):
        raise ChannelError(f"a frame must hold a JSON object, not {type(obj).__name__}")
    try:
        payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ChannelError(f"message is not JSON-serialisable: {exc}") from None
    _check_length(len(payload), max_frame)
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse one frame's payload; it must be a UTF-8 JSON object."""
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ChannelError("frame payload is not UTF-8") from None
    except (ValueError, RecursionError):
        raise ChannelError("frame payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ChannelError(f"a frame must hold a JSON object, not {type(obj).__name__}")
    return obj


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back the complete frames."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Append ``data``; return every frame now complete, in order."""
        self._buffer += data
        frames: list[dict[str, Any]] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, offset)
            _check_length(length, self._max_frame)
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append(decode_payload(bytes(buffer[offset + HEADER.size:end])))
            offset = end
        del buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)

    def close(self) -> None:
        """Declare end of stream; a partly received frame is an error."""
        if self._buffer:
            raise ChannelError(f"stream ended inside a frame ({len(self._buffer)} bytes pending)")


async def read_frame(reader: asyncio.StreamReader, *, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any] | None:
    """Read one frame; ``None`` on end of stream at a frame boundary."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ChannelError("stream ended inside a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    _check_length(length, max_frame)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ChannelError("stream ended inside a frame payload") from None
    return decode_payload(payload)


async def write_frame(writer: asyncio.StreamWriter, obj: dict[str, Any], *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    """Write one frame and wait until the transport has taken it."""
    writer.write(encode_frame(obj, max_frame=max_frame))
    await writer.drain()


class BlockingChannel:
    """The runner's end: frames over blocking binary files (e.g. stdin/stdout buffers)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._rfile = rfile
        self._wfile = wfile
        self._max_frame = max_frame

    def _read_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self._rfile.read(size - len(chunks))
            if not chunk:
                break
            chunks += chunk
        return bytes(chunks)

    def send(self, obj: dict[str, Any]) -> None:
        """Write one frame and flush it. An unbuffered file may take less than asked per write
        (a virtio-serial port takes at most 32 KiB), so the rest is written until none is left."""
        view = memoryview(encode_frame(obj, max_frame=self._max_frame))
        while view:
            written = self._wfile.write(view)
            if written is None:
                raise ChannelError("the channel cannot take data without blocking")
            view = view[written:]
        self._wfile.flush()

    def recv(self) -> dict[str, Any] | None:
        """Read one frame; ``None`` on end of stream at a frame boundary."""
        header = self._read_exact(HEADER.size)
        if not header:
            return None
        if len(header) < HEADER.size:
            raise ChannelError("stream ended inside a frame header")
        (length,) = HEADER.unpack(header)
        _check_length(length, self._max_frame)
        payload = self._read_exact(length)
        if len(payload) < length:
            raise ChannelError("stream ended inside a frame payload")
        return decode_payload(payload)
