"""The CUDA copy path on a real GPU: the engine's mover, CUDA IPC, the daemon's copy worker.

The ``gpu`` tests need a CUDA device and are skipped without one; ``scripts/gpu-check.sh``
runs them on a GPU machine. None has run on hardware yet (see docs/vllm.md). The same logic
runs here on the FAKE device in ``tests/daemon/gpu`` and, for the connector's lending,
``test_gpu_lending.py``. Nothing here imports vLLM (the GPU machine has none): vLLM 0.32's
per-layer views are rebuilt from its layout rule (``_views``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import start_daemon  # noqa: E402
from tokencake import protocol as p  # noqa: E402
from tokencake.clients.client import TokenCakeClient  # noqa: E402
from tokencake.clients.kv_arena import ArenaMapping  # noqa: E402
from tokencake.connectors.vllm.connector_worker import CpuBlockMover, make_mover  # noqa: E402
from tokencake.connectors.vllm.lending import Lent, LentCopies, export_kv  # noqa: E402
from tokencake.daemon.arena import Arena  # noqa: E402
from tokencake.daemon.gpu.service import GpuCopyService  # noqa: E402
from tokencake.daemon.host_store import HostStore  # noqa: E402
from tokencake.gpu.block_mover import DeviceBlockMover  # noqa: E402
from tokencake.gpu.mover import CopyError  # noqa: E402
from tokencake.gpu.regions import slot_order  # noqa: E402
from tokencake.layout import KvLayout  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
LAYERS, BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM = 3, 64, 2, 16, 64
PAGE = BLOCK_TOKENS * HEADS * HEAD_DIM * 2  # one fp16 K (or V) page
SLOT = LAYERS * 2 * PAGE + 512  # slots a bit larger than a block, as the daemon may round up
NUM_SLOTS = 40


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena.create(SLOT * NUM_SLOTS + 4096, instance=f"gputest{os.getpid()}")
    yield a
    a.close()


@pytest.fixture
def mapping(arena: Arena) -> Iterator[ArenaMapping]:
    m = ArenaMapping.open(arena.name, SLOT)
    yield m
    if CUDA:
        torch.cuda.synchronize()
    m.close()


def _kv(device: str, kv_first: bool = True) -> list[Any]:
    """vLLM's layouts: FlashAttention's K/V-first on CUDA, block-major on CPU."""
    torch.manual_seed(0)
    if kv_first:
        shape: tuple[int, ...] = (2, BLOCKS, BLOCK_TOKENS, HEADS, HEAD_DIM)
    else:
        shape = (BLOCKS, HEADS, BLOCK_TOKENS, 2 * HEAD_DIM)
    return [torch.randn(shape, dtype=torch.float16, device=device) for _ in range(LAYERS)]


def _block_bytes(layers: list[Any], block: int) -> bytes:
    pages = [layer[kv, block] for layer in layers for kv in (0, 1)]
    return b"".join(
        bytes(pg.contiguous().cpu().view(torch.uint8).flatten().numpy()) for pg in pages
    )


def test_cpu_tensors_take_the_cpu_path() -> None:
    mover = make_mover(_kv("cpu", kv_first=False))
    assert isinstance(mover, CpuBlockMover) and mover.path in ("native", "numpy")
    with pytest.raises(CopyError):
        export_kv(mover)  # only device tensors can be shared with the daemon


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_cuda_round_trip_through_the_pinned_arena(mapping: ArenaMapping, rows: int) -> None:
    layers = _kv("cuda")
    mover = make_mover(layers, BLOCKS)
    assert isinstance(mover, DeviceBlockMover)
    mover.stage_bytes = rows * SLOT
    blocks = [3, 4, 5, 9, 60, 1, 33]
    slots = [10, 11, 12, 0, 7, 30, 38]
    want = {b: _block_bytes(layers, b) for b in blocks}
    mover.store(mapping, blocks, slots).wait()
    view = mapping.slots_view()
    for b, s in zip(blocks, slots, strict=True):
        assert bytes(view[s, : mover.bytes_per_block]) == want[b]
    for layer in layers:
        layer[:, blocks] = 0
    targets = [50, 51, 52, 2, 8, 20, 63]  # load into other blocks, as vLLM allocates them
    handle = mover.load(mapping, slots, targets)
    handle.wait()
    assert handle.poll()
    for b, t in zip(blocks, targets, strict=True):
        assert _block_bytes(layers, t) == want[b]
    mover.release(mapping)
    mover.close()


@pytest.mark.gpu
@needs_cuda
def test_compute_stream_does_not_wait_for_a_copy(mapping: ArenaMapping) -> None:
    """A copy runs on the side stream: the compute stream's work issued after it does not
    queue behind it (its event completes while the copy may still run)."""
    layers = _kv("cuda")
    mover = make_mover(layers, BLOCKS)
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    handle = mover.store(mapping, list(range(32)), list(range(32)))
    done = torch.cuda.Event()
    torch.matmul(a, a)
    done.record(torch.cuda.current_stream())
    done.synchronize()
    handle.wait()  # the copy finishes too; nothing deadlocked or serialised into an error
    mover.close()


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_through_the_daemons_copy_worker(arena: Arena) -> None:
    """The real copy worker process opens this process's KV through CUDA IPC, waits for an
    IPC event recorded on the compute stream, and moves blocks both ways."""
    store = HostStore((arena.size - 2048) // SLOT, SLOT, clock=time.monotonic)
    store.register_layout("f" * 16, LAYERS * 2 * PAGE)
    layers = _kv("cuda")
    mover = make_mover(layers, BLOCKS)
    assert isinstance(mover, DeviceBlockMover)
    svc = GpuCopyService(arena=lambda: (arena.name, arena.size, SLOT), mode="cuda", deadline_s=60.0)
    try:
        svc.share("e#1", p.ShareGpuKv("e#1", BLOCKS, export_kv(mover)))
        slots = store.reserve(1, 0, "", [b"a", b"b"])
        event = mover.device.record(torch.cuda.current_stream(), interprocess=True)
        after = mover.device.ipc_event_handle(event)
        svc.copy("e#1", 1, store, p.GpuCopy("e#1", 1, "offload", [5, 6], slots, after))
        assert _wait(svc, 1) == "done"
        view = arena.slots(SLOT)
        assert bytes(view[slots[1], : LAYERS * 2 * PAGE]) == _block_bytes(layers, 6)
        store.commit(1, slots)
        pinned = store.begin_load(1, 0, "", [b"a", b"b"])
        svc.copy("e#1", 1, store, p.GpuCopy("e#1", 2, "upload", [40, 41], pinned))
        assert _wait(svc, 2) == "done"
        torch.cuda.synchronize()
        assert _block_bytes(layers, 41) == _block_bytes(layers, 6)
    finally:
        svc.close()
        mover.close()


def _wait(svc: GpuCopyService, copy_id: int) -> str:
    for _ in range(6000):
        state = svc.status("e#1", p.GpuCopyStatus("e#1", [copy_id])).states[0]
        if state != "running":
            return state
        time.sleep(0.005)
    raise AssertionError("copy still running after 30 s")


def _views(raw: Any, layout: str, heads: int = HEADS, tokens: int = BLOCK_TOKENS) -> list[Any]:
    """vLLM 0.32's per-layer ``[B, H, N, C]`` byte views of ``raw`` under ``layout`` (its
    ``KVCacheLayout`` name: the logical axes L, B, H, N, C in memory order), unpadded, as
    ``create_kv_cache_views`` places them."""
    sizes = {"L": LAYERS, "B": BLOCKS, "H": heads, "N": tokens, "C": 2 * HEAD_DIM * 2}
    strides, step = {}, 1
    for axis in reversed(layout):
        strides[axis], step = step, step * sizes[axis]
    shape = tuple(sizes[a] for a in "BHNC")
    stride = tuple(strides[a] for a in "BHNC")
    return [raw.as_strided(shape, stride, layer * strides["L"]) for layer in range(LAYERS)]


def _slot(views: list[Any], block: int, order: str) -> bytes:
    perm = ["HNC".index(a) for a in order]
    pages = [v[block].permute(*perm).contiguous().cpu() for v in views]
    return b"".join(bytes(pg.flatten().numpy()) for pg in pages)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC", "LHBNC"])
def test_cuda_round_trip_in_vllm_layouts(mapping: ArenaMapping, layout: str) -> None:
    """vLLM 0.32's default CUDA layout (LBNHC), a block-outer one (layers interleaved in a
    block) and a head-outer one (one region per head)."""
    raw = torch.randint(0, 255, (LAYERS * BLOCKS * 2 * PAGE,), dtype=torch.uint8, device="cuda")
    views = _views(raw, layout)
    order = slot_order(views, BLOCKS)
    assert order == ("NHC" if layout.endswith("NHC") else "HNC")
    mover = make_mover(views, BLOCKS)
    assert isinstance(mover, DeviceBlockMover) and mover.bytes_per_block == LAYERS * 2 * PAGE
    want = {b: _slot(views, b, order) for b in (3, 40, 41)}
    mover.store(mapping, [3, 40, 41], [7, 8, 0]).wait()
    view = mapping.slots_view()
    assert bytes(view[8, : mover.bytes_per_block]) == want[40]
    del view
    mover.load(mapping, [7, 8, 0], [60, 61, 62]).wait()
    assert [_slot(views, b, order) for b in (60, 61, 62)] == [want[3], want[40], want[41]]
    mover.close()


@pytest.mark.gpu
@needs_cuda
def test_cuda_lending_to_the_daemons_copy_worker(tmp_path: Any) -> None:
    """The connector worker side's lending (``LentCopies``) against a real daemon with
    ``gpu_copies = cuda``: the KV (vLLM's default layout) is shared through CUDA IPC, an
    offload and an upload run in the daemon's copy worker after an event on this process's
    compute stream, and the bytes land both ways."""
    daemon = start_daemon(tmp_path, env={"TOKENCAKE_GPU_COPIES": "cuda"})
    client = TokenCakeClient(daemon.endpoint, timeout_s=10.0)
    raw = torch.randint(0, 255, (LAYERS * BLOCKS * 2 * PAGE,), dtype=torch.uint8, device="cuda")
    views = _views(raw, "LBNHC")
    layout = KvLayout(
        "gpu|vllm-nhc-v2|cuda", LAYERS, BLOCK_TOKENS, HEADS, HEAD_DIM, "float16", LAYERS * 2 * PAGE
    )
    mover = make_mover(views, BLOCKS)
    assert isinstance(mover, DeviceBlockMover)
    lending = LentCopies(mover, daemon.endpoint, timeout_s=10.0)
    try:
        reg = client.call(p.RegisterEngine("gpu-lend", layout, BLOCKS))
        lending.attach(reg.engine_id, 1)
        assert lending.active and lending.stats.shares == 1
        arena = ArenaMapping.open(reg.arena_name, reg.slot_bytes, min_bytes=reg.arena_bytes)
        hashes = [b"a" * 32, b"b" * 32]
        slots = client.call(p.Reserve(reg.engine_id, hashes)).slots
        want = [_slot(views, b, "NHC") for b in (5, 6)]
        out = lending.start(arena, [5, 6], slots, upload=False, lend=True)
        assert isinstance(out, Lent)
        _settle(lending, out)
        view = arena.slots_view()
        assert [bytes(view[s, : LAYERS * 2 * PAGE]) for s in slots] == want
        del view
        client.call(p.Commit(reg.engine_id, slots))
        pinned = client.call(p.LoadBegin(reg.engine_id, hashes)).slots
        back = lending.start(arena, [40, 41], pinned, upload=True, lend=True)
        _settle(lending, back)
        torch.cuda.synchronize()
        assert [_slot(views, b, "NHC") for b in (40, 41)] == want
        assert (lending.stats.lent, lending.stats.in_process) == (2, 0)
        client.call(p.LoadEnd(reg.engine_id, pinned))
        arena.close()
    finally:
        lending.close()
        mover.close()
        client.close()
        daemon.stop()


def _settle(lending: LentCopies, handle: Any) -> None:
    for _ in range(6000):
        lending.poll()
        if handle.poll():
            return
        time.sleep(0.005)
    raise AssertionError("the lent copy did not finish in 30 s")
