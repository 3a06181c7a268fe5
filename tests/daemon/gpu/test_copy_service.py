"""The daemon's copy service with its real copy worker processes, on the FAKE device.

The worker is the real ``python -m tokencake.daemon.gpu.copy_worker``; the engine's "GPU"
tensors are fake-device tensors in shared memory that it opens from their exported handles
and writes into, and the arena is a real daemon arena with a real ``HostStore``. What this
cannot show, CUDA IPC and DMA on hardware, has not run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.gpu.conftest import BLOCKS, LAYERS, PAGE, SLOT, block_bytes, fake_kv
from tokencake import protocol as p
from tokencake.daemon.arena import Arena
from tokencake.daemon.gpu.fake import FakeDevice
from tokencake.daemon.gpu.service import OVERRUN, RESPAWN_S, GpuCopyService
from tokencake.daemon.host_store import HostStore
from tokencake.gpu.regions import block_regions
from tokencake.protocol import ProtocolError

OWNER = 1
ENGINE = "eng#1"


@pytest.fixture
def service(arena: Arena) -> Iterator[GpuCopyService]:
    svc = _service(arena)
    yield svc
    svc.close()


@pytest.fixture
def store(arena: Arena) -> HostStore:
    s = HostStore((arena.size - 2048) // SLOT, SLOT, clock=time.monotonic)
    s.register_layout("f" * 16, LAYERS * PAGE)
    return s


def _share(svc: GpuCopyService, device: FakeDevice, layers: list[Any]) -> p.ShareGpuKvReply:
    tensors = [device.export(r) for r in block_regions(layers, BLOCKS)]
    return svc.share(ENGINE, p.ShareGpuKv(ENGINE, BLOCKS, tensors))


def _wait(svc: GpuCopyService, ids: list[int], engine: str = ENGINE) -> list[str]:
    """Poll as an engine does, once per step, until no copy is running (bounded)."""
    pending, states = list(ids), dict.fromkeys(ids, "running")
    for _ in range(12000):  # a minute: a new worker imports torch first, slow when loaded
        reply = svc.status(engine, p.GpuCopyStatus(engine, pending))
        for copy_id, state in zip(pending, reply.states, strict=True):
            states[copy_id] = state
        pending = [c for c in pending if states[c] == "running"]
        if not pending:
            return [states[c] for c in ids]
        time.sleep(0.005)
    raise AssertionError(f"copies {pending} still running")


def _reserve(store: HostStore, n: int, tag: bytes = b"h") -> list[int]:
    return store.reserve(OWNER, 0, "", [tag + bytes([i]) for i in range(n)])


def test_offload_then_upload_through_the_worker(
    service: GpuCopyService, store: HostStore, arena: Arena, device: FakeDevice
) -> None:
    layers = fake_kv(device)
    reply = _share(service, device, layers)
    assert reply.worker_pid == service.workers()["fake-0"] and reply.deadline_s == 60.0
    blocks = [7, 3, 40, 41, 42]
    slots = _reserve(store, len(blocks))
    want = {b: block_bytes(layers, b) for b in blocks}
    req = p.GpuCopy(ENGINE, 1, "offload", blocks, slots, after_event=b"fake-event:1")
    service.copy(ENGINE, OWNER, store, req)
    assert _wait(service, [1]) == ["done"]
    view = arena.slots(SLOT)
    for b, s in zip(blocks, slots, strict=True):
        assert bytes(view[s, : LAYERS * PAGE]) == want[b]
    store.commit(OWNER, slots)
    # reported once, then forgotten
    assert service.status(ENGINE, p.GpuCopyStatus(ENGINE, [1])).states == ["unknown"]
    pinned = store.begin_load(OWNER, 0, "", [b"h" + bytes([i]) for i in range(len(blocks))])
    targets = [60, 61, 62, 0, 1]
    service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 2, "upload", targets, pinned))
    assert _wait(service, [2]) == ["done"]
    for b, t in zip(blocks, targets, strict=True):
        assert block_bytes(layers, t) == want[b]  # the worker wrote the engine's tensors


def test_copies_refused_unless_the_engine_holds_slots_and_blocks(
    service: GpuCopyService, store: HostStore, device: FakeDevice
) -> None:
    with pytest.raises(ProtocolError, match="share_gpu_kv first"):
        service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 1, "offload", [1], [0]))
    _share(service, device, fake_kv(device))
    slots = _reserve(store, 4)
    cases = [
        (p.GpuCopy(ENGINE, 1, "upload", [1], slots[:1]), "not_owner"),  # reserved, not pinned
        (p.GpuCopy(ENGINE, 1, "offload", [1], [slots[-1] + 1]), "not_owner"),
        (p.GpuCopy(ENGINE, 1, "offload", [BLOCKS], slots[:1]), "bad_request"),
        (p.GpuCopy(ENGINE, 1, "offload", [1, 1], slots[:2]), "bad_request"),
        (p.GpuCopy(ENGINE, 1, "offload", [1, 2], slots[:1]), "bad_request"),
        (p.GpuCopy(ENGINE, 1, "offload", [], []), "bad_request"),
    ]
    for req, code in cases:
        with pytest.raises(ProtocolError) as err:
            service.copy(ENGINE, OWNER, store, req)
        assert err.value.code == code, req


def test_a_block_is_in_one_running_copy_at_most(
    store: HostStore, device: FakeDevice, arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENCAKE_FAKE_GPU_POLLS", str(10**9))  # copies never complete
    svc = _service(arena)
    try:
        _share(svc, device, fake_kv(device))
        slots = _reserve(store, 4)
        svc.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 1, "offload", [5, 6], slots[:2]))
        for req in (
            p.GpuCopy(ENGINE, 2, "offload", [6, 7], slots[2:]),  # block 6 is lent
            p.GpuCopy(ENGINE, 2, "offload", [8, 9], [slots[1], slots[2]]),  # slot in use
            p.GpuCopy(ENGINE, 1, "offload", [8, 9], slots[2:]),  # copy id still known
        ):
            with pytest.raises(ProtocolError) as err:
                svc.copy(ENGINE, OWNER, store, req)
            assert err.value.code == "conflict"
        assert svc.status(ENGINE, p.GpuCopyStatus(ENGINE, [1])).states == ["running"]
        # The engine leaves with the copy in flight: its worker is killed and reaped before
        # the daemon may free the slots the copy writes.
        pid = svc.workers()["fake-0"]
        svc.engine_gone(ENGINE)
        assert svc.workers() == {}
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped, not a zombie
    finally:
        svc.close()


def _until_dead(pid: int) -> None:
    """Wait until ``pid`` has exited (a zombie: its parent, this process, has not reaped it)."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, f"process {pid} did not die"
        time.sleep(0.01)


def test_worker_death_fails_its_copies_and_a_new_worker_reopens(
    store: HostStore, device: FakeDevice, arena: Arena
) -> None:
    now = [0.0]
    service = _service(arena, clock=lambda: now[0])
    try:
        layers = fake_kv(device)
        _share(service, device, layers)
        slots = _reserve(store, 2)
        first = service.workers()["fake-0"]
        os.kill(first, 9)
        _until_dead(first)  # so the copy finds a broken pipe, not a pipe poll() finds dead
        service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 1, "offload", [1, 2], slots))
        assert _wait(service, [1]) == ["failed"]
        # within RESPAWN_S of a worker's death, copies fail at once rather than respawn it
        service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 2, "offload", [1, 2], slots))
        assert _wait(service, [2]) == ["failed"] and service.workers() == {}
        now[0] += RESPAWN_S
        # then a new worker starts, and opens the engine's tensors again
        service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 3, "offload", [1, 2], slots))
        assert _wait(service, [3]) == ["done"]
        assert service.workers()["fake-0"] != first
        view = arena.slots(SLOT)
        assert bytes(view[slots[1], : LAYERS * PAGE]) == block_bytes(layers, 2)
    finally:
        service.close()


def test_tensors_that_do_not_open_fail_the_copies(
    service: GpuCopyService, store: HostStore, device: FakeDevice
) -> None:
    layers = fake_kv(device)
    tensors = [device.export(r) for r in block_regions(layers, BLOCKS)]
    device.free()  # the engine's memory is gone before the worker opens it
    service.share(ENGINE, p.ShareGpuKv(ENGINE, BLOCKS, tensors))
    slots = _reserve(store, 1)
    service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 1, "offload", [1], slots))
    reply = service.status(ENGINE, p.GpuCopyStatus(ENGINE, [1]))
    states = _wait(service, [1]) if reply.states == ["running"] else reply.states
    assert states == ["failed"]


def test_shares_refused_unless_the_daemon_copies_that_kind(
    arena: Arena, device: FakeDevice
) -> None:
    for mode in ("off", "cuda"):
        svc = _service(arena, mode)
        with pytest.raises(ProtocolError, match="gpu_copies"):
            _share(svc, device, fake_kv(device))
        assert svc.workers() == {}


def _service(
    arena: Arena, mode: str = "fake", clock: Callable[[], float] = time.monotonic
) -> GpuCopyService:
    return GpuCopyService(
        arena=lambda: (arena.name, arena.size, SLOT), mode=mode, deadline_s=60.0, clock=clock
    )


def test_a_copy_past_its_deadline_takes_its_worker_down(
    store: HostStore, device: FakeDevice, arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's own bound (the worker exits at one deadline by itself): a copy still
    running at OVERRUN deadlines is failed and its worker killed and reaped, before the
    slots' lease (two deadlines) can expire under it."""
    monkeypatch.setenv("TOKENCAKE_FAKE_GPU_POLLS", str(10**9))  # copies never complete
    now = [0.0]
    svc = _service(arena, clock=lambda: now[0])
    try:
        _share(svc, device, fake_kv(device))
        pid = svc.workers()["fake-0"]
        svc.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 1, "offload", [3], _reserve(store, 1)))
        now[0] += svc.deadline_s * OVERRUN - 0.001
        assert svc.status(ENGINE, p.GpuCopyStatus(ENGINE, [1])).states == ["running"]
        now[0] += 0.002
        svc.poll()  # as the daemon's housekeeping does
        reply = svc.status(ENGINE, p.GpuCopyStatus(ENGINE, [1]))
        assert reply.states == ["failed"] and "died or stopped" in reply.errors[0]
        assert svc.workers() == {} and OVERRUN * svc.deadline_s < 2 * svc.deadline_s
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        svc.close()


def test_a_worker_found_dead_by_a_write_gets_the_same_pause(
    store: HostStore, device: FakeDevice, arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies between ``poll`` and the copy's write is found by a broken pipe;
    its GPU gets no new worker for ``RESPAWN_S`` either (it once respawned at once: a race
    that failed the test above about one run in a hundred)."""
    now = [0.0]
    service = _service(arena, clock=lambda: now[0])
    try:
        _share(service, device, fake_kv(device))
        slots = _reserve(store, 2)
        first = service.workers()["fake-0"]
        os.kill(first, 9)
        _until_dead(first)
        with monkeypatch.context() as mp:  # poll() has not seen the death yet: the write does
            mp.setattr(service, "poll", lambda: None)
            service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 1, "offload", [1, 2], slots))
        assert _wait(service, [1]) == ["failed"] and service.workers() == {}
        service.copy(ENGINE, OWNER, store, p.GpuCopy(ENGINE, 2, "offload", [1, 2], slots))
        assert _wait(service, [2]) == ["failed"] and service.workers() == {}
    finally:
        service.close()
