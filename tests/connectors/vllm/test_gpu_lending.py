"""The connector's daemon-driven GPU copies, through its real classes, on the FAKE device.

``TokenCakeConnectorScheduler`` (with vLLM's real ``BlockPool``) and
``TokenCakeConnectorWorker`` exchange their metadata as vLLM's engine loop would
(``build_connector_meta`` -> ``start_load_kv``/``wait_for_save`` -> ``get_finished`` ->
``build_connector_worker_meta`` -> ``update_connector_output``). The worker's KV lives on the
FAKE device (CPU tensors in shared memory, ``daemon/gpu/fake.py``): the only stand-in, for
the GPU this machine does not have. The daemon and its copy worker are real processes; the
copy worker opens the worker's tensors from their exported handles and moves the bytes.
Nothing here runs on a GPU (docs/vllm.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import BlockHash  # noqa: E402

from tests.conftest import start_daemon  # noqa: E402
from tests.daemon.gpu.conftest import BLOCK_TOKENS, BLOCKS, LAYERS, PAGE, block_bytes  # noqa: E402
from tests.procs import Proc  # noqa: E402
from tokencake import protocol as p  # noqa: E402
from tokencake.connectors.vllm import preload  # noqa: E402
from tokencake.connectors.vllm.config import ConnectorConfig  # noqa: E402
from tokencake.connectors.vllm.connector_scheduler import TokenCakeConnectorScheduler  # noqa: E402
from tokencake.connectors.vllm.connector_worker import TokenCakeConnectorWorker  # noqa: E402
from tokencake.connectors.vllm.holds import AgentKv  # noqa: E402
from tokencake.connectors.vllm.jobs import TokenCakeWorkerMetadata  # noqa: E402
from tokencake.daemon.gpu.fake import FakeDevice  # noqa: E402
from tokencake.gpu.mover import CopyError  # noqa: E402
from tokencake.layout import KvLayout  # noqa: E402

LAYOUT = KvLayout("lend|vllm-hnc-v2|fake", LAYERS, BLOCK_TOKENS, 2, 32, "float16", LAYERS * PAGE)
NAMES = [f"layer.{i}" for i in range(LAYERS)]
AGENT = ("app-lend", "coder")
HASHES = [bytes([i]) * 32 for i in range(1, 5)]
REASON = p.DecisionReason("test")


class Engine:
    """The connector's two sides over one fake-device KV cache, stepped by hand."""

    def __init__(self, endpoint: str, device: FakeDevice, timeout_ms: float = 5000) -> None:
        # generous timeouts: a reply that comes late on a loaded machine would only make
        # the engine copy in-process, which these tests tell apart from lending
        self.cfg = ConnectorConfig(
            endpoint=endpoint, engine_name="lend-test", timeout_ms=timeout_ms, reconnect_s=0.2
        )
        self.sched = TokenCakeConnectorScheduler(
            self.cfg, LAYOUT, block_size=BLOCK_TOKENS, hash_stride=1, num_gpu_blocks=BLOCKS
        )
        self.pool = BlockPool(BLOCKS, enable_caching=True, hash_block_size=BLOCK_TOKENS)
        self.sched.bind_gpu_block_pool(self.pool)
        shape = (BLOCKS, 2, BLOCK_TOKENS, 64)  # [B, H, N, C]: K and V of 32 fp16 each
        gen = torch.Generator().manual_seed(7)
        self.layers = [device.alloc(shape, torch.float16) for _ in NAMES]
        for layer in self.layers:
            layer.copy_(torch.randn(shape, generator=gen))
        self.worker = TokenCakeConnectorWorker(
            LAYOUT, NAMES, self.cfg, num_blocks=BLOCKS, order="HNC", device=device
        )
        self.worker.register_kv_caches(dict(zip(NAMES, self.layers, strict=True)))
        # the agent's last call left 4 blocks in vLLM's prefix cache
        self.blocks = preload.take(self.pool, len(HASHES))
        preload.register(self.pool, self.blocks, HASHES, 0, BLOCK_TOKENS)
        self.sched.holds.agents[AGENT] = AgentKv(list(self.blocks), list(HASHES))
        self.saved = [block_bytes(self.layers, b) for b in self.blocks]

    @property
    def lending(self) -> Any:
        assert self.worker.lending is not None
        return self.worker.lending

    def step(self) -> None:
        meta = self.sched.build_connector_meta(cast(Any, None))
        self.worker.start_load_kv(meta)
        self.worker.wait_for_save(meta)
        self.worker.get_finished()
        done = self.worker.take_finished()
        if done is not None:
            out = TokenCakeWorkerMetadata(**done._asdict())
            self.sched.update_connector_output(
                cast(Any, SimpleNamespace(kv_connector_worker_meta=out))
            )

    def until(self, done: Any, what: str, rounds: int = 3000) -> None:
        for _ in range(rounds):
            self.step()
            if done():
                return
            time.sleep(0.005)
        raise AssertionError(f"never: {what} ({self.sched.stats}, {self.lending.stats})")

    def decide(self, kind: type[p.OffloadDecision | p.UploadDecision]) -> None:
        self.sched.holds.apply(kind(at_s=0.0, app_id=AGENT[0], agent_id=AGENT[1], reason=REASON))

    def stored_slots(self) -> list[int]:
        link = self.sched.link
        return list(link.call(p.Lookup(link.engine_id, HASHES)).slots)  # type: ignore[union-attr]

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()


def _daemon(tmp_path: Path, *, copies: str = "fake", polls: int = 0, endpoint: str = "") -> Proc:
    env = {"TOKENCAKE_GPU_COPIES": copies, "TOKENCAKE_FAKE_GPU_POLLS": str(polls)}
    tmp_path.mkdir(exist_ok=True)
    return start_daemon(tmp_path, env=env, endpoint=endpoint)


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    d = FakeDevice()
    yield d
    d.free()


def test_offload_and_predictive_upload_run_in_the_daemons_copy_worker(
    tmp_path: Path, device: FakeDevice
) -> None:
    daemon = _daemon(tmp_path)
    engine = Engine(daemon.endpoint, device)
    try:
        engine.until(lambda: engine.lending.active, "shared")  # on the first step, normally
        assert engine.lending.stats.shares == 1
        engine.decide(p.OffloadDecision)
        engine.until(lambda: engine.sched.stats.stored_blocks == 4, "offload committed")
        assert (engine.lending.stats.lent, engine.lending.stats.in_process) == (1, 0)
        assert device.on_compute == 1  # the copy waited for an event on the compute stream
        arena = engine.worker.arena
        assert arena is not None
        view = arena.slots_view()
        stored = [bytes(view[s, : LAYERS * PAGE]) for s in engine.stored_slots()]
        del view
        assert stored == engine.saved  # the copy worker wrote them, from the shared tensors
        for layer in engine.layers:
            layer[engine.blocks] = 0  # the blocks were freed and reused meanwhile
        engine.decide(p.UploadDecision)
        engine.until(lambda: engine.sched.stats.preloaded_blocks == 4, "preload registered")
        assert engine.lending.stats.lent == 2 and engine.lending.stats.in_process == 0
        for h, want in zip(HASHES, engine.saved, strict=True):
            cached = engine.pool.get_cached_block(BlockHash(h), [0])
            assert cached is not None
            assert block_bytes(engine.layers, cached[0].block_id) == want
        # a refusal about ownership fails the job: no in-process copy into a slot the daemon
        # says is not this engine's (a committed one, here)
        arena = engine.worker.arena
        assert arena is not None
        with pytest.raises(CopyError, match="not_owner"):
            engine.lending.start(arena, [9], engine.stored_slots()[:1], upload=False, lend=True)
        assert engine.lending.stats.refused == 1 and engine.lending.stats.in_process == 0
    finally:
        engine.close()
        daemon.stop()


def test_without_gpu_copies_the_worker_copies_in_process(
    tmp_path: Path, device: FakeDevice
) -> None:
    """``gpu_copies = off`` (the default): the share is refused once per registration, and
    every copy runs in the engine's process, as on an engine that never lends."""
    daemon = _daemon(tmp_path, copies="off")
    engine = Engine(daemon.endpoint, device)
    try:
        engine.step()
        assert engine.lending.stats.shares == 0 and not engine.lending.active
        assert engine.lending.daemon.engine_id == ""  # refused: nothing was shared
        engine.decide(p.OffloadDecision)
        engine.until(lambda: engine.sched.stats.stored_blocks == 4, "offload committed")
        assert (engine.lending.stats.lent, engine.lending.stats.in_process) == (0, 1)
        assert device.on_compute == 0 and device.followed_compute == 1
    finally:
        engine.close()
        daemon.stop()


def test_a_lent_block_stays_held_until_the_dead_daemons_worker_is_gone(
    tmp_path: Path, device: FakeDevice
) -> None:
    """A copy in flight when the daemon is killed: vLLM's blocks stay referenced (nothing
    can reuse them) until the copy worker has exited; the job then fails (nothing is
    committed). The restarted daemon gets the tensors again, for its own copy worker (that
    copies work after a restart is ``tests/daemon/gpu/test_daemon_copies.py``'s)."""
    first = _daemon(tmp_path / "a", polls=10**9)  # its copies never complete
    engine = Engine(first.endpoint, device, timeout_ms=1000)  # the dead daemon costs this
    try:
        engine.until(lambda: engine.lending.active, "shared")
        engine.decide(p.OffloadDecision)
        for _ in range(5):
            engine.step()
        assert engine.lending.stats.lent == 1 and engine.sched.stats.stored_blocks == 0
        assert all(engine.pool.blocks[b].ref_cnt == 1 for b in engine.blocks)
        assert all(engine.lending.daemon.ledger.is_lent(b) for b in engine.blocks)
        pid = engine.lending.daemon.worker_pid
        first.kill9()
        engine.until(lambda: engine.pool.blocks[engine.blocks[0]].ref_cnt == 0, "loan back")
        assert not any(engine.lending.daemon.ledger.is_lent(b) for b in engine.blocks)
        assert engine.sched.stats.stored_blocks == 0
        second = _daemon(tmp_path / "b", endpoint=first.endpoint)
        try:
            engine.until(lambda: engine.lending.stats.shares == 2, "shared again")
            assert engine.lending.active and engine.lending.daemon.worker_pid not in (0, pid)
        finally:
            second.stop()
    finally:
        engine.close()
