"""Messages between the daemon and its copy worker: length-prefixed msgpack over pipes.

The daemon writes to the worker's stdin and reads its stdout. The worker treats the end of
its stdin as the daemon's death and exits at once, so a worker never outlives its daemon by
more than one read.
"""

from __future__ import annotations

import os
import struct

import msgspec

from tokencake import protocol as p

HEADER = struct.Struct("<I")
MAX_FRAME = 64 << 20


class OpenEngine(msgspec.Struct, tag="open"):
    engine_id: str
    num_blocks: int
    tensors: list[p.GpuKvTensor]
    arena_name: str
    arena_bytes: int
    slot_bytes: int


class CloseEngine(msgspec.Struct, tag="close"):
    engine_id: str


class Copy(msgspec.Struct, tag="copy"):
    copy_id: int
    engine_id: str
    upload: bool
    blocks: list[int]
    slots: list[int]
    after: bytes = b""


class Opened(msgspec.Struct, tag="opened"):
    engine_id: str
    error: str = ""


class Finished(msgspec.Struct, tag="finished"):
    copy_id: int
    error: str = ""


class Fatal(msgspec.Struct, tag="fatal"):
    """The worker's device is unusable; it exits after sending this."""

    error: str


ToWorker = OpenEngine | CloseEngine | Copy
FromWorker = Opened | Finished | Fatal

_encoder = msgspec.msgpack.Encoder()
to_worker = msgspec.msgpack.Decoder(ToWorker)
from_worker = msgspec.msgpack.Decoder(FromWorker)


class WireError(RuntimeError):
    """A frame that is too large or does not decode."""


def frame(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Accumulates bytes from a pipe and cuts them into frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise WireError(f"frame of {n} bytes")
            if len(self._buf) < HEADER.size + n:
                break
            out.append(bytes(self._buf[HEADER.size : HEADER.size + n]))
            del self._buf[: HEADER.size + n]
        return out
