"""SGLang host-pool pages as byte ranges, and their copies to and from the daemon's arena.

SGLang's host pools describe where a page lies through ``get_page_buffer_meta(indices)``:
a list of raw pointers and sizes, a fixed number of pieces per page (two for ``page_first``,
K then V; two per layer for ``layer_first``). Its zero-copy storage backends (Mooncake,
HF3FS) move exactly those pieces. This module does the same into a slot of the arena: a
slot holds a page's pieces back to back, in the pool's own order, so the slot format is the
pool's layout. The layout's name is part of the registered ``KvLayout``, so pages of one
layout are never served to another.

Pointers are never trusted: each piece must lie inside one of the pool's own CPU tensors
(``kv_buffer``, ``k_buffer``, ``v_buffer``) or the copy is refused. Copies are numpy views
on both sides (``np.copyto``), no intermediate buffer.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch

from tokencake.layout import DTYPE_BYTES, KvLayout, LayoutError

logger = logging.getLogger(__name__)

POOL_TENSORS: Final = ("kv_buffer", "k_buffer", "v_buffer")
_HEX: Final = frozenset("0123456789abcdef")
_KEY_PERSON: Final = b"tokencake-sglang"


class HostPoolError(ValueError):
    """A host pool, or a page of it, that this module cannot copy safely."""


def page_key(key: str) -> bytes:
    """The daemon's chain-hash bytes for one SGLang page key.

    SGLang's page keys are lowercase SHA-256 hex digests of a chain (each page's hash covers
    the whole prefix, seeded with the request's ``extra_key``/``cache_salt`` namespace), so
    they go to the daemon as their 32 raw bytes. Any other string (a custom caller's key) is
    hashed with a personalised BLAKE2b, so it cannot take the place of a real page hash.
    """
    if len(key) == 64 and _HEX.issuperset(key):
        return bytes.fromhex(key)
    return hashlib.blake2b(key.encode(), digest_size=32, person=_KEY_PERSON).digest()


@dataclass(frozen=True, slots=True)
class _Region:
    base: int
    nbytes: int
    view: np.ndarray  # uint8 over the tensor's whole storage


def _regions(pool: Any) -> list[_Region]:
    """The CPU memory a pool's page pointers may point into, sorted by address."""
    seen: dict[int, _Region] = {}
    for name in POOL_TENSORS:
        tensor = getattr(pool, name, None)
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        base, nbytes = storage.data_ptr(), storage.nbytes()
        if base in seen or nbytes == 0:
            continue
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
        seen[base] = _Region(base, nbytes, flat.numpy())
    return sorted(seen.values(), key=lambda r: r.base)


class HostPages:
    """One SGLang host pool seen page by page. Build it in ``register_mem_pool_host``."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        try:
            self.page_size = int(pool.page_size)
            self.layout_name = str(pool.layout)
            self.dtype = str(pool.dtype).removeprefix("torch.")
        except AttributeError as exc:
            raise HostPoolError(f"host pool {type(pool).__name__} lacks {exc.name}") from None
        if self.page_size <= 0:
            raise HostPoolError(f"page_size must be positive, got {self.page_size}")
        if not callable(getattr(pool, "get_page_buffer_meta", None)):
            raise HostPoolError(f"host pool {type(pool).__name__} has no get_page_buffer_meta")
        self._regions = _regions(pool)
        if not self._regions:
            raise HostPoolError(f"host pool {type(pool).__name__} has no CPU KV tensor")
        self._bases = [r.base for r in self._regions]
        probe = torch.arange(self.page_size, dtype=torch.int64)
        ptrs, sizes = self._meta(probe)
        if not ptrs:
            raise HostPoolError("the host pool describes a page as zero pieces")
        self.piece_sizes = [int(s) for s in sizes]
        self.bytes_per_page = sum(self.piece_sizes)

    # ------------------------------------------------------------------ geometry

    def kv_layout(self, model_id: str, *, tp_rank: int = 0, tp_size: int = 1) -> KvLayout:
        """The ``KvLayout`` of one page as a slot holds it."""
        layers = int(getattr(self.pool, "layer_num", 1) or 1)
        heads = int(getattr(self.pool, "head_num", 1) or 1)
        head_dim = int(getattr(self.pool, "head_dim", 1) or 1)
        layout = KvLayout(
            model_id=model_id[:256],
            num_layers=layers,
            block_size=self.page_size,
            num_kv_heads=heads,
            head_dim=head_dim,
            dtype=self.dtype,
            bytes_per_block=self.bytes_per_page,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        try:
            layout.validate()
        except LayoutError:
            # Pools whose pages are not K and V of equal heads (MLA's latent rows, K-only
            # pools): describe the page as one head wide enough for its bytes. The
            # fingerprint still covers the exact page bytes and the pool's name.
            width = self.bytes_per_page // (2 * self.page_size * layers * DTYPE_BYTES[self.dtype])
            layout = KvLayout(
                model_id=layout.model_id,
                num_layers=layers,
                block_size=self.page_size,
                num_kv_heads=1,
                head_dim=max(1, width),
                dtype=self.dtype,
                bytes_per_block=self.bytes_per_page,
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
            layout.validate()
        return layout

    # ------------------------------------------------------------------ copies

    def to_arena(self, slots_view: np.ndarray, host_indices: Any, slots: Sequence[int]) -> None:
        """Copy page ``i`` of ``host_indices`` into slot ``slots[i]``."""
        for slot, pieces in zip(slots, self.locate(host_indices, len(slots)), strict=True):
            row, offset = slots_view[slot], 0
            for view, start, size in pieces:
                np.copyto(row[offset : offset + size], view[start : start + size])
                offset += size

    def from_arena(self, slots_view: np.ndarray, host_indices: Any, slots: Sequence[int]) -> None:
        """Copy slot ``slots[i]`` into page ``i`` of ``host_indices``."""
        for slot, pieces in zip(slots, self.locate(host_indices, len(slots)), strict=True):
            row, offset = slots_view[slot], 0
            for view, start, size in pieces:
                np.copyto(view[start : start + size], row[offset : offset + size])
                offset += size

    def locate(self, host_indices: Any, num_pages: int) -> list[list[tuple[np.ndarray, int, int]]]:
        """``(region view, start, size)`` of every piece of the first ``num_pages`` pages.

        ``host_indices`` holds one host slot index per token, ``page_size`` per page, as
        SGLang passes them to ``batch_get_v1``/``batch_set_v1``.
        """
        indices = torch.as_tensor(host_indices)
        need = num_pages * self.page_size
        if indices.ndim != 1 or indices.numel() < need:
            raise HostPoolError(f"{indices.numel()} host indices for {num_pages} pages")
        if num_pages == 0:
            return []
        ptrs, sizes = self._meta(indices[:need])
        per_page = len(self.piece_sizes)
        if len(ptrs) != num_pages * per_page or len(sizes) != len(ptrs):
            raise HostPoolError(f"{len(ptrs)} pieces for {num_pages} pages of {per_page}")
        out: list[list[tuple[np.ndarray, int, int]]] = []
        for page in range(num_pages):
            pieces = []
            for k in range(per_page):
                ptr, size = int(ptrs[page * per_page + k]), int(sizes[page * per_page + k])
                if size != self.piece_sizes[k]:
                    raise HostPoolError(f"piece of {size} B where {self.piece_sizes[k]} B is")
                pieces.append(self._inside(ptr, size))
            out.append(pieces)
        return out

    def _meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        try:
            ptrs, sizes = self.pool.get_page_buffer_meta(indices)
        except (AssertionError, ValueError, IndexError) as exc:
            raise HostPoolError(f"get_page_buffer_meta refused: {exc}") from None
        return list(ptrs), list(sizes)

    def _inside(self, ptr: int, size: int) -> tuple[np.ndarray, int, int]:
        i = bisect.bisect_right(self._bases, ptr) - 1
        if i >= 0:
            region = self._regions[i]
            start = ptr - region.base
            if size >= 0 and start + size <= region.nbytes:
                return region.view, start, size
        raise HostPoolError(f"a page piece at {ptr:#x} (+{size}) is outside the host pool")
