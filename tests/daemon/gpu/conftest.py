"""Fixtures for the GPU data plane's tests: a real arena and a FAKE device (CPU tensors in
shared memory; see ``tokencake.daemon.gpu.fake``). Nothing here runs on a GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tokencake.clients.kv_arena import ArenaMapping  # noqa: E402
from tokencake.daemon.arena import Arena  # noqa: E402
from tokencake.daemon.gpu.fake import FakeDevice  # noqa: E402

LAYERS, BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM = 3, 64, 2, 16, 32
PAGE = HEADS * BLOCK_TOKENS * 2 * HEAD_DIM * 2  # fp16, K and V
SLOT = LAYERS * PAGE + 512  # slots a bit larger than a block, as the daemon may round up
NUM_SLOTS = 40


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena.create(SLOT * NUM_SLOTS + 4096, instance=f"gpu{os.getpid()}")
    yield a
    a.close()


@pytest.fixture
def mapping(arena: Arena) -> Iterator[ArenaMapping]:
    m = ArenaMapping.open(arena.name, SLOT)
    yield m
    m.close()


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    d = FakeDevice()
    yield d
    d.free()


def fake_kv(device: FakeDevice, kv_first: bool = False, seed: int = 0) -> list[Any]:
    """Random fp16 KV of every layer, vLLM-CPU's block-major shape or FlashAttention's
    K/V-first one, in the fake device's shared memory."""
    gen = torch.Generator().manual_seed(seed)
    half = (BLOCKS, BLOCK_TOKENS, HEADS, HEAD_DIM)
    shape = (2, *half) if kv_first else (BLOCKS, HEADS, BLOCK_TOKENS, 2 * HEAD_DIM)
    out = []
    for _ in range(LAYERS):
        t = device.alloc(shape, torch.float16)
        t.copy_(torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.float16))
        out.append(t)
    return out


def block_bytes(layers: list[Any], block: int, kv_first: bool = False) -> bytes:
    """One block of every layer as a slot holds it (K page then V page when K/V-first)."""
    parts = []
    for layer in layers:
        pages = [layer[0, block], layer[1, block]] if kv_first else [layer[block]]
        parts += [bytes(page.contiguous().view(torch.uint8).flatten().numpy()) for page in pages]
    return b"".join(parts)
