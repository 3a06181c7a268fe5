"""The daemon's copy worker: one process per GPU that moves blocks between engines' GPU KV
(opened through CUDA IPC) and the arena, so the daemon's event loop never touches CUDA.

Run as ``python -m tokencake.daemon.gpu.copy_worker --kind cuda --device-uuid GPU-...``;
the daemon starts it (``service.py``) and speaks ``wire.py`` frames over its stdin/stdout.

- ``open``: map the arena (again, if it changed), open the engine's exported tensors, and
  build a ``DeviceBlockMover`` over them that follows only the engines' IPC events (the
  worker has no compute stream the engine's work is on).
- ``copy``: start it on the mover's side stream, ordered after ``after`` (the event the
  engine recorded on its compute stream when it lent the blocks); ``finished`` goes back
  once the device has moved every byte, or with the error.
- A failure the device reports, or a copy that runs past ``--deadline-s``, is fatal: the
  worker says so and exits, so no copy of a broken context can land later. The daemon then
  fails every copy that was in flight and starts a new worker when one is needed.
- End of stdin (the daemon is gone): exit at once, without waiting for the device; a process
  that exits stops its DMAs, so engines can reuse lent blocks once this process is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import mmap
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from tokencake.daemon.gpu import wire
from tokencake.gpu.block_mover import DeviceBlockMover
from tokencake.gpu.device import Device
from tokencake.gpu.mover import CopyError, CopyHandle
from tokencake.gpu.regions import block_regions
from tokencake.segment import SLOT_BASE_OFFSET, segment_path, slot_count, verify_segment

logger = logging.getLogger(__name__)

FAKE_POLLS_ENV = "TOKENCAKE_FAKE_GPU_POLLS"
"""For the fake device only: polls before each copy's event completes."""


class HostSlots:
    """The daemon's arena mapped in this process (the ``HostArena`` a mover copies into)."""

    def __init__(self, name: str, size: int, slot_bytes: int) -> None:
        path = segment_path(name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = verify_segment(fd, path, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name, self.slot_bytes, self.size = name, slot_bytes, size
        self.num_slots = slot_count(size, slot_bytes)
        flat = np.frombuffer(self._mm, dtype=np.uint8, count=size)
        end = SLOT_BASE_OFFSET + self.num_slots * slot_bytes
        self._slots: np.ndarray | None = flat[SLOT_BASE_OFFSET:end].reshape(-1, slot_bytes)

    def slots_view(self) -> np.ndarray:
        assert self._slots is not None, "arena closed"
        return self._slots

    def close(self) -> None:
        self._slots = None
        try:
            self._mm.close()
        except BufferError:  # a tensor over it is still alive; the exit unmaps it
            logger.debug("arena %s left mapped", self.name)


@dataclass(slots=True)
class _InFlight:
    handle: CopyHandle
    started: float


class Fatal(Exception):
    """The device cannot be trusted any more; the worker must exit."""


class CopyWorker:
    """The worker's state, driven by ``handle`` (messages) and ``poll`` (completions)."""

    def __init__(
        self,
        device: Device,
        send: Callable[[msgspec.Struct], None],
        *,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.send = send
        self.deadline_s = deadline_s
        self.clock = clock
        self.engines: dict[str, DeviceBlockMover] = {}
        self.arena: HostSlots | None = None
        self.inflight: dict[int, _InFlight] = {}

    def handle(self, msg: wire.ToWorker) -> None:
        if isinstance(msg, wire.OpenEngine):
            self._open(msg)
        elif isinstance(msg, wire.CloseEngine):
            mover = self.engines.pop(msg.engine_id, None)
            if mover is not None:
                mover.close()
        else:
            self._copy(msg)

    def _open(self, msg: wire.OpenEngine) -> None:
        old = self.engines.pop(msg.engine_id, None)
        if old is not None:
            old.close()
        try:
            self._map_arena(msg.arena_name, msg.arena_bytes, msg.slot_bytes)
            tensors = [self.device.open(t) for t in msg.tensors]
            regions = block_regions(tensors, msg.num_blocks)
            mover = DeviceBlockMover(self.device, regions, follow_compute=False)
        except (CopyError, OSError) as exc:
            self.send(wire.Opened(msg.engine_id, f"cannot open the KV tensors: {exc}"))
            return
        self.engines[msg.engine_id] = mover
        self.send(wire.Opened(msg.engine_id))

    def _map_arena(self, name: str, size: int, slot_bytes: int) -> None:
        a = self.arena
        if a is not None and (a.name, a.size, a.slot_bytes) == (name, size, slot_bytes):
            return
        if a is not None:
            for mover in self.engines.values():
                mover.release(a)
            a.close()
            self.arena = None
        self.arena = HostSlots(name, size, slot_bytes)

    def _copy(self, msg: wire.Copy) -> None:
        mover = self.engines.get(msg.engine_id)
        if mover is None or self.arena is None:
            self.send(wire.Finished(msg.copy_id, "the engine's KV tensors are not open"))
            return
        try:
            if msg.upload:
                handle = mover.load(self.arena, msg.slots, msg.blocks, after=msg.after)
            else:
                handle = mover.store(self.arena, msg.blocks, msg.slots, after=msg.after)
        except CopyError as exc:
            self.send(wire.Finished(msg.copy_id, str(exc)))
            return
        self.inflight[msg.copy_id] = _InFlight(handle, self.clock())

    def poll(self) -> None:
        """Report finished copies. Raises ``Fatal`` on a device fault or an overrun."""
        now = self.clock()
        for copy_id, job in list(self.inflight.items()):
            try:
                done = job.handle.poll()
            except CopyError as exc:
                raise Fatal(f"copy {copy_id}: {exc}") from exc
            if done:
                del self.inflight[copy_id]
                self.send(wire.Finished(copy_id))
            elif now - job.started > self.deadline_s:
                raise Fatal(f"copy {copy_id} still running after {self.deadline_s:g} s")


def open_device(kind: str, uuid: str) -> Device:
    if kind == "fake":
        from tokencake.daemon.gpu.fake import FakeDevice

        return FakeDevice(polls=int(os.environ.get(FAKE_POLLS_ENV, "0")))
    from tokencake.gpu.device import CudaDevice, cuda_index_of

    return CudaDevice(cuda_index_of(uuid))


def serve(worker: CopyWorker, fd_in: int) -> int:
    """Read frames until the daemon goes away; poll copies in between."""
    sel = selectors.DefaultSelector()
    sel.register(fd_in, selectors.EVENT_READ)
    reader = wire.FrameReader()
    while True:
        # polled often while copies run; otherwise woken by the daemon or the deadline check
        for _key, _ev in sel.select(0.0002 if worker.inflight else 1.0):
            data = os.read(fd_in, 1 << 20)
            if not data:
                return 0
            for raw in reader.feed(data):
                worker.handle(wire.to_worker.decode(raw))
        worker.poll()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokencake-copy-worker")
    ap.add_argument("--kind", choices=("cuda", "fake"), required=True)
    ap.add_argument("--device-uuid", required=True)
    ap.add_argument("--deadline-s", type=float, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when this ends
    logging.basicConfig(level=logging.INFO, format="copy-worker %(levelname)s %(message)s")
    out = sys.stdout.buffer.fileno()

    def send(msg: msgspec.Struct) -> None:
        wire.write_all(out, wire.frame(msg))

    try:
        worker = CopyWorker(
            open_device(args.kind, args.device_uuid), send, deadline_s=args.deadline_s
        )
        return serve(worker, sys.stdin.buffer.fileno())
    except (Fatal, CopyError, wire.WireError, msgspec.DecodeError, OSError) as exc:
        with contextlib.suppress(OSError):
            send(wire.Fatal(f"{type(exc).__name__}: {exc}"))
        logger.error("exiting: %s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
