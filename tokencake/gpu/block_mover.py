"""``DeviceBlockMover``: KV blocks on a device <-> the page-locked arena, on a side stream.

The same code runs on a GPU (``CudaDevice``) and on the test stand-in (``FakeDevice``); only
the device operations differ. A store, for each chunk of blocks:

1. gathers the chunk's blocks of every region (layer, or K and V of a layer) into one device
   staging buffer whose rows are slot-sized, so row ``i`` is slot ``i``'s bytes;
2. copies each run of consecutive slots to the arena in one ``copy_(non_blocking=True)``
   (``cudaMemcpyAsync`` device -> pinned host): random slots cost one DMA per block, a run
   one DMA in all.

A load is the reverse: slot runs into staging, then one ``index_copy_`` per region. The pairs
are sorted by slot first so runs are found. Every copy first orders itself after the work it
must not overtake: this process's compute stream (the engine's forward wrote or still reads
the blocks), or the engine's IPC event (the daemon's copy worker). The compute stream never
waits for a copy: whoever lent the blocks polls the returned handle and keeps the blocks out
of use until it reports done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokencake.gpu.device import Device, DeviceEvent
from tokencake.gpu.mover import BlockMover, CopyError, CopyHandle, HostArena

logger = logging.getLogger(__name__)

STAGE_BYTES = 32 << 20
"""Device staging per chunk: large enough that DMAs are long, small beside a KV cache."""


class DeviceCopy(CopyHandle):
    """A copy in flight on the side stream; done when its event is."""

    def __init__(self, event: DeviceEvent, started: float) -> None:
        self.event = event
        self.started = started
        self.done = False

    def poll(self) -> bool:
        if not self.done and self.event.query():
            self.done = True
            self.copy_s = time.perf_counter() - self.started  # an upper bound: when seen
        return self.done

    def wait(self) -> None:
        self.event.synchronize()
        self.poll()


class _Host:
    """An arena's slots as the device sees them: page-locked, as a torch tensor."""

    def __init__(self, device: Device, arena: HostArena) -> None:
        self.array = arena.slots_view()
        self.key = (arena.name, self.array.__array_interface__["data"][0])
        device.pin_host(self.array)
        self.flat = device.host_tensor(self.array.reshape(-1))
        self.slot_bytes = arena.slot_bytes


class DeviceBlockMover(BlockMover[HostArena]):
    """Copies between per-region ``(num_blocks, bytes)`` uint8 device views and the arena.

    ``regions`` come from ``regions.block_regions``; ``follow_compute`` says whether copies
    wait for this process's compute stream (an engine) or only for the ``after`` event a
    caller passes (the daemon's copy worker, which has no compute stream of its own).
    """

    def __init__(
        self,
        device: Device,
        regions: Sequence[Any],
        *,
        follow_compute: bool = True,
        stage_bytes: int = STAGE_BYTES,
    ) -> None:
        if not regions or not all(device.owns(r) for r in regions):
            raise CopyError(f"KV tensors are not on the {device.kind} device {device.index}")
        self.device = device
        self.path = device.kind
        self.regions = list(regions)
        self.widths = [int(r.shape[1]) for r in self.regions]
        self.offsets = list(np.cumsum([0, *self.widths[:-1]]))
        self.num_blocks = int(self.regions[0].shape[0])
        self.bytes_per_block = sum(self.widths)
        self.follow = follow_compute
        self.stage_bytes = stage_bytes
        self.stream = device.stream()
        self._stage: Any = None
        self._hosts: dict[str, _Host] = {}
        self._inflight: list[DeviceCopy] = []

    # ------------------------------------------------------------------ interface

    def store(
        self, arena: HostArena, blocks: Sequence[int], slots: Sequence[int], after: bytes = b""
    ) -> CopyHandle:
        return self._run(arena, list(blocks), list(slots), to_arena=True, after=after)

    def load(
        self, arena: HostArena, slots: Sequence[int], blocks: Sequence[int], after: bytes = b""
    ) -> CopyHandle:
        return self._run(arena, list(blocks), list(slots), to_arena=False, after=after)

    def release(self, arena: HostArena) -> None:
        host = self._hosts.pop(arena.name, None)
        if host is not None:
            self._drain()
            self.device.unpin_host(host.array)

    def close(self) -> None:
        self._drain()
        for name in list(self._hosts):
            self.device.unpin_host(self._hosts.pop(name).array)
        self._stage = None

    # ------------------------------------------------------------------ copies

    def _run(
        self, arena: HostArena, blocks: list[int], slots: list[int], *, to_arena: bool, after: bytes
    ) -> CopyHandle:
        self.check(arena, blocks, slots)
        host = self._host(arena)
        started = time.perf_counter()
        order = sorted(range(len(slots)), key=slots.__getitem__)
        slots = [slots[i] for i in order]
        blocks = [blocks[i] for i in order]
        try:
            if self.follow:
                self.device.follow_compute(self.stream)
            if after:
                self.device.follow_ipc_event(self.stream, after)
            with self.device.on(self.stream):
                # made (and zeroed) on the side stream, so the copies queue behind its fill
                stage = self._staging(host.slot_bytes)
                chunk = int(stage.shape[0])
                for start in range(0, len(slots), chunk):
                    part = slice(start, start + chunk)
                    self._chunk(host, stage, blocks[part], slots[part], to_arena)
            handle = DeviceCopy(self.device.record(self.stream), started)
        except CopyError:
            raise
        except RuntimeError as exc:  # what torch raises for a device error
            raise CopyError(f"{self.path} copy failed to start: {exc}") from exc
        self._inflight = [c for c in self._inflight if not c.done]
        self._inflight.append(handle)
        return handle

    def _chunk(
        self, host: _Host, stage: Any, blocks: list[int], slots: list[int], to_arena: bool
    ) -> None:
        n = len(blocks)
        idx = self.device.upload_ids(blocks)
        rows = stage[:n]
        if to_arena:
            for region, offset, width in zip(self.regions, self.offsets, self.widths, strict=True):
                # gather, then place: a few device copies more, no reliance on index_select
                # writing a strided ``out`` (device bandwidth is ~50x the link's)
                rows[:, offset : offset + width].copy_(region.index_select(0, idx))
        i = 0
        for first, count in slot_runs(slots):
            span = slice(first * host.slot_bytes, first * host.slot_bytes + count * host.slot_bytes)
            # The last slot of a run is copied only up to the block's end: its tail is unused.
            nbytes = count * host.slot_bytes - (host.slot_bytes - self.bytes_per_block)
            dev = rows[i : i + count].reshape(-1)[:nbytes]
            arena = host.flat[span][:nbytes]
            if to_arena:
                arena.copy_(dev, non_blocking=True)
            else:
                dev.copy_(arena, non_blocking=True)
            i += count
        if not to_arena:
            for region, offset, width in zip(self.regions, self.offsets, self.widths, strict=True):
                region.index_copy_(0, idx, rows[:, offset : offset + width])

    def _host(self, arena: HostArena) -> _Host:
        """The arena as a pinned tensor, set up once per mapping (a remapped arena, even under
        the same name, is a new mapping: the old one is released first)."""
        host = self._hosts.get(arena.name)
        address = arena.slots_view().__array_interface__["data"][0]
        if host is not None and host.key == (arena.name, address):
            return host
        if host is not None:
            self.release(arena)
        host = self._hosts[arena.name] = _Host(self.device, arena)
        return host

    def _staging(self, slot_bytes: int) -> Any:
        import torch

        rows = max(1, self.stage_bytes // slot_bytes)
        if self._stage is None or tuple(self._stage.shape) != (rows, slot_bytes):
            self._drain()
            # zeroed once: slot padding copied out of it never carries stale device memory
            self._stage = torch.zeros(
                (rows, slot_bytes), dtype=torch.uint8, device=self.regions[0].device
            )
        return self._stage

    def _drain(self) -> None:
        """Wait for this mover's copies in flight (before their memory is touched)."""
        for copy in self._inflight:
            try:
                copy.event.synchronize()
            except CopyError as exc:
                logger.warning("a copy failed while draining: %s", exc)
        self._inflight = []


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """``(first slot, count)`` of each run of consecutive slots in a sorted list."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs
