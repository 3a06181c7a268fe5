"""The CUDA copy path: GPU KV blocks <-> the page-locked arena on a side stream.

The ``gpu`` tests need a CUDA device and are skipped without one. They have not been run on
hardware (see docs/vllm.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tokencake.clients.kv_arena import ArenaMapping  # noqa: E402
from tokencake.connectors.vllm.worker import (  # noqa: E402
    BlockCopier,
    CudaBlockCopier,
    LayoutUnsupported,
    make_copier,
)
from tokencake.daemon.arena import Arena  # noqa: E402

CUDA = torch.cuda.is_available()
LAYERS, BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM = 3, 64, 2, 16, 64
PAGE = HEADS * BLOCK_TOKENS * 2 * HEAD_DIM * 2  # fp16
SLOT = LAYERS * PAGE + 512  # slots a bit larger than a block, as the daemon may round up
NUM_SLOTS = 40


@pytest.fixture
def mapping() -> Iterator[ArenaMapping]:
    arena = Arena.create(SLOT * NUM_SLOTS, instance=f"gputest{os.getpid()}")
    m = ArenaMapping.open(arena.name, SLOT)
    try:
        yield m
    finally:
        if CUDA:
            torch.cuda.synchronize()
        m.close()
        arena.close()


def _kv(device: str) -> list[Any]:
    torch.manual_seed(0)
    shape = (BLOCKS, HEADS, BLOCK_TOKENS, 2 * HEAD_DIM)
    return [torch.randn(shape, dtype=torch.float16, device=device) for _ in range(LAYERS)]


def _block_bytes(layers: list[Any], block: int) -> bytes:
    pages = [layer[block].cpu().view(torch.uint8).flatten().numpy() for layer in layers]
    return b"".join(bytes(page) for page in pages)


def test_without_cuda_the_worker_keeps_its_cpu_path() -> None:
    assert isinstance(make_copier(_kv("cpu")), BlockCopier)
    if not CUDA:
        with pytest.raises(LayoutUnsupported):
            CudaBlockCopier(_kv("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_cuda_round_trip_through_the_pinned_arena(mapping: ArenaMapping, chunk: int) -> None:
    layers = _kv("cuda")
    copier = make_copier(layers)
    assert isinstance(copier, CudaBlockCopier)
    copier = CudaBlockCopier(layers, chunk=chunk)
    blocks = [3, 4, 5, 9, 60, 1, 33]
    slots = [10, 11, 12, 0, 7, 30, 39]
    want = {b: _block_bytes(layers, b) for b in blocks}
    done = copier.to_arena(mapping, blocks, slots)
    done.synchronize()
    assert mapping.pinned  # cudaHostRegister'd on first use
    view = mapping.slots_view()
    for b, s in zip(blocks, slots, strict=True):
        assert bytes(view[s, : LAYERS * PAGE]) == want[b]
    for layer in layers:
        layer[blocks] = 0
    targets = [50, 51, 52, 2, 8, 20, 63]  # load into other blocks, as vLLM allocates them
    done = copier.from_arena(mapping, slots, targets)
    assert done.query() in (True, False)  # an event the connector polls in get_finished
    done.synchronize()
    for b, t in zip(blocks, targets, strict=True):
        assert _block_bytes(layers, t) == want[b]
