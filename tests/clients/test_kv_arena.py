"""Engine-side arena mapping: bytes written by one process are read by another, exactly."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator

import numpy as np
import pytest

from tokencake.clients import kv_arena
from tokencake.clients.kv_arena import ArenaMapping, KvArenaError
from tokencake.daemon.arena import Arena, ArenaError, slot_count

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


def test_torch_cpu_tensor_round_trip(arena: Arena) -> None:
    torch = pytest.importorskip("torch")
    src = torch.randn(3, 2, 16, 8, dtype=torch.bfloat16)
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_blocks([1, 2, 7], src)
        dst = torch.empty_like(src)
        m.read_blocks([1, 2, 7], dst)
    assert torch.equal(dst.view(torch.uint16), src.view(torch.uint16))


# ---------------------------------------------------------------------- scattered block ids
#
# vLLM hands over arbitrary engine block ids and the daemon arbitrary slots. Both copy paths
# (the C kernel, and numpy's staged gather/scatter where it was not built) must put exactly
# ``layer[0][b] + layer[1][b] + ...`` into the slot, whatever the geometry.

NB = 40  # engine blocks per layer
CAP = slot_count(SLOT * NUM, SLOT)  # 31: slot 0 starts 2 KiB into the segment


FORCED_NUMPY = os.environ.get(kv_arena.COPY_KERNEL_ENV) == "numpy"


@pytest.fixture(params=["native", "numpy"])
def kernel_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Forces one path; returns a list that counts the C kernel's calls (pairs per call)."""
    calls: list[int] = []
    if request.param == "numpy":
        monkeypatch.setattr(kv_arena, "_native", False)
        return calls
    if FORCED_NUMPY:
        pytest.skip(f"{kv_arena.COPY_KERNEL_ENV}=numpy in this run")
    kernel = kv_arena.native_copy()
    assert kernel is not None, "clients/_kvcopy.c was not built (see test_the_kernel_is_built)"

    def counted(*args: object) -> None:
        calls.append(len(args[5]))  # type: ignore[arg-type]
        kernel(*args)

    monkeypatch.setattr(kv_arena, "_native", counted)
    return calls


def _layers(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    return [rng.standard_normal((NB, *shape)).astype(np.float16) for shape in shapes]


def _slot_bytes(layers: list[np.ndarray], block: int) -> bytes:
    return b"".join(layer[block].tobytes() for layer in layers)


# (per-layer block shapes, why): fp16, so bytes = 2 * product
GEOMETRIES = [
    ([(2, 4, 64)] * 3, "1 KiB pages, slots hold whole pages"),
    ([(3, 4, 32)] * 5, "768 B pages: the arena cut into 256 B rows"),
    ([(5, 10)] * 3 + [(7,)], "100 B and 14 B pages: strided column views"),
]


@pytest.mark.parametrize("shapes", [g[0] for g in GEOMETRIES], ids=[g[1] for g in GEOMETRIES])
@pytest.mark.parametrize("stage_bytes", [kv_arena.STAGE_BYTES, 2500])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_block_ids_and_slots_round_trip(
    arena: Arena,
    kernel_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
    shapes: list[tuple[int, ...]],
    stage_bytes: int,
    seed: int,
) -> None:
    monkeypatch.setattr(kv_arena, "STAGE_BYTES", stage_bytes)  # small: chunks cut the copy
    rng = np.random.default_rng(seed)
    layers = _layers(rng, shapes)
    n = 24
    slots = [int(s) for s in rng.choice(CAP, n, replace=False)]
    blocks = [int(b) for b in rng.choice(NB, n, replace=False)]
    used = sum(layer[0].nbytes for layer in layers)
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_layers(slots, layers, blocks)
        stored = bytes(m.slots_view())  # a copy: the mapping closes with no view left
        for s, b in zip(slots, blocks, strict=True):
            at = s * SLOT
            assert stored[at : at + used] == _slot_bytes(layers, b), (s, b)
        for s in set(range(CAP)) - set(slots):
            assert not any(stored[s * SLOT : (s + 1) * SLOT])  # nothing outside named slots
        targets = [int(t) for t in rng.permutation(NB)[:n]]
        back = [np.zeros_like(layer) for layer in layers]
        m.read_layers(slots, back, targets)
    for layer, restored in zip(layers, back, strict=True):
        np.testing.assert_array_equal(restored[targets], layer[blocks])
        untouched = np.setdiff1d(np.arange(NB), targets)
        assert not restored[untouched].any()
    # the kernel moved both transfers whole, in one call each; on the numpy path it never ran
    assert kernel_calls == ([n, n] if kv_arena._native else [])


def test_partial_runs_across_chunk_boundaries(
    arena: Arena, kernel_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of consecutive blocks and slots mixed with singles; with 3-pair chunks some runs
    are cut, some chunks are whole runs (no staging) and some are not."""
    monkeypatch.setattr(kv_arena, "STAGE_BYTES", 3 * 1024)
    layers = _layers(np.random.default_rng(7), [(2, 4, 64)] * 3)
    blocks = [7, 8, 9, 10, 2, 30, 31, 15, 16, 17, 39, 0]
    slots = [3, 4, 5, 6, 20, 0, 1, 30, 12, 11, 13, 2]
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_layers(slots, layers, blocks)
        stored = bytes(m.slots_view())
        for s, b in zip(slots, blocks, strict=True):
            assert stored[s * SLOT : s * SLOT + 3072] == _slot_bytes(layers, b)
        back = [np.zeros_like(layer) for layer in layers]
        m.read_layers(slots, back, blocks)
        # a run of block ids: numpy's one-call path, or the kernel
        m.read_layers([5, 6, 20], back, [21, 22, 23])
    for layer, restored in zip(layers, back, strict=True):
        np.testing.assert_array_equal(restored[blocks], layer[blocks])
        np.testing.assert_array_equal(restored[21:24], layer[[9, 10, 2]])


def test_bad_ids_are_refused_before_any_byte_moves(arena: Arena, kernel_calls: list[int]) -> None:
    layers = _layers(np.random.default_rng(3), [(2, 4, 64)] * 3)
    bad: list[tuple[list[int], list[int], str]] = [
        ([1, 2, -1], [3, 9, 4], "slot -1 outside"),
        ([1, 2, CAP], [3, 9, 4], f"slot {CAP} outside"),
        ([1, 2, 5], [3, 9, -2], "block id -2 outside"),
        ([1, 2, 5], [3, 9, NB], f"block id {NB} outside"),
        ([1, 2], [3, 9, 4], "2 slots for 3 blocks"),
    ]
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_layers([0, 8], layers, [5, 1])
        before = bytes(m.slots_view())
        for slots, blocks, match in bad:
            with pytest.raises(KvArenaError, match=match):
                m.write_layers(slots, layers, blocks)
            back = [np.zeros_like(layer) for layer in layers]
            with pytest.raises(KvArenaError, match=match):
                m.read_layers(slots, back, blocks)
            assert not any(b.any() for b in back)
        with pytest.raises(KvArenaError, match="integers"):
            m.write_layers([1.5, 2.0], layers, [3, 9])  # type: ignore[list-item]
        with pytest.raises(KvArenaError, match="integers"):
            m.write_layers([1, 2], layers, [[3], [9]])  # type: ignore[list-item]
        with pytest.raises(KvArenaError, match="integers"):
            m.read_layers([True, False], layers, [3, 9])
        with pytest.raises(KvArenaError, match="slot appears twice"):
            m.write_layers([4, 4], layers, [3, 9])
        with pytest.raises(KvArenaError, match="block id appears twice"):
            m.read_layers([0, 8], [np.zeros_like(x) for x in layers], [6, 6])
        with pytest.raises(KvArenaError, match="exceed"):
            m.write_layers([1], layers * 2, [3])
        assert bytes(m.slots_view()) == before
        # The source side may repeat: one slot read into two blocks, one block into two slots.
        back = [np.zeros_like(layer) for layer in layers]
        m.read_layers([0, 0], back, [11, 12])
        m.write_layers([20, 21], layers, [5, 5])
        stored = bytes(m.slots_view())
        assert stored[20 * SLOT : 20 * SLOT + 3072] == _slot_bytes(layers, 5)
        assert stored[21 * SLOT : 21 * SLOT + 3072] == _slot_bytes(layers, 5)
    for layer, restored in zip(layers, back, strict=True):
        np.testing.assert_array_equal(restored[11], layer[5])
        np.testing.assert_array_equal(restored[12], layer[5])


def test_vllm_block_copier_moves_torch_layers(arena: Arena, kernel_calls: list[int]) -> None:
    """The vLLM worker's CPU copier: torch KV tensors of vLLM-CPU's shape, random ids."""
    torch = pytest.importorskip("torch")
    from tokencake.connectors.vllm.connector_worker import CpuBlockMover

    torch.manual_seed(0)
    kv = [torch.randn(NB, 2, 4, 64, dtype=torch.bfloat16) for _ in range(3)]
    copier = CpuBlockMover(kv)
    blocks, slots = [33, 2, 17, 18, 5], [9, 30, 10, 11, 0]

    def raw(block: int) -> bytes:
        return b"".join(bytes(x[block].view(torch.uint8).flatten().numpy()) for x in kv)

    want = {b: raw(b) for b in blocks}
    with ArenaMapping.open(arena.name, SLOT) as m:
        copier.store(m, blocks, slots)
        stored = bytes(m.slots_view())
        for s, b in zip(slots, blocks, strict=True):
            assert stored[s * SLOT : s * SLOT + copier.bytes_per_block] == want[b]
        for x in kv:
            x[blocks] = 0
        targets = [1, 39, 20, 21, 8]
        copier.load(m, slots, targets)
    for b, t in zip(blocks, targets, strict=True):
        assert raw(t) == want[b]
    assert copier.path == ("native" if kv_arena._native else "numpy")
    assert len(kernel_calls) == (2 if kv_arena._native else 0)


def test_the_kernel_is_built() -> None:
    """CI fails here when the project's install did not build ``clients/_kvcopy.c``: without
    it every engine silently copies at half speed."""
    if FORCED_NUMPY:
        pytest.skip(f"{kv_arena.COPY_KERNEL_ENV}=numpy in this run")
    assert kv_arena.copy_path() == "native", (
        "clients/_kvcopy.c was not built: install with a C compiler (scripts/bootstrap.sh)"
    )


def _random_transfer(
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[int], list[int], list[int]]:
    """Random page sizes (odd ones too), slots, and block ids with some runs among them."""
    sizes = [int(x) for x in rng.integers(1, 700, size=int(rng.integers(1, 6)))]
    while sum(sizes) > SLOT:
        sizes.pop()
    layers = [rng.integers(0, 256, size=(NB, size), dtype=np.uint8) for size in sizes]
    n = int(rng.integers(1, CAP))
    slots = [int(s) for s in rng.choice(CAP, n, replace=False)]
    start = int(rng.integers(0, NB - n + 1))
    run = list(range(start, start + n))
    blocks = run if rng.random() < 0.3 else [int(b) for b in rng.choice(NB, n, replace=False)]
    targets = [int(t) for t in rng.permutation(NB)[:n]]
    return layers, slots, blocks, targets


def _through(
    arena: Arena, path: object, transfer: tuple[list[np.ndarray], list[int], list[int], list[int]]
) -> tuple[bytes, list[np.ndarray]]:
    """One store then one load on ``path``; the arena's bytes and the loaded layers."""
    layers, slots, blocks, targets = transfer
    saved = kv_arena._native
    kv_arena._native = path
    try:
        with ArenaMapping.open(arena.name, SLOT) as m:
            m.slots_view()[:] = 0
            m.write_layers(slots, layers, blocks)
            back = [np.zeros_like(layer) for layer in layers]
            m.read_layers(slots, back, targets)
            return bytes(m.slots_view()), back
    finally:
        kv_arena._native = saved


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_numpy_byte_for_byte(arena: Arena, seed: int) -> None:
    if FORCED_NUMPY:
        pytest.skip(f"{kv_arena.COPY_KERNEL_ENV}=numpy in this run")
    kernel = kv_arena.native_copy()
    assert kernel is not None
    rng = np.random.default_rng(seed)
    for _ in range(10):
        transfer = _random_transfer(rng)
        native_bytes, native_back = _through(arena, kernel, transfer)
        numpy_bytes, numpy_back = _through(arena, False, transfer)
        assert native_bytes == numpy_bytes
        for a, b in zip(native_back, numpy_back, strict=True):
            assert a.tobytes() == b.tobytes()


def test_read_only_destination_is_refused(arena: Arena, kernel_calls: list[int]) -> None:
    """The kernel would write into it regardless; the check before it refuses instead."""
    layers = _layers(np.random.default_rng(5), [(2, 4, 64)] * 2)
    frozen = [np.zeros_like(layer) for layer in layers]
    for x in frozen:
        x.flags.writeable = False
    with ArenaMapping.open(arena.name, SLOT) as m:
        m.write_layers([3, 9], layers, [7, 2])
        with pytest.raises(KvArenaError, match="read-only"):
            m.read_layers([3, 9], frozen, [1, 4])
    assert not any(x.any() for x in frozen)
    assert kernel_calls == ([2] if kv_arena._native else [])


def test_missing_kernel_falls_back_to_numpy_and_says_so_once(
    arena: Arena, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kv_arena, "_native", None)
    monkeypatch.setattr(kv_arena, "_LIB_STEM", "_kvcopy_not_built")
    monkeypatch.delenv(kv_arena.COPY_KERNEL_ENV, raising=False)
    with caplog.at_level("WARNING", logger=kv_arena.__name__):
        assert kv_arena.copy_path() == "numpy"
        layers = _layers(np.random.default_rng(6), [(2, 4, 64)] * 2)
        with ArenaMapping.open(arena.name, SLOT) as m:
            m.write_layers([4, 1], layers, [9, 3])
            back = [np.zeros_like(layer) for layer in layers]
            m.read_layers([4, 1], back, [0, 1])
        assert kv_arena.copy_path() == "numpy"
    assert len([r for r in caplog.records if "not built" in r.getMessage()]) == 1
    for layer, restored in zip(layers, back, strict=True):
        np.testing.assert_array_equal(restored[[0, 1]], layer[[9, 3]])


def test_copy_kernel_env_selects_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_arena, "_native", None)
    monkeypatch.setenv(kv_arena.COPY_KERNEL_ENV, "numpy")
    assert kv_arena.copy_path() == "numpy"
    if FORCED_NUMPY:
        return
    monkeypatch.setattr(kv_arena, "_native", None)
    monkeypatch.setenv(kv_arena.COPY_KERNEL_ENV, "native")
    assert kv_arena.copy_path() == "native"
