"""Engine-side data plane: copy whole blocks between vLLM's KV tensors and the daemon's arena.

The arena mapping itself is ``tokencake.clients.kv_arena.ArenaMapping`` (the one engine-side
view of the daemon's segment); this module only knows vLLM's tensors. A host slot holds one
engine block of every layer, layer after layer: ``slot[l * page : (l + 1) * page]`` is the
raw bytes of ``kv_caches[layer l][block]``. Bytes are copied as they lie in the engine's
tensor, so the slot format is the attention backend's in-block layout; the connector puts
that layout's name into the registered ``KvLayout`` so blocks never cross between layouts
that order bytes differently.

Only tensors whose first dimension is the block index are supported (vLLM-CPU's
``(num_blocks, kv_heads, block_size, 2 * head_dim)``). Backends that put K/V first
(``(2, num_blocks, ...)``) are refused at registration with a clear error: that path is not
written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from tokencake.clients.kv_arena import ArenaMapping

logger = logging.getLogger(__name__)


class LayoutUnsupported(RuntimeError):
    """The engine's KV tensors cannot be copied block-by-block by this copier."""


def block_views(kv_caches: Sequence[torch.Tensor], device: str = "cpu") -> list[torch.Tensor]:
    """``(num_blocks, page_bytes)`` uint8 views of each layer's KV tensor, all on ``device``."""
    views = []
    for kv in kv_caches:
        if kv.device.type != device:
            raise LayoutUnsupported(f"KV tensor on {kv.device}, expected {device}")
        if not kv.is_contiguous():
            raise LayoutUnsupported("KV tensor is not contiguous; block-major layout expected")
        views.append(kv.view(kv.shape[0], -1).view(torch.uint8))
    pages = {v.shape[1] for v in views}
    blocks = {v.shape[0] for v in views}
    if len(pages) != 1 or len(blocks) != 1:
        raise LayoutUnsupported(f"layers differ in page size {pages} or block count {blocks}")
    return views


def open_arena(name: str, arena_bytes: int, slot_bytes: int) -> ArenaMapping:
    """Map the daemon's arena for copies. Pages fault in on first use rather than all at
    once: the worker opens the arena inside a forward step, where pre-faulting a large arena
    would stall the batch."""
    return ArenaMapping.open(name, slot_bytes, min_bytes=arena_bytes, populate=False)


def close_arena(arena: ArenaMapping) -> None:
    try:
        arena.close()
    except Exception as exc:  # a view still exported: leave it mapped rather than fail a step
        logger.debug("arena %s left mapped: %s", arena.name, exc)


class BlockCopier:
    """Copies block lists between vLLM's per-layer CPU KV tensors and the arena."""

    def __init__(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.layers = block_views(kv_caches)
        self.page_bytes = int(self.layers[0].shape[1])
        self.num_blocks = int(self.layers[0].shape[0])
        self.bytes_per_block = self.page_bytes * len(self.layers)

    def to_arena(self, arena: ArenaMapping, blocks: Sequence[int], slots: Sequence[int]) -> None:
        arena.write_layers(slots, self.layers, blocks)

    def from_arena(self, arena: ArenaMapping, slots: Sequence[int], blocks: Sequence[int]) -> None:
        arena.read_layers(slots, self.layers, blocks)
