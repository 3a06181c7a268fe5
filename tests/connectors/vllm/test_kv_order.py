"""A slot's byte order follows vLLM's resolved ``KVCacheLayout``, and the registered layout
names it, so KV is never served between layouts whose blocks are not byte-compatible.

The per-layer views are vLLM 0.32's own (``create_kv_cache_views`` over a buffer placed by
``compute_layout_strides``, as its KV cache allocation does), for each of its six layouts;
no engine runs. The FAKE device stands in for a GPU where a device mover is used.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from tokencake.clients.kv_arena import ArenaMapping  # noqa: E402
from tokencake.connectors.vllm.connector import engine_layout, slot_order  # noqa: E402
from tokencake.connectors.vllm.connector_worker import (  # noqa: E402
    TokenCakeConnectorWorker,
    make_mover,
)
from tokencake.daemon.arena import Arena  # noqa: E402
from tokencake.daemon.gpu.fake import FakeDevice  # noqa: E402
from tokencake.gpu import regions  # noqa: E402
from tokencake.gpu.mover import CopyError  # noqa: E402

LAYERS, BLOCKS = 3, 12
SPEC = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float16)
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _config(layout: str) -> tuple[Any, Any]:
    group = SimpleNamespace(kv_cache_spec=SPEC, layer_names=NAMES)
    kv_cache_config = SimpleNamespace(
        kv_cache_layout=layout, kv_cache_groups=[group], num_blocks=BLOCKS
    )
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(served_model_name="tiny", model="/m/tiny"),
        cache_config=SimpleNamespace(kv_cache_layout=None),
    )
    return vllm_config, kv_cache_config


def _views(layout: KVCacheLayout, raw: Any) -> list[Any]:
    """vLLM's per-layer views of ``raw``, placed as its KV cache allocation places them."""
    per_block = SPEC.page_size_bytes * LAYERS
    interleaved = per_block if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        SPEC, BLOCKS, LAYERS, layout, fixed_strides=(None, interleaved, None, None, None)
    )
    placed = KVCacheTensor(
        size=per_block * BLOCKS, layers=NAMES, layer_stride=layer_stride, block_stride=block_stride
    )
    return create_kv_cache_views(raw, SPEC, BLOCKS, layout, placed)


def _raw(seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    size = SPEC.page_size_bytes * LAYERS * BLOCKS
    return torch.randint(-128, 127, (size,), dtype=torch.int8, generator=gen)


def _slot(views: list[Any], block: int, order: str) -> bytes:
    """Block ``block`` of every layer as a slot must hold it, from the logical views."""
    perm = [("HNC".index(a)) for a in order] if len(order) == 3 else [0, 1, 2]
    pages = [v[block].view(torch.uint8).permute(*perm).contiguous() for v in views]
    return b"".join(bytes(p.flatten().numpy()) for p in pages)


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda x: x.name)
def test_regions_follow_every_layout_and_both_sides_name_its_order(layout: KVCacheLayout) -> None:
    views = _views(layout, _raw())
    order = regions.slot_order(views, BLOCKS)
    # the scheduler side knows only the layout's name; the worker side only the tensors
    assert order == slot_order(*_config(layout.name))
    assert order == ("NHC" if layout.name.endswith("NHC") else "HNC")
    cut = regions.block_regions(views, BLOCKS)
    assert sum(int(r.shape[1]) for r in cut) == SPEC.page_size_bytes * LAYERS
    for block in (0, 5, BLOCKS - 1):
        got = b"".join(bytes(r[block].numpy()) for r in cut)
        assert got == _slot(views, block, order)


def test_only_byte_compatible_layouts_share_a_fingerprint() -> None:
    prints = {name: engine_layout(*_config(name)) for name in ("LBNHC", "BLNHC", "LBHNC")}
    assert "|vllm-nhc-v2|" in prints["LBNHC"].model_id
    assert prints["LBNHC"].fingerprint() == prints["BLNHC"].fingerprint()  # L/B nesting only
    assert prints["LBNHC"].fingerprint() != prints["LBHNC"].fingerprint()  # heads vs tokens


def test_a_worker_refuses_tensors_of_another_order() -> None:
    """The registered layout says HNC (vLLM-CPU's LBHNC); tensors laid out NHC are refused
    at registration, before any block is copied."""
    vllm_config, kv_cache_config = _config("LBHNC")
    layout = engine_layout(vllm_config, kv_cache_config)
    worker = TokenCakeConnectorWorker(layout, NAMES, num_blocks=BLOCKS, order="HNC")
    worker.register_kv_caches(dict(zip(NAMES, _views(KVCacheLayout.LBHNC, _raw()), strict=True)))
    worker.shutdown()
    device = FakeDevice()
    other = TokenCakeConnectorWorker(layout, NAMES, num_blocks=BLOCKS, order="HNC", device=device)
    with pytest.raises(ValueError, match="NHC"):
        other.register_kv_caches(dict(zip(NAMES, _views(KVCacheLayout.LBNHC, _raw()), strict=True)))
    device.free()


def test_the_cpu_mover_refuses_interleaved_layers() -> None:
    with pytest.raises(CopyError, match="not contiguous"):
        make_mover(_views(KVCacheLayout.BLHNC, _raw()), BLOCKS)


@pytest.mark.parametrize("layout", ["BLNHC", "LHBNC", "BHLNC"])
def test_device_round_trip_in_a_strided_layout(layout: str) -> None:
    """The device mover (FAKE device) stores and loads blocks of interleaved layers and
    per-head regions: what a CUDA engine does with vLLM's block-outer layouts."""
    device = FakeDevice()
    raw = device.alloc((SPEC.page_size_bytes * LAYERS * BLOCKS,), torch.int8)
    raw.copy_(_raw(1))
    views = _views(KVCacheLayout[layout], raw)
    order = regions.slot_order(views, BLOCKS)
    mover = make_mover(views, BLOCKS, device)
    slot = SPEC.page_size_bytes * LAYERS + 256
    arena = Arena.create(slot * 8 + 4096, instance=f"order{layout}")
    mapping = ArenaMapping.open(arena.name, slot)
    try:
        want = {b: _slot(views, b, order) for b in (3, 7, 8)}
        mover.store(mapping, [3, 7, 8], [5, 0, 1]).wait()
        view = mapping.slots_view()
        assert bytes(view[0, : len(want[7])]) == want[7]
        del view
        mover.load(mapping, [5, 0, 1], [10, 11, 2]).wait()
        assert [_slot(views, b, order) for b in (10, 11, 2)] == [want[3], want[7], want[8]]
    finally:
        mover.close()
        mapping.close()
        arena.close()
        device.free()
