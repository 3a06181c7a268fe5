"""Engine-side data plane: copy whole blocks between vLLM's KV tensors and the daemon's arena.

A host slot holds one engine block of every layer, layer after layer:
``slot[l * page : (l + 1) * page]`` is the raw bytes of ``kv_caches[layer l][block]``.
Bytes are copied as they lie in the engine's tensor, so the slot format is the attention
backend's in-block layout; the connector puts that layout's name into the registered
``KvLayout`` so blocks never cross between layouts that order bytes differently.

Only tensors whose first dimension is the block index are supported (vLLM-CPU's
``(num_blocks, kv_heads, block_size, 2 * head_dim)``). CUDA backends that put K/V first
(``(2, num_blocks, ...)``) are refused at registration with a clear error: that path is not
written.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


class LayoutUnsupported(RuntimeError):
    """The engine's KV tensors cannot be copied block-by-block by this copier."""


def block_views(kv_caches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``(num_blocks, page_bytes)`` uint8 views of each layer's KV tensor."""
    views = []
    for kv in kv_caches:
        if kv.device.type != "cpu":
            raise LayoutUnsupported(
                f"KV tensor on {kv.device}: only CPU tensors are supported (CUDA path not written)"
            )
        if not kv.is_contiguous():
            raise LayoutUnsupported("KV tensor is not contiguous; block-major layout expected")
        views.append(kv.view(kv.shape[0], -1).view(torch.uint8))
    pages = {v.shape[1] for v in views}
    blocks = {v.shape[0] for v in views}
    if len(pages) != 1 or len(blocks) != 1:
        raise LayoutUnsupported(f"layers differ in page size {pages} or block count {blocks}")
    return views


class ArenaMap:
    """The daemon's arena segment mapped into this process, as a ``(num_slots, slot_bytes)``
    uint8 tensor. Remapped when the daemon restarts (a new arena has a new name)."""

    def __init__(self, name: str, arena_bytes: int, slot_bytes: int, shm_dir: str = SHM_DIR):
        if "/" in name or not name:
            raise ValueError(f"bad arena name {name!r}")
        self.name = name
        self.slot_bytes = slot_bytes
        fd = os.open(os.path.join(shm_dir, name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size < arena_bytes:
                raise ValueError(f"arena {name} holds {size} bytes, expected {arena_bytes}")
            self._mm: mmap.mmap | None = mmap.mmap(fd, arena_bytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        num_slots = arena_bytes // slot_bytes
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=num_slots * slot_bytes)
        self.slots: torch.Tensor | None = flat.view(num_slots, slot_bytes)

    def close(self) -> None:
        self.slots = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                logger.debug("arena %s still referenced; left mapped", self.name)
            self._mm = None


class BlockCopier:
    """Copies block lists in one indexed op per layer (no per-block Python loop)."""

    def __init__(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.layers = block_views(kv_caches)
        self.page_bytes = int(self.layers[0].shape[1])
        self.num_blocks = int(self.layers[0].shape[0])
        self.bytes_per_block = self.page_bytes * len(self.layers)

    def _check(self, arena: ArenaMap, slots: Sequence[int], blocks: Sequence[int]) -> None:
        if len(slots) != len(blocks):
            raise ValueError("slots and blocks differ in length")
        if arena.slot_bytes < self.bytes_per_block:
            raise ValueError(f"slot of {arena.slot_bytes} B < block of {self.bytes_per_block} B")
        if blocks and (min(blocks) < 0 or max(blocks) >= self.num_blocks):
            raise ValueError("engine block id out of range")

    def to_arena(self, arena: ArenaMap, blocks: Sequence[int], slots: Sequence[int]) -> None:
        self._check(arena, slots, blocks)
        if not blocks:
            return
        assert arena.slots is not None
        src = torch.tensor(blocks, dtype=torch.long)
        dst = torch.tensor(slots, dtype=torch.long)
        p = self.page_bytes
        for layer, view in enumerate(self.layers):
            arena.slots[dst, layer * p : (layer + 1) * p] = view.index_select(0, src)

    def from_arena(self, arena: ArenaMap, slots: Sequence[int], blocks: Sequence[int]) -> None:
        self._check(arena, slots, blocks)
        if not slots:
            return
        assert arena.slots is not None
        src = torch.tensor(slots, dtype=torch.long)
        dst = torch.tensor(blocks, dtype=torch.long)
        p = self.page_bytes
        rows = arena.slots.index_select(0, src)
        for layer, view in enumerate(self.layers):
            view.index_copy_(0, dst, rows[:, layer * p : (layer + 1) * p])
