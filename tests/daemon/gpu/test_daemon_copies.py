"""Daemon-driven copies end to end on the FAKE device: a real tokencaked (``gpu_copies =
fake``) and its real copy worker; this test process plays the engine through
``DaemonCopies``, as a connector would. No GPU is involved (see docs/vllm.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_daemon
from tests.daemon.gpu.conftest import BLOCKS, LAYERS, PAGE, block_bytes, fake_kv
from tests.procs import Proc
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.clients.gpu_lending import DaemonCopies, Settled
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.daemon.gpu.fake import FakeDevice
from tokencake.gpu.regions import block_regions
from tokencake.layout import KvLayout
from tokencake.protocol import RemoteError

LAYOUT = KvLayout("fake-model|vllm-blockmajor-v1|fake", LAYERS, 16, 2, 32, "float16", LAYERS * PAGE)


def _daemon(tmp_path: Path, polls: int = 0) -> Proc:
    env = {"TOKENCAKE_GPU_COPIES": "fake", "TOKENCAKE_FAKE_GPU_POLLS": str(polls)}
    tmp_path.mkdir(exist_ok=True)
    return start_daemon(tmp_path, env=env)


class FakeEngine:
    """Registers, shares its fake-device KV, and lends blocks, as the connector would."""

    def __init__(self, daemon: Proc, device: FakeDevice, layers: list[Any]) -> None:
        self.client = TokenCakeClient(daemon.endpoint, timeout_s=10.0)
        self.device, self.layers = device, layers
        # a clock that stands still: an orphan comes back only when its worker is gone
        self.copies = DaemonCopies(self.client, clock=lambda: 0.0)
        self.register()

    def register(self) -> None:
        reg = self.client.call(p.RegisterEngine("fake-engine", LAYOUT, BLOCKS))
        self.engine_id = reg.engine_id
        self.arena = ArenaMapping.open(reg.arena_name, reg.slot_bytes, min_bytes=reg.arena_bytes)
        tensors = [self.device.export(r) for r in block_regions(self.layers, BLOCKS)]
        self.share = self.copies.share(reg.engine_id, tensors, BLOCKS)

    def settle(self, want: int, rounds: int = 4000) -> list[Settled]:
        out: list[Settled] = []
        for _ in range(rounds):
            out += self.copies.poll()
            if len(out) >= want:
                return out
            time.sleep(0.005)
        raise AssertionError(f"{len(out)} of {want} loans came back")

    def close(self) -> None:
        self.copies.close()
        self.arena.close()
        self.client.close()


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    d = FakeDevice()
    yield d
    d.free()


def test_offload_and_upload_lent_to_the_daemon(tmp_path: Path, device: FakeDevice) -> None:
    daemon = _daemon(tmp_path)
    layers = fake_kv(device)
    engine = FakeEngine(daemon, device, layers)
    try:
        assert engine.share.worker_pid > 0
        hashes = [b"h%d" % i for i in range(4)]
        slots = engine.client.call(p.Reserve(engine.engine_id, hashes)).slots
        blocks = [9, 2, 30, 31]
        loan = engine.copies.lend("offload", blocks, slots)
        assert all(engine.copies.ledger.is_lent(b) for b in blocks)
        (done,) = engine.settle(1)
        assert done.copy_id == loan.copy_id and done.ok
        assert not engine.copies.ledger.is_lent(9)
        view = engine.arena.slots_view()
        for b, s in zip(blocks, slots, strict=True):
            assert bytes(view[s, : LAYERS * PAGE]) == block_bytes(layers, b)
        del view  # the mapping cannot close while a view of it lives
        engine.client.call(p.Commit(engine.engine_id, slots))
        pinned = engine.client.call(p.LoadBegin(engine.engine_id, hashes)).slots
        engine.copies.lend("upload", [50, 51, 52, 53], pinned)
        (up,) = engine.settle(1)
        assert up.ok and block_bytes(layers, 53) == block_bytes(layers, 31)
        engine.client.call(p.LoadEnd(engine.engine_id, pinned))
        # a slot the engine does not hold is refused, and nothing is lent
        with pytest.raises(Exception, match="not_owner"):
            engine.copies.lend("upload", [1], [pinned[0]])
        assert not engine.copies.ledger.is_lent(1)
    finally:
        engine.close()
        daemon.stop()


def test_daemon_restart_orphans_loans_until_the_worker_is_gone(
    tmp_path: Path, device: FakeDevice
) -> None:
    """A copy in flight when the daemon dies: the blocks stay lent until the old worker has
    exited (it sees its stdin close); the engine registers with the new daemon, shares its
    tensors again, and copies work."""
    first = _daemon(tmp_path / "a", polls=10**9)  # its copies never complete
    layers = fake_kv(device)
    engine = FakeEngine(first, device, layers)
    try:
        slots = engine.client.call(p.Reserve(engine.engine_id, [b"x"])).slots
        engine.copies.lend("offload", [7], slots)
        assert engine.copies.poll() == [] and engine.copies.ledger.is_lent(7)
        first.kill9()
        # the daemon is gone: the loan is orphaned, then settled once the worker exits (the
        # engine's clock stands still, so the deadline cannot be what settles it)
        (lost,) = engine.settle(1)
        assert not lost.ok and not engine.copies.ledger.is_lent(7)
        second = _daemon(tmp_path / "b", polls=0)
        try:
            engine.client.close()
            engine.client = TokenCakeClient(second.endpoint, timeout_s=10.0)
            engine.copies.client = engine.client
            engine.arena.close()
            engine.register()
            assert engine.share.worker_pid != 0
            slots = engine.client.call(p.Reserve(engine.engine_id, [b"y"])).slots
            engine.copies.lend("offload", [7], slots)
            (ok,) = engine.settle(1)
            assert ok.ok
        finally:
            second.stop()
    finally:
        engine.close()


def test_a_daemon_without_gpu_copies_refuses_them(tmp_path: Path, device: FakeDevice) -> None:
    """The default (``gpu_copies = off``): one-line typed refusals, no worker started."""
    daemon = start_daemon(tmp_path)
    client = TokenCakeClient(daemon.endpoint, timeout_s=10.0)
    try:
        reg = client.call(p.RegisterEngine("fake-engine", LAYOUT, BLOCKS))
        tensors = [device.export(r) for r in block_regions(fake_kv(device), BLOCKS)]
        with pytest.raises(RemoteError, match="gpu_copies is off") as err:
            client.call(p.ShareGpuKv(reg.engine_id, BLOCKS, tensors))
        assert err.value.code == "bad_request"
        with pytest.raises(RemoteError, match="share_gpu_kv first"):
            client.call(p.GpuCopy(reg.engine_id, 1, "offload", [1], [0]))
        with pytest.raises(RemoteError) as err:
            client.call(p.GpuCopyStatus("nobody#9", [1]))
        assert err.value.code == "unknown_engine"
    finally:
        client.close()
        daemon.stop()
