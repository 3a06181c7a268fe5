"""Engine-side arena mapping: bytes written by one process are read by another, exactly."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator

import numpy as np
import pytest

from tokencake.clients.kv_arena import ArenaMapping, KvArenaError, _runs
from tokencake.daemon.arena import Arena, ArenaError

SLOT = 4096
NUM = 32


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena.create(SLOT * NUM, instance=f"kvtest{os.getpid()}")
    try:
        yield a
    finally:
        a.close()


def _engine_writer(name: str, slots: list[int], seed: int) -> None:
    """Runs in a child process: maps the arena and writes seeded blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(len(slots), 8, 64), dtype=np.uint8)
    with ArenaMapping.open(name, SLOT) as m:
        m.write_blocks(slots, blocks)


def test_round_trip_through_a_second_process(arena: Arena) -> None:
    slots = [5, 6, 7, 20, 3]  # a run and singles
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_engine_writer, args=(arena.name, slots, 1234))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    expected = np.random.default_rng(1234).integers(0, 256, size=(5, 8, 64), dtype=np.uint8)
    with ArenaMapping.open(arena.name, SLOT) as m:
        out = np.zeros_like(expected)
        m.read_blocks(slots, out)
    np.testing.assert_array_equal(out, expected)
    # The daemon's own view sees the same bytes in the same slots.
    view = arena.slots(SLOT)
    assert bytes(view[20, :512]) == expected[3].tobytes()
    assert not view[4].any()  # an untouched neighbour stays zero
    del view


def test_float_blocks_round_trip_bitwise(arena: Arena) -> None:
    src = np.random.default_rng(0).standard_normal((4, 2, 16, 8)).astype(np.float16)
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_blocks([9, 1, 2, 30], src)
        dst = np.empty_like(src)
        m.read_blocks([9, 1, 2, 30], dst)
    assert dst.tobytes() == src.tobytes()


def test_per_layer_tensors_concatenate_in_a_slot(arena: Arena) -> None:
    rng = np.random.default_rng(3)
    # vLLM shape per layer: (num_blocks, kv_heads, block_size, 2 * head_dim)
    layers = [rng.standard_normal((10, 2, 4, 16)).astype(np.float32) for _ in range(3)]
    per_layer = layers[0][0].nbytes
    block_ids = [4, 5, 6, 1]
    slots = [10, 11, 12, 0]
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_layers(slots, layers, block_ids)
        view = m.slots_view()
        for i, (s, b) in enumerate(zip(slots, block_ids, strict=True)):
            for layer_no, layer in enumerate(layers):
                got = view[s, layer_no * per_layer : (layer_no + 1) * per_layer]
                assert got.tobytes() == layer[b].tobytes(), (i, layer_no)
        del view, got
        back = [np.zeros_like(layer) for layer in layers]
        m.read_layers(slots, back, [0, 1, 2, 3])
        for layer, restored in zip(layers, back, strict=True):
            np.testing.assert_array_equal(restored[:4], layer[block_ids])
            assert not restored[4:].any()


def test_rejects_what_would_need_a_copy_or_overflow(arena: Arena) -> None:
    with ArenaMapping.open(arena.name, SLOT) as m:
        with pytest.raises(KvArenaError, match="exceed"):
            m.write_blocks([0], np.zeros((1, SLOT + 1), np.uint8))
        with pytest.raises(KvArenaError, match="outside"):
            m.write_blocks([NUM], np.zeros((1, 8), np.uint8))
        with pytest.raises(KvArenaError, match="slots for"):
            m.write_blocks([0, 1], np.zeros((1, 8), np.uint8))
        with pytest.raises(KvArenaError, match="contiguous"):
            m.write_blocks([0, 1], np.zeros((8, 2), np.uint8).T)
        with pytest.raises(KvArenaError, match="numpy"):
            m.write_blocks([0], [[1, 2]])
        with pytest.raises(KvArenaError, match="block id"):
            m.write_layers([0], [np.zeros((2, 8), np.uint8)], [2])
        assert not m.register_pinned()  # no CUDA on this machine: a clean False


def test_open_checks_name_and_mode(arena: Arena, tmp_path: object) -> None:
    with pytest.raises(ArenaError, match="no arena"):
        ArenaMapping.open("tokencake-0-nope-1", SLOT)
    with pytest.raises(ArenaError, match="bad segment name"):
        ArenaMapping.open("../etc/passwd", SLOT)
    with pytest.raises(ArenaError, match="at least"):
        ArenaMapping.open(arena.name, SLOT, min_bytes=SLOT * NUM + 1)
    os.chmod(arena.path, 0o644)
    try:
        with pytest.raises(ArenaError, match="mode 644"):
            ArenaMapping.open(arena.name, SLOT)
    finally:
        os.chmod(arena.path, 0o600)


def test_close_with_live_view_raises(arena: Arena) -> None:
    m = ArenaMapping.open(arena.name, SLOT)
    v = m.slots_view()
    with pytest.raises(ArenaError, match="views"):
        m.close()
    del v
    m.close()
    with pytest.raises(ArenaError, match="closed"):
        m.slots_view()


def test_runs_coalesce_only_when_both_sides_step_by_one() -> None:
    assert list(_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4])) == [(3, 0, 3), (9, 3, 2)]
    assert list(_runs([3, 4, 5], [0, 2, 3])) == [(3, 0, 1), (4, 2, 2)]
    assert list(_runs([], [])) == []


def test_torch_cpu_tensor_round_trip(arena: Arena) -> None:
    torch = pytest.importorskip("torch")
    src = torch.randn(3, 2, 16, 8, dtype=torch.bfloat16)
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_blocks([1, 2, 7], src)
        dst = torch.empty_like(src)
        m.read_blocks([1, 2, 7], dst)
    assert torch.equal(dst.view(torch.uint16), src.view(torch.uint16))
