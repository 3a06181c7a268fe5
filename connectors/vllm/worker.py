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

from tokencake.clients.kv_arena import ArenaMapping, copy_path

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")


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
    """Copies block lists between vLLM's per-layer CPU KV tensors and the arena.

    A transfer is one call into the C copy kernel built at install time (every (slot, layer)
    piece, GIL released), or, where it was not built or ``TOKENCAKE_COPY_KERNEL=numpy``, one
    staged numpy gather/scatter per layer. The kernel is loaded here at worker start-up, and
    the path is logged, so no forward step pays for the load.
    """

    def __init__(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.layers = block_views(kv_caches)
        self.page_bytes = int(self.layers[0].shape[1])
        self.num_blocks = int(self.layers[0].shape[0])
        self.bytes_per_block = self.page_bytes * len(self.layers)
        # numpy views of the same memory, made once rather than on every copy
        self._arrays = [layer.numpy() for layer in self.layers]
        self.path = copy_path()
        logger.info("TokenCake CPU block copies use the %s path", self.path)

    def to_arena(self, arena: ArenaMapping, blocks: Sequence[int], slots: Sequence[int]) -> None:
        arena.write_layers(slots, self._arrays, blocks)

    def from_arena(self, arena: ArenaMapping, slots: Sequence[int], blocks: Sequence[int]) -> None:
        arena.read_layers(slots, self._arrays, blocks)


class CudaBlockCopier:
    """Copies block lists between vLLM's per-layer CUDA KV tensors and the pinned arena.

    UNTESTED ON HARDWARE: written against torch's CUDA API, never run on a GPU. It runs only
    when the KV tensors are CUDA tensors and ``torch.cuda.is_available()``; on CPU the worker
    uses ``BlockCopier``.

    The arena is page-locked once (``ArenaMapping.register_pinned``, cudaHostRegister) so
    copies are DMA, and every copy runs on a side stream so it overlaps the forward:

    - store: the side stream first waits for the compute stream (the forward wrote the
      blocks), gathers up to ``chunk`` blocks of every layer into one contiguous GPU staging
      buffer, then copies each block's row to its slot with ``copy_(non_blocking=True)``
      (cudaMemcpyAsync device-to-pinned-host). One staging buffer is reused chunk after
      chunk: the side stream orders the gathers and copies, so nothing is overwritten early.
    - load: the reverse; pinned slot rows to staging, then one scatter per layer.

    Each call returns a CUDA event recorded after its last copy. The caller reports the job
    finished only once ``event.query()`` is true, so vLLM neither reuses a block being read
    nor runs a request on a block being written.
    """

    def __init__(self, kv_caches: Sequence[torch.Tensor], chunk: int = 16) -> None:
        if not torch.cuda.is_available():
            raise LayoutUnsupported("CUDA KV tensors but torch.cuda.is_available() is False")
        self.layers = block_views(kv_caches, device="cuda")
        self.device = self.layers[0].device
        self.page_bytes = int(self.layers[0].shape[1])
        self.num_blocks = int(self.layers[0].shape[0])
        self.bytes_per_block = self.page_bytes * len(self.layers)
        self.chunk = max(1, chunk)
        self.stream = torch.cuda.Stream(device=self.device)
        self._staging = torch.empty(
            (self.chunk, self.bytes_per_block), dtype=torch.uint8, device=self.device
        )
        self._host: torch.Tensor | None = None
        self._arena_name = ""

    def _host_slots(self, arena: ArenaMapping) -> torch.Tensor:
        if self._host is None or self._arena_name != arena.name:
            if not arena.register_pinned():
                raise LayoutUnsupported("cannot page-lock the arena (cudaHostRegister failed)")
            self._host = torch.from_numpy(arena.slots_view())
            self._arena_name = arena.name
        return self._host

    def _check(
        self, arena: ArenaMapping, slots: Sequence[int], blocks: Sequence[int]
    ) -> torch.Tensor:
        if len(slots) != len(blocks):
            raise ValueError("slots and blocks differ in length")
        if arena.slot_bytes < self.bytes_per_block:
            raise ValueError(f"slot of {arena.slot_bytes} B < block of {self.bytes_per_block} B")
        if blocks and (min(blocks) < 0 or max(blocks) >= self.num_blocks):
            raise ValueError("engine block id out of range")
        if slots and (min(slots) < 0 or max(slots) >= arena.num_slots):
            raise ValueError("arena slot out of range")
        return self._host_slots(arena)

    def to_arena(
        self, arena: ArenaMapping, blocks: Sequence[int], slots: Sequence[int]
    ) -> torch.cuda.Event:
        host = self._check(arena, slots, blocks)
        nb, p = self.bytes_per_block, self.page_bytes
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for start in range(0, len(blocks), self.chunk):
                part = blocks[start : start + self.chunk]
                idx = torch.tensor(part, dtype=torch.long).to(self.device, non_blocking=True)
                stage = self._staging[: len(part)]
                for layer, view in enumerate(self.layers):
                    torch.index_select(view, 0, idx, out=stage[:, layer * p : (layer + 1) * p])
                for i, slot in enumerate(slots[start : start + self.chunk]):
                    host[slot, :nb].copy_(stage[i], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def from_arena(
        self, arena: ArenaMapping, slots: Sequence[int], blocks: Sequence[int]
    ) -> torch.cuda.Event:
        host = self._check(arena, slots, blocks)
        nb, p = self.bytes_per_block, self.page_bytes
        with torch.cuda.stream(self.stream):
            for start in range(0, len(slots), self.chunk):
                part = slots[start : start + self.chunk]
                stage = self._staging[: len(part)]
                for i, slot in enumerate(part):
                    stage[i].copy_(host[slot, :nb], non_blocking=True)
                idx = torch.tensor(blocks[start : start + self.chunk], dtype=torch.long)
                idx = idx.to(self.device, non_blocking=True)
                for layer, view in enumerate(self.layers):
                    view.index_copy_(0, idx, stage[:, layer * p : (layer + 1) * p])
            event = torch.cuda.Event()
            event.record(self.stream)
        # Blocks the side stream wrote are read by later forwards on the compute stream;
        # the job is only reported done after ``event.query()``, and vLLM schedules the
        # request after that, so the compute stream never reads a block still in flight.
        return event


Copier = BlockCopier | CudaBlockCopier


def make_copier(kv_caches: Sequence[torch.Tensor]) -> Copier:
    """``CudaBlockCopier`` for CUDA KV tensors (when CUDA is available), else the CPU copier."""
    if kv_caches and kv_caches[0].device.type == "cuda" and torch.cuda.is_available():
        return CudaBlockCopier(kv_caches)
    return BlockCopier(kv_caches)
