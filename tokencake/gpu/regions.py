"""An engine's KV tensors as block-strided byte regions, and the slot byte order they give.

A copy moves whole engine blocks. Whatever the engine's layout, each KV tensor is cut into
*regions*: ``(num_blocks, run_bytes)`` uint8 views whose row ``b`` is one dense run of block
``b``'s bytes (the row stride may be larger than the run: other layers' or other heads'
pages lie in between). A slot holds one block of every region, region after region.

How a tensor is cut, from its strides alone (no layout name is trusted):

- the block axis is axis 0, or axis 1 of a legacy K/V-first tensor ``(2, num_blocks, ...)``;
- an axis whose stride is larger than the block axis's (the K/V axis of a K/V-first tensor,
  the head axis of vLLM's ``LHBNC``) gives one region per index;
- the remaining axes, innermost first, form the dense run as long as each stride is the
  product of the sizes inside it; an axis that breaks the run (the head axis of ``BHLNC``:
  other layers lie between heads) gives one region per index too;
- axes of size 1 are left out: they change no byte's place.

vLLM 0.32 hands the connector one 4D view per layer, logical ``[B, H, N, C]`` (blocks,
head slots, tokens, K and V bytes of one head and token), with strides set by its resolved
``KVCacheLayout`` (``vllm/v1/kv_cache_interface.py``, ``create_kv_cache_views``). The slot's
byte order is then ``HNC`` (heads outside tokens: ``LBHNC``, ``BLHNC``, ``LHBNC``, ``BHLNC``)
or ``NHC`` (``LBNHC``, ``BLNHC``, the default on CUDA); ``slot_order`` names it, so layouts
whose blocks are not byte-compatible never share a name.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tokencake.gpu.mover import CopyError

AXES_4D = "BHNC"
"""vLLM 0.32's logical per-layer axes: blocks, head slots, tokens (states), content bytes."""
AXES_KV_FIRST = "KBNHD"
"""A legacy K/V-first layer ``(2, num_blocks, block_size, heads, head_bytes)``."""


def block_regions(kv_caches: Sequence[Any], num_blocks: int | None = None) -> list[Any]:
    """``(num_blocks, run_bytes)`` uint8 views of the engine's KV, in slot order.

    K/V-first is recognised only when ``num_blocks`` is given and is not 2.
    """
    regions: list[Any] = []
    for kv in kv_caches:
        regions.extend(_cut(kv, num_blocks)[0])
    if not regions:
        raise CopyError("no KV tensors")
    if len({int(r.shape[0]) for r in regions}) != 1:
        raise CopyError("KV tensors differ in block count")
    if num_blocks is not None and int(regions[0].shape[0]) != num_blocks:
        raise CopyError(f"KV tensors hold {regions[0].shape[0]} blocks, expected {num_blocks}")
    return regions


def slot_order(kv_caches: Sequence[Any], num_blocks: int | None = None) -> str:
    """The byte order of one layer's part of a slot, as axis letters (``AXES_4D`` for a 4D
    layer, ``AXES_KV_FIRST`` for a K/V-first one): ``"HNC"``, ``"NHC"``, ``"KNHD"``...
    Raises ``CopyError`` when the layers disagree or have another rank."""
    orders = set()
    for kv in kv_caches:
        _regions, axes, block_axis = _cut(kv, num_blocks)
        if kv.dim() == 4 and block_axis == 0:
            letters = AXES_4D
        elif kv.dim() == 5 and block_axis == 1:
            letters = AXES_KV_FIRST
        else:
            raise CopyError(f"a {kv.dim()}-D KV tensor has no known slot order")
        orders.add("".join(letters[a] for a in axes))
    if len(orders) != 1:
        raise CopyError(f"KV layers differ in byte order: {sorted(orders)}")
    return orders.pop()


def _bytes(kv: Any) -> Any:
    """``kv`` with its last axis in bytes (a view, never a copy)."""
    import torch

    if kv.dim() == 0 or kv.stride(-1) != 1:
        raise CopyError("KV tensor's last axis is not dense")
    return kv if kv.dtype == torch.uint8 else kv.view(torch.uint8)


def _cut(kv: Any, num_blocks: int | None) -> tuple[list[Any], list[int], int]:
    """(regions, the axes in slot byte order, the block axis) of one tensor."""
    t = _bytes(kv)
    kv_first = num_blocks is not None and num_blocks != 2 and t.dim() >= 3
    b = 1 if kv_first and t.shape[0] == 2 and t.shape[1] == num_blocks else 0
    block_stride = t.stride(b)
    axes = [a for a in range(t.dim()) if a != b and t.shape[a] > 1]
    split = [a for a in axes if t.stride(a) > block_stride]
    inner = sorted((a for a in axes if a not in split), key=t.stride, reverse=True)
    run, dense = 1, len(inner)
    for i in range(len(inner) - 1, -1, -1):  # innermost first
        if t.stride(inner[i]) != run:
            break
        run *= t.shape[inner[i]]
        dense = i
    split += inner[:dense]  # the axes that break the run: one region per index
    split.sort()
    inner = inner[dense:]
    if t.shape[b] > 1 and block_stride < run:
        raise CopyError("KV blocks overlap: the block stride is below a block's bytes")
    regions = []
    for index in itertools.product(*(range(t.shape[a]) for a in split)):
        steps = zip(index, split, strict=True)
        offset = t.storage_offset() + sum(i * t.stride(a) for i, a in steps)
        regions.append(t.as_strided((t.shape[b], run), (block_stride, 1), offset))
    return regions, split + inner, b
