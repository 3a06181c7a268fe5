"""Which single-pass copy could move vLLM's scattered KV blocks: candidates against memcpy.

    python bench/bench_copy_candidates.py [--repeats 7] [--clock cpu]

The transfer of ``bench_store.py``'s per-layer case: n = 2,048 blocks of 32 layers x 16 KiB
(1 GiB), each layer a ``(2n, 16 KiB)`` tensor, stored from n random block ids into the
arena's slots and loaded back into the other n. Slot s holds layer l's block at byte
``l * 16 KiB``. Every candidate is checked byte for byte and timed in the same run,
interleaved with a plain ``np.copyto`` of the same bytes (the ratio's baseline).

Candidates that index only the engine side need the slots as one run (here the pairs are
sorted by slot, and the slots are 0..n-1): the arena side is then a basic strided slice.
The daemon's slots are not a run in general, so these could only ever serve that case:

- torch ``index_copy_`` (load): ``layer.index_copy_(0, blocks, arena[slots, cols])``;
- torch ``index_select(out=)`` (store) into the strided arena slice;
- ``np.take(..., out=, mode="clip")`` (store): numpy buffers ``out`` unless it is
  C-contiguous, which a slice of the slots never is;
- numpy fancy indexing straight between the strided slice and the layer (a gather makes a
  temporary on store; a scatter from the slice does not on load);
- one ``np.copyto`` per (layer, run of consecutive pairs): runs are single blocks here.

And the two paths ``clients/kv_arena.py`` has: the C kernel (default) and the staged numpy
gather/scatter (fallback), with shuffled slots as the connector gets them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_store

from tokencake.clients import kv_arena
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.daemon.arena import SLOT_BASE_OFFSET, Arena

SLOT, LAYERS, N = 512 * 1024, 32, 2048
PAGE = SLOT // LAYERS

Copy = Callable[[], None]


def candidates(
    arena: np.ndarray, kv: list[np.ndarray], store_ids: np.ndarray, load_ids: np.ndarray
) -> dict[str, tuple[Copy, Copy | None]]:
    """name -> (store, load); slots are 0..N-1 in the order the ids are given."""
    import torch

    a_t = torch.from_numpy(arena)
    kv_t = [torch.from_numpy(x) for x in kv]
    s_t, l_t = torch.from_numpy(store_ids), torch.from_numpy(load_ids)

    def cols(i: int) -> slice:
        return slice(i * PAGE, (i + 1) * PAGE)

    def torch_store() -> None:
        for i, x in enumerate(kv_t):
            torch.index_select(x, 0, s_t, out=a_t[:, cols(i)])

    def torch_load() -> None:
        for i, x in enumerate(kv_t):
            x.index_copy_(0, l_t, a_t[:, cols(i)])

    def take_store() -> None:
        for i, x in enumerate(kv):
            np.take(x, store_ids, axis=0, out=arena[:, cols(i)], mode="clip")

    def fancy_store() -> None:
        for i, x in enumerate(kv):
            arena[:, cols(i)] = x[store_ids]

    def fancy_load() -> None:
        for i, x in enumerate(kv):
            x[load_ids] = arena[:, cols(i)]

    def runs_store() -> None:
        for i, x in enumerate(kv):
            for s, b in enumerate(store_ids):
                np.copyto(arena[s, cols(i)], x[b])

    def runs_load() -> None:
        for i, x in enumerate(kv):
            for s, b in enumerate(load_ids):
                np.copyto(x[b], arena[s, cols(i)])

    return {
        "torch index_select(out=) / index_copy_": (torch_store, torch_load),
        "np.take(out=, mode=clip) / -": (take_store, None),
        "numpy fancy index, strided slice": (fancy_store, fancy_load),
        "np.copyto per (layer, run)": (runs_store, runs_load),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(bench_store.CLOCKS), default="wall")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    clock = bench_store.CLOCKS[args.clock]
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=(N, SLOT), dtype=np.uint8)
    ref = np.ones_like(src)
    perm = rng.permutation(2 * N).astype(np.int64)
    store_ids, load_ids = perm[:N], perm[N:]
    kv = bench_store._kv_layers(src, LAYERS, [int(b) for b in store_ids])
    shuffled = [int(s) for s in rng.permutation(N)]
    Arena.remove_stale()
    arena = Arena.create(N * SLOT + SLOT_BASE_OFFSET, instance=f"benchcand{os.getpid()}")
    try:
        with ArenaMapping.open(arena.name, SLOT) as m:
            view = m.slots_view()
            paths = candidates(view, kv, store_ids, load_ids)
            native = kv_arena.native_copy()
            for name, how in (("kv_arena C kernel", native), ("kv_arena numpy fallback", False)):
                if how is not None:
                    paths[name] = _arena_copy(m, kv, shuffled, how, store_ids, load_ids)
            rows = _measure(paths, view, kv, src, ref, store_ids, load_ids, args.repeats, clock)
            del view, paths  # the candidates hold views: drop them before the unmap
    finally:
        arena.close()
    print(
        f"host: {os.cpu_count()} cpus, load {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after, clock: {args.clock}, repeats: {args.repeats}"
    )
    bench_store.print_table(rows)


def _arena_copy(
    m: ArenaMapping,
    kv: list[np.ndarray],
    slots: list[int],
    how: object,
    store_ids: np.ndarray,
    load_ids: np.ndarray,
) -> tuple[Copy, Copy]:
    """kv_arena's own path, pairs in shuffled slot order as the connector gets them: slot
    ``s`` gets block ``store_ids[s]``, and is loaded back into block ``load_ids[s]``."""
    stores = [int(store_ids[s]) for s in slots]
    loads = [int(load_ids[s]) for s in slots]

    def store() -> None:
        with bench_store.copy_path(how):
            m.write_layers(slots, kv, stores)

    def load() -> None:
        with bench_store.copy_path(how):
            m.read_layers(slots, kv, loads)

    return store, load


def _measure(
    paths: dict[str, tuple[Copy, Copy | None]],
    arena: np.ndarray,
    kv: list[np.ndarray],
    src: np.ndarray,
    ref: np.ndarray,
    store_ids: np.ndarray,
    load_ids: np.ndarray,
    repeats: int,
    clock: Callable[[], float],
) -> list[bench_store.Row]:
    def timed(fn: Copy) -> float:
        t0 = clock()
        fn()
        return clock() - t0

    memcpy_s = float("inf")
    best = {name: [float("inf"), float("inf")] for name in paths}
    for _ in range(repeats):
        memcpy_s = min(memcpy_s, timed(lambda: np.copyto(ref, src)))
        for name, (store, load) in paths.items():
            arena[:] = 0
            best[name][0] = min(best[name][0], timed(store))
            if not np.array_equal(arena, src):
                raise SystemExit(f"{name}: store put the wrong bytes in the arena")
            if load is None:
                continue
            for x in kv:
                x[load_ids] = 0
            best[name][1] = min(best[name][1], timed(load))
            if not all(np.array_equal(x[load_ids], x[store_ids]) for x in kv):
                raise SystemExit(f"{name}: load put the wrong bytes in the layers")
    rows = [bench_store.Row("-- 32 layers x 16 KiB, random block ids --", memcpy_s * 1e3, "ms")]
    for name, (store_s, load_s) in best.items():
        rows.append(bench_store.Row(f"store vs memcpy, {name}", memcpy_s / store_s, "x"))
        if load_s < float("inf"):
            rows.append(bench_store.Row(f"load vs memcpy, {name}", memcpy_s / load_s, "x"))
    return rows


if __name__ == "__main__":
    main()
