"""GPU data-plane bench: arena <-> GPU copies against torch's pinned ``copy_``, in one run.

Run by ``scripts/gpu-check.sh`` on a machine with one NVIDIA GPU; every ratio has its baseline
measured in the same run on the same GPU:

  (a) the engine's path (``DeviceBlockMover``: vLLM 0.32's default CUDA layout, ``LBNHC``:
      per layer ``[B, H, N, C]`` views stored block, token, head, K+V; random block ids into
      random slots of a real daemon's arena, page-locked) store and load bandwidth, against
      ``copy_`` between a GPU buffer and a ``pin_memory`` buffer of the same bytes;
  (b) the CUDA IPC path as the vLLM connector's worker side runs it (``LentCopies``: an
      event on the compute stream, then the blocks lent to the daemon's copy worker, its own
      process with the engine's KV opened through IPC handles), timed from the lend to the
      loan settled;
  (c) interference: this process plays a compute-bound engine (fp16 matmuls timed with CUDA
      events) while the daemon's worker uploads into its KV; the kernel's slowdown against
      windows without uploads, alternated so drift cancels.

Targets (issue 13): (a) and (b) >= 0.90x pinned ``copy_`` per direction; (c) <= 5 %.

    python bench/bench_gpu.py [--json out.json]      # needs CUDA
    python bench/bench_gpu.py --device cpu --quick   # the FAKE device (CPU tensors): runs
                                                     # every code path, measures nothing

Exits 1 if any copy moves wrong bytes or any step fails; a missed target is reported, not
an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.clients.gpu_lending import DaemonCopies
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.clients.launcher import daemon_flags, running
from tokencake.connectors.vllm.lending import Lent, LentCopies
from tokencake.gpu.block_mover import DeviceBlockMover
from tokencake.gpu.device import Device
from tokencake.gpu.mover import CopyHandle
from tokencake.gpu.regions import block_regions
from tokencake.layout import KvLayout
from tokencake.segment import ArenaError

COPY_TARGET = 0.90
SLOWDOWN_TARGET = 0.05


@dataclass(frozen=True)
class Shape:
    """vLLM 0.32's KV on CUDA: per layer ``[B, H, N, C]`` (``C``: K and V of one head and
    token), stored ``B, N, H, C`` (its default ``KVCacheLayout``, ``LBNHC``)."""

    layers: int
    num_blocks: int
    block_tokens: int
    heads: int
    head_dim: int
    copy_blocks: int
    reps: int
    matmul: int  # square fp16 matmul size of the "engine" kernel
    steps: int  # matmuls per timed window
    windows: int  # windows with and without uploads, alternated

    @property
    def page(self) -> int:
        return self.block_tokens * self.heads * self.head_dim * 2  # one fp16 K (or V) page

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.page * self.layers

    @property
    def copy_bytes(self) -> int:
        return self.copy_blocks * self.bytes_per_block


FULL = Shape(32, 1024, 16, 8, 128, 256, 5, 8192, 50, 6)
QUICK = Shape(4, 64, 16, 2, 64, 16, 2, 64, 3, 2)


@dataclass
class Results:
    device: str
    shape: Shape
    rows: list[tuple[str, float, str, str]] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, target: str = "") -> None:
        self.rows.append((name, value, unit, target))


# --------------------------------------------------------------------------- the device


def open_device(kind: str) -> Device:
    if kind == "cuda":
        from tokencake.gpu.device import CudaDevice

        return CudaDevice(0)
    from tokencake.daemon.gpu.fake import FakeDevice

    return FakeDevice()


def alloc_kv(device: Device, shape: Shape) -> list[Any]:
    """Per layer the ``[B, H, N, C]`` view vLLM hands a connector, over ``B, N, H, C`` memory."""
    dims = (shape.num_blocks, shape.block_tokens, shape.heads, 2 * shape.head_dim)
    torch.manual_seed(0)  # seeds the CUDA generators too
    out = []
    for _ in range(shape.layers):
        if device.kind == "cuda":  # drawn on the GPU: 2 GiB of KV drawn on the CPU is slow
            t = torch.randn(dims, dtype=torch.float16, device="cuda")
        else:
            t = device.alloc(dims, torch.float16)  # type: ignore[attr-defined]
            t.copy_(torch.randn(dims).to(torch.float16))
        out.append(t.permute(0, 2, 1, 3))
    return out


def best_seconds(device: Device, reps: int, run: Callable[[], CopyHandle | None]) -> float:
    """Best wall time of ``reps`` runs, each from an idle device to every byte landed."""
    times = []
    for _ in range(reps + 1):  # the first run warms up (allocations, page-locking, launch)
        device.synchronize()
        start = time.perf_counter()
        handle = run()
        if handle is not None:
            handle.wait()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


# ------------------------------------------------------------------- (a) baseline, engine path


def pinned_baseline(device: Device, nbytes: int, reps: int) -> tuple[float, float]:
    """Seconds for torch ``copy_`` of ``nbytes``: GPU -> pinned host, pinned host -> GPU."""
    cuda = device.kind == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.zeros(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")

    def d2h() -> None:
        host.copy_(dev, non_blocking=True)

    def h2d() -> None:
        dev.copy_(host, non_blocking=True)

    return best_seconds(device, reps, d2h), best_seconds(device, reps, h2d)


def random_pairs(shape: Shape, num_slots: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    blocks = rng.sample(range(shape.num_blocks), shape.copy_blocks)
    slots = rng.sample(range(num_slots), shape.copy_blocks)
    return blocks, slots


def block_bytes(layers: list[Any], block: int) -> bytes:
    """Block ``block`` of every layer as a slot holds it: each layer's page as stored (N, H, C)."""
    pages = [layer[block].permute(1, 0, 2) for layer in layers]
    return b"".join(
        bytes(pg.contiguous().view(torch.uint8).cpu().flatten().numpy()) for pg in pages
    )


def check_slots(
    arena: ArenaMapping, layers: list[Any], blocks: list[int], slots: list[int]
) -> None:
    view, n = arena.slots_view(), len(layers) * layers[0][0].numel() * 2
    for b, s in list(zip(blocks, slots, strict=True))[:8]:
        if bytes(view[s, :n]) != block_bytes(layers, b):
            raise AssertionError(f"slot {s} does not hold block {b}")


def engine_path(
    res: Results, device: Device, kv: list[Any], arena: ArenaMapping, base: tuple[float, float]
) -> None:
    shape = res.shape
    mover = DeviceBlockMover(device, block_regions(kv, shape.num_blocks))
    blocks, slots = random_pairs(shape, arena.num_slots, 1)
    store = best_seconds(device, shape.reps, lambda: mover.store(arena, blocks, slots))
    check_slots(arena, kv, blocks, slots)
    targets = random.Random(2).sample(range(shape.num_blocks), shape.copy_blocks)
    load = best_seconds(device, shape.reps, lambda: mover.load(arena, slots, targets))
    check_slots(arena, kv, targets, slots)  # each target now holds its slot's bytes
    gb = shape.copy_bytes / 1e9
    res.add("pinned copy_ GPU->host (baseline)", gb / base[0], "GB/s")
    res.add("pinned copy_ host->GPU (baseline)", gb / base[1], "GB/s")
    res.add("engine store, arena <- GPU", gb / store, "GB/s")
    res.add("engine load, arena -> GPU", gb / load, "GB/s")
    res.add("engine store / pinned copy_", base[0] / store, "x", f">= {COPY_TARGET:.2f}")
    res.add("engine load / pinned copy_", base[1] / load, "x", f">= {COPY_TARGET:.2f}")
    mover.release(arena)
    mover.close()


# --------------------------------------------------------------------------- (b) CUDA IPC path


@dataclass
class Engine:
    """This process as an engine registered with the daemon, its KV shared with the worker."""

    client: TokenCakeClient
    engine_id: str
    lending: LentCopies
    arena: ArenaMapping
    seq: int = 0

    @property
    def copies(self) -> DaemonCopies:
        return self.lending.daemon

    def hashes(self, n: int) -> list[bytes]:
        self.seq += 1
        return [f"{self.seq}:{i}".encode() for i in range(n)]


def lend_and_wait(engine: Engine, upload: bool, blocks: list[int], slots: list[int]) -> float:
    """Seconds from the lend (the connector's ``LentCopies.start``) to the loan settled."""
    start = time.perf_counter()
    handle = engine.lending.start(engine.arena, blocks, slots, upload=upload, lend=True)
    if not isinstance(handle, Lent):
        raise AssertionError("the copy was not lent to the daemon's worker")
    for _ in range(10_000_000):
        engine.lending.poll()
        if handle.poll():  # raises CopyError if the copy failed
            return time.perf_counter() - start
    raise AssertionError("a lent copy never finished")


def ipc_path(
    res: Results, device: Device, kv: list[Any], engine: Engine, base: tuple[float, float]
) -> None:
    shape = res.shape
    blocks, _ = random_pairs(shape, engine.arena.num_slots, 3)
    store_s, load_s = [], []
    for _ in range(shape.reps + 1):
        hashes = engine.hashes(len(blocks))
        slots = engine.client.call(p.Reserve(engine.engine_id, hashes)).slots
        store_s.append(lend_and_wait(engine, False, blocks, slots))
        check_slots(engine.arena, kv, blocks, slots)
        engine.client.call(p.Commit(engine.engine_id, slots))
        pinned = engine.client.call(p.LoadBegin(engine.engine_id, hashes)).slots
        targets = random.Random(len(store_s)).sample(range(shape.num_blocks), len(blocks))
        load_s.append(lend_and_wait(engine, True, targets, pinned))
        engine.client.call(p.LoadEnd(engine.engine_id, pinned))
        check_slots(engine.arena, kv, targets, pinned)  # what the worker uploaded
    gb = shape.copy_bytes / 1e9
    store, load = min(store_s[1:]), min(load_s[1:])  # the first opens handles, warms up
    res.add("CUDA IPC store (daemon worker), arena <- GPU", gb / store, "GB/s")
    res.add("CUDA IPC load (daemon worker), arena -> GPU", gb / load, "GB/s")
    res.add("CUDA IPC store / pinned copy_", base[0] / store, "x", f">= {COPY_TARGET:.2f}")
    res.add("CUDA IPC load / pinned copy_", base[1] / load, "x", f">= {COPY_TARGET:.2f}")


# --------------------------------------------------------------------------- (c) interference


class Kernel:
    """A compute-bound "engine" step: fp16 matmuls on the compute stream, timed on it."""

    def __init__(self, device: Device, n: int, steps: int = 20) -> None:
        self.device, self.steps = device, steps
        where = "cuda" if device.kind == "cuda" else "cpu"
        dtype = torch.float16 if device.kind == "cuda" else torch.float32
        self.a = torch.randn(n, n, device=where).to(dtype)
        self.b = torch.randn(n, n, device=where).to(dtype)

    def run(self, between: Callable[[], None]) -> float:
        """Seconds of one window of ``steps`` matmuls; ``between`` runs after each launch."""
        if self.device.kind == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.steps):
                torch.matmul(self.a, self.b)
                between()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        t0 = time.perf_counter()
        for _ in range(self.steps):
            torch.matmul(self.a, self.b)
            between()
        return time.perf_counter() - t0


class Uploader:
    """Keeps one daemon-driven upload in flight into blocks the kernel does not touch."""

    def __init__(self, engine: Engine, shape: Shape) -> None:
        self.engine = engine
        blocks, _ = random_pairs(shape, engine.arena.num_slots, 5)
        hashes = engine.hashes(len(blocks))
        slots = engine.client.call(p.Reserve(engine.engine_id, hashes)).slots
        engine.client.call(p.Commit(engine.engine_id, slots))
        self.slots = engine.client.call(p.LoadBegin(engine.engine_id, hashes)).slots
        self.blocks = blocks[: len(self.slots)]
        self.busy = False
        self.done_bytes = 0
        self.block_bytes = shape.bytes_per_block

    def _settle(self) -> None:
        for settled in self.engine.copies.poll():
            if not settled.ok:
                raise AssertionError(f"upload failed: {settled.reason}")
            self.busy = False
            self.done_bytes += len(settled.blocks) * self.block_bytes

    def step(self) -> None:
        self._settle()
        if not self.busy:
            self.engine.copies.lend("upload", self.blocks, self.slots)
            self.busy = True

    def drain(self) -> None:
        """Wait for the upload in flight, so the windows without uploads have none."""
        for _ in range(1_000_000):
            if not self.busy:
                return
            self._settle()
            time.sleep(0.0005)
        raise AssertionError("an upload never finished")


def interference(res: Results, engine: Engine) -> None:
    shape = res.shape
    kernel = Kernel(open_device(res.device), shape.matmul, shape.steps)
    uploads = Uploader(engine, shape)
    kernel.run(lambda: None)  # warm-up
    alone, loaded = [], []
    start = time.perf_counter()
    for _ in range(shape.windows):
        alone.append(kernel.run(lambda: None))
        loaded.append(kernel.run(uploads.step))
        uploads.drain()
    wall = time.perf_counter() - start
    slowdown = statistics.median(loaded) / statistics.median(alone) - 1
    res.add("compute kernel, alone (median window)", statistics.median(alone) * 1e3, "ms")
    res.add("compute kernel, with uploads (median window)", statistics.median(loaded) * 1e3, "ms")
    res.add(
        "kernel slowdown from daemon-driven uploads",
        slowdown * 100,
        "%",
        f"<= {SLOWDOWN_TARGET * 100:.0f} %",
    )
    res.add("upload bandwidth during the kernel", uploads.done_bytes / 1e9 / wall, "GB/s")


# --------------------------------------------------------------------------- the run


@contextmanager
def engine_on_daemon(device: Device, kv: list[Any], shape: Shape) -> Iterator[Engine]:
    """A real tokencaked; this process registers as an engine and shares its KV."""
    arena_bytes = shape.bytes_per_block * shape.copy_blocks * 3 + (1 << 20)
    env = {"TOKENCAKE_GPU_COPIES": device.kind}  # the daemon's copy worker, for this device
    with running(*daemon_flags(arena=arena_bytes), env=env) as daemon:
        client = daemon.client(timeout_s=60.0)
        layout = KvLayout(
            model_id=f"bench-gpu|vllm-nhc-v2|{device.kind}",
            num_layers=shape.layers,
            block_size=shape.block_tokens,
            num_kv_heads=shape.heads,
            head_dim=shape.head_dim,
            dtype="float16",
            bytes_per_block=shape.bytes_per_block,
        )
        reg = client.call(p.RegisterEngine("bench-gpu", layout, shape.num_blocks))
        arena = ArenaMapping.open(reg.arena_name, reg.slot_bytes, min_bytes=reg.arena_bytes)
        mover = DeviceBlockMover(device, block_regions(kv, shape.num_blocks))
        lending = LentCopies(mover, daemon.endpoint, timeout_s=60.0)
        lending.attach(reg.engine_id, 1)  # shares the KV, as the connector's worker side does
        if not lending.active:
            raise AssertionError("the daemon did not take the KV tensors")
        try:
            yield Engine(client, reg.engine_id, lending, arena)
        finally:
            lending.close()
            mover.close()
            client.close()
            with contextlib.suppress(ArenaError):  # views an exception's frames still hold
                arena.close()


def run(device_kind: str, shape: Shape) -> Results:
    device = open_device(device_kind)
    res = Results(device_kind, shape)
    kv = alloc_kv(device, shape)
    base = pinned_baseline(device, shape.copy_bytes, shape.reps)
    with engine_on_daemon(device, kv, shape) as engine:
        engine_path(res, device, kv, engine.arena, base)
        ipc_path(res, device, kv, engine, base)
        interference(res, engine)
    return res


def print_table(res: Results) -> None:
    s = res.shape
    print(
        f"GPU data plane ({res.device}): {s.layers} layers, vLLM LBNHC, "
        f"{s.bytes_per_block / 2**20:.2f} MiB per block, {s.copy_blocks} random blocks "
        f"({s.copy_bytes / 2**20:.1f} MiB) per copy, best of {s.reps}"
    )
    if res.device != "cuda":
        print("FAKE DEVICE (CPU tensors): every code path ran; the figures measure nothing")
    print(f"{'figure':<48}{'value':>12}  {'unit':<6}{'target':<10}")
    for name, value, unit, target in res.rows:
        print(f"{name:<48}{value:>12.3f}  {unit:<6}{target:<10}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: torch.cuda.is_available() is False (use --device cpu for a dry run)")
        return 2
    shape = QUICK if args.quick else FULL
    try:
        res = run("cuda" if args.device == "cuda" else "fake", shape)
    except Exception as exc:  # any failure is the bench's verdict, in one line
        print(f"bench_gpu FAILED: {type(exc).__name__}: {exc}")
        return 1
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": res.device, "rows": res.rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
