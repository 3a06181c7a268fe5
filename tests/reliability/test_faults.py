"""Faults against real processes: a daemon killed with SIGKILL mid-store and mid-load, a
client killed mid-write and mid-read, a full arena, no shared memory, a slow consumer, half
a multipart message, and wall-clock jumps."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq

from bench.common.fuzz_harness import InProcessDaemon
from tests.procs import spawn_daemon, start, wait_exit, wait_ready
from tokencake import protocol as p
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.daemon.arena import SHM_DIR, Arena
from tokencake.daemon.host_store import HostStore
from tokencake.layout import KvLayout
from tokencake.protocol import ErrorCode, RemoteError

LAYOUT = KvLayout("fault-model", 1, 16, 1, 16, "float16", 1024)
BIG = KvLayout("fault-big", 1, 16, 1, 16, "float16", 64 << 10)  # 16 slots in 1 MiB
REPO = Path(__file__).resolve().parents[2]


def _blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, LAYOUT.bytes_per_block), np.uint8)


def _until(pred: object, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------------- daemon SIGKILL


def test_daemon_killed_mid_store_and_mid_load_restarts_clean(tmp_path: Path) -> None:
    instance = f"k{uuid.uuid4().hex[:8]}"
    endpoint = f"ipc://{tmp_path}/kill.sock"
    d = start(tmp_path, endpoint=endpoint, instance=instance)
    client = TokenCakeClient(endpoint, timeout_s=1.0)  # kept across the restart
    reg = client.call(p.RegisterEngine("eng", LAYOUT))
    stored = [uuid.uuid4().bytes for _ in range(4)]
    half = [uuid.uuid4().bytes for _ in range(4)]
    mapping = ArenaMapping.open(reg.arena_name, reg.slot_bytes)
    data = _blocks(4, 1)
    slots = client.call(p.Reserve(reg.engine_id, stored)).slots
    mapping.write_blocks(slots, data)
    client.call(p.Commit(reg.engine_id, slots))
    # Mid-load: pinned and half copied out. Mid-store: reserved and half written.
    pinned = client.call(p.LoadBegin(reg.engine_id, stored)).slots
    out = np.zeros_like(data)
    mapping.read_blocks(pinned[:2], out[:2])
    writing = client.call(p.Reserve(reg.engine_id, half)).slots
    mapping.write_blocks(writing[:2], data[:2])
    old_segment = Path(SHM_DIR) / reg.arena_name

    d.kill9()
    assert old_segment.exists()  # what a crash leaves behind
    # The engine's mapping outlives the daemon: finishing the copy does not fault.
    mapping.read_blocks(pinned[2:], out[2:])
    assert np.array_equal(out, data)
    with pytest.raises(DaemonUnavailable):
        client.call(p.Ping())

    # Any daemon starting on this host removes a dead one's arena; on a shared machine
    # another test's daemon may get there first, and then d2 has nothing stale to log.
    left_for_d2 = old_segment.exists()
    d2 = spawn_daemon(tmp_path, endpoint=endpoint, instance=instance)
    try:
        wait_ready(d2)
        # The same client object reconnects by itself.
        _until(lambda: _pings(client), what="client reconnect")
        assert not old_segment.exists(), "stale arena of the dead daemon was not removed"
        if left_for_d2:
            assert "stale" in d2.log()
        # The old engine id is gone: the engine gets a typed error and re-registers.
        with pytest.raises(RemoteError) as info:
            client.call(p.Lookup(reg.engine_id, stored))
        assert info.value.code == ErrorCode.UNKNOWN_ENGINE
        reg2 = client.call(p.RegisterEngine("eng", LAYOUT))
        assert reg2.arena_name != reg.arena_name
        # Nothing from before the crash is served: not the committed blocks, not the
        # half-written ones.
        assert client.call(p.Lookup(reg2.engine_id, stored + half)).hit_blocks == 0
        assert client.call(p.LoadBegin(reg2.engine_id, stored)).slots == []
        pool = client.call(p.Pool()).pool
        assert (pool.ready, pool.writing, pool.reading) == (0, 0, 0)
        # The fresh arena is usable end to end.
        again = client.call(p.Reserve(reg2.engine_id, half)).slots
        assert all(s >= 0 for s in again)
        with ArenaMapping.open(reg2.arena_name, reg2.slot_bytes) as m2:
            m2.write_blocks(again, data)
            client.call(p.Commit(reg2.engine_id, again))
            back = np.zeros_like(data)
            got = client.call(p.LoadBegin(reg2.engine_id, half)).slots
            m2.read_blocks(got, back)
            client.call(p.LoadEnd(reg2.engine_id, got))
            assert np.array_equal(back, data)
    finally:
        mapping.close()
        client.close()
        assert d2.stop() == 0


def _pings(client: TokenCakeClient) -> bool:
    try:
        client.call(p.Ping())
        return True
    except DaemonUnavailable:
        return False


def test_stale_segments_of_dead_daemons_only_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    uid = os.getuid()
    stale = tmp_path / f"tokencake-{uid}-gone-{dead_pid}"
    live = tmp_path / f"tokencake-{uid}-alive-{os.getpid()}"
    other = tmp_path / "unrelated-file"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert Arena.remove_stale(str(tmp_path)) == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------------- client SIGKILL

_VICTIM = textwrap.dedent(
    """
    import sys, time, numpy as np
    from tokencake import protocol as p
    from tokencake.clients.client import TokenCakeClient
    from tokencake.clients.kv_arena import ArenaMapping
    from tokencake.layout import KvLayout
    layout = KvLayout("fault-model", 1, 16, 1, 16, "float16", 1024)
    c = TokenCakeClient(sys.argv[1])
    reg = c.call(p.RegisterEngine("victim", layout))
    m = ArenaMapping.open(reg.arena_name, reg.slot_bytes)
    done = [bytes([1, i]) for i in range(4)]
    s = c.call(p.Reserve(reg.engine_id, done)).slots
    m.write_blocks(s, np.ones((4, 1024), np.uint8))
    c.call(p.Commit(reg.engine_id, s))
    c.call(p.LoadBegin(reg.engine_id, done))                           # mid-read
    w = c.call(p.Reserve(reg.engine_id, [bytes([2, i]) for i in range(4)])).slots
    m.write_blocks(w[:2], np.ones((2, 1024), np.uint8))                # mid-write
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_client_killed_mid_write_and_read_loses_its_leases(tmp_path: Path) -> None:
    d = start(tmp_path, "--lease-s", "1.0", env={"TOKENCAKE_ENGINE_TIMEOUT_S": "600"})
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, d.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        with TokenCakeClient(d.endpoint) as c:
            pool = c.call(p.Pool()).pool
            assert (pool.writing, pool.reading) == (4, 4)
            victim.kill()
            victim.wait(10)
            # Others carry on at once, while the victim's slots are still leased.
            other = c.call(p.RegisterEngine("survivor", LAYOUT)).engine_id
            mine = c.call(p.Reserve(other, [b"s1", b"s2"])).slots
            c.call(p.Commit(other, mine))
            _until(
                lambda: (c.call(p.Pool()).pool.writing, c.call(p.Pool()).pool.reading) == (0, 0),
                what="lease reclaim",
            )
            # Its committed blocks stay (complete, servable); its half-written ones are gone.
            assert c.call(p.Lookup(other, [bytes([1, i]) for i in range(4)])).hit_blocks == 4
            assert c.call(p.Lookup(other, [bytes([2, i]) for i in range(4)])).hit_blocks == 0
            assert c.call(p.Lookup(other, [b"s1", b"s2"])).hit_blocks == 2
            assert c.call(p.Stats()).pool.free == c.call(p.Pool()).pool.num_slots - 6
    finally:
        victim.kill()
        victim.wait()
        assert d.stop() == 0
    assert "expired" in d.log()


# ---------------------------------------------------------------------- exhaustion


def test_full_arena_gives_a_prefix_then_no_space(tmp_path: Path) -> None:
    d = start(tmp_path, arena="1MiB")
    try:
        with TokenCakeClient(d.endpoint) as c:
            eng = c.call(p.RegisterEngine("big", BIG)).engine_id
            n = c.call(p.Pool()).pool.num_slots
            assert 8 <= n <= 16  # 1 MiB of 64 KiB blocks, less any alignment offset
            first = [uuid.uuid4().bytes for _ in range(n + 4)]
            slots = c.call(p.Reserve(eng, first)).slots
            assert len(slots) == n  # a prefix: the pool was short
            before = c.call(p.Pool())
            with pytest.raises(RemoteError) as info:
                c.call(p.Reserve(eng, [b"more"]))
            assert info.value.code == ErrorCode.NO_SPACE
            assert c.call(p.Pool()) == before
            # Committed blocks can be evicted for new ones; pinned ones cannot.
            c.call(p.Commit(eng, slots))
            c.call(p.LoadBegin(eng, first[:n]))
            with pytest.raises(RemoteError) as info:
                c.call(p.Reserve(eng, [b"more"]))
            assert info.value.code == ErrorCode.NO_SPACE
            c.call(p.LoadEnd(eng, slots))
            assert c.call(p.Reserve(eng, [b"more"])).slots[0] >= 0
            assert c.call(p.Pool()).pool.evictions == 1
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("where", ["missing_dir", "not_a_dir", "too_big"])
def test_no_shared_memory_is_a_clear_startup_error(tmp_path: Path, where: str) -> None:
    args: list[str] = []
    env: dict[str, str] = {}
    if where == "missing_dir":
        env["TOKENCAKE_ARENA_DIR"] = str(tmp_path / "no-such-dir")
    elif where == "not_a_dir":
        (tmp_path / "file").write_text("")
        env["TOKENCAKE_ARENA_DIR"] = str(tmp_path / "file")
    arena = "16MiB"
    if where == "too_big":
        st = os.statvfs(SHM_DIR)
        arena = str(st.f_bavail * st.f_frsize + (1 << 30))
    before = set(os.listdir(SHM_DIR))
    d = spawn_daemon(tmp_path, *args, env=env, arena=arena)
    assert wait_exit(d) == 1, d.log()
    log = d.log()
    assert "cannot start" in log and "arena" in log, log
    assert "Traceback" not in log
    if where == "too_big":
        assert "does not fit" in log
    assert not any(d.instance in name for name in set(os.listdir(SHM_DIR)) - before)


# ---------------------------------------------------------------------- misbehaving peers


def test_slow_consumer_does_not_block_the_daemon(tmp_path: Path) -> None:
    d = start(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    slow = ctx.socket(zmq.DEALER)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.connect(d.endpoint)
    try:
        with TokenCakeClient(d.endpoint, timeout_s=2.0) as c:
            c.call(p.RegisterApp("big", p.AppDag(nodes=[p.DagNode(f"n{i}") for i in range(200)])))
            frame = p.encode_request(p.ListAgents(), 1)  # ~20 KB per reply
            sent = 0
            t_end = time.monotonic() + 3.0
            worst = 0.0
            while time.monotonic() < t_end:
                for _ in range(200):
                    try:
                        slow.send(frame, zmq.NOBLOCK)
                        sent += 1
                    except zmq.Again:
                        break
                t0 = time.monotonic()
                c.call(p.Ping())  # raises DaemonUnavailable if the daemon were stuck
                worst = max(worst, time.monotonic() - t0)
            assert sent > 1000
            assert worst < 1.0
            assert c.call(p.Stats()).events["list_agents"] > 500
    finally:
        slow.close()
        assert d.stop() == 0


def test_half_a_multipart_message_and_a_half_greeting(tmp_path: Path) -> None:
    d = start(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    try:
        # A peer that sends the first part of a multipart message and disconnects: libzmq
        # delivers whole messages only, so the daemon sees nothing.
        half = ctx.socket(zmq.DEALER)
        half.setsockopt(zmq.LINGER, 0)
        half.connect(d.endpoint)
        half.send(p.encode_request(p.Ping(), 1), zmq.SNDMORE)
        time.sleep(0.2)
        half.close()
        # A raw socket that stops in the middle of the ZMTP greeting and just sits there.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(d.endpoint[len("ipc://") :])
        raw.sendall(b"\xff\x00\x00\x00\x00")
        # A three-part message gets a typed error.
        bad = ctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(d.endpoint)
        bad.send_multipart([b"a", b"b", b"c"])
        assert bad.poll(5000)
        reply = p.decode_reply_envelope(bad.recv())
        assert reply.error is not None and reply.error.code == ErrorCode.BAD_FRAME
        bad.close()
        with TokenCakeClient(d.endpoint) as c:
            for _ in range(20):
                c.call(p.Ping())
            assert c.call(p.Stats()).events.get("ping", 0) >= 20
        raw.close()
    finally:
        assert d.stop() == 0


# ---------------------------------------------------------------------- time


def test_wall_clock_jumps_do_not_touch_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases run on the daemon's monotonic clock: stepping the wall clock a day forward
    or back neither expires nor extends them."""
    ipd = InProcessDaemon(tmp_path, lease_s=5.0)
    try:
        ipd.seed()
        eng = ipd.engine_id("eng")
        store = ipd.daemon.store
        assert store is not None
        writing = store.stats().writing
        assert writing >= 1
        real_time = time.time
        for jump in (86400.0, -86400.0, 10 * 365 * 86400.0):
            monkeypatch.setattr(time, "time", lambda j=jump: real_time() + j)
            ipd.daemon._housekeeping()
            assert store.stats().writing == writing
        monkeypatch.setattr(time, "time", real_time)
        # Only the monotonic clock moves them.
        ipd.clock.advance(4.9)
        ipd.daemon._housekeeping()
        assert store.stats().writing == writing
        ipd.ok(p.EngineHeartbeat(eng))  # renews to now + 5 s
        ipd.clock.advance(5.1)
        ipd.daemon._housekeeping()
        assert store.stats().writing == 0
    finally:
        ipd.close()


def test_daemon_clocks_are_monotonic() -> None:
    """No lease, timeout or timer in the daemon reads the wall clock."""
    offences = []
    for path in sorted((REPO / "daemon").glob("*.py")):
        name = path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr)
                in {("time", "time"), ("time", "time_ns"), ("datetime", "now")}
            ):
                offences.append(f"{name}:{node.lineno}")
    assert not offences, offences
    from tokencake.daemon.server import Daemon

    kwdefaults = Daemon.__init__.__kwdefaults__ or {}
    assert kwdefaults["clock"] is time.monotonic
    store = HostStore(4, 64, clock=time.monotonic)
    assert store._clock is time.monotonic
