"""Security against real processes: CURVE with a client-key allowlist over TCP, private
socket and shared memory with owner checks, no pickle or eval of peer data, and tenant
isolation by salt in the store and through the daemon."""

from __future__ import annotations

import ast
import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from tests.procs import Proc, free_port, spawn_daemon, start, wait_exit, wait_ready
from tokencake import protocol as p
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.daemon.arena import Arena, ArenaError
from tokencake.daemon.host_store import HostStore
from tokencake.layout import KvLayout

LAYOUT = KvLayout("sec-model", 1, 16, 1, 16, "float16", 1024)
REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------- CURVE over TCP


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    keys = tmp_path / "keys"
    allowed = tmp_path / "authorized"
    keys.mkdir(mode=0o700)
    allowed.mkdir(mode=0o700)
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(keys, "known")
    zmq.auth.create_certificates(keys, "stranger")
    for f in keys.iterdir():
        f.chmod(0o600)
    (allowed / "known.key").write_bytes((keys / "known.key").read_bytes())
    return {
        "server_secret": keys / "server.key_secret",
        "server_public": keys / "server.key",
        "known": keys / "known.key_secret",
        "stranger": keys / "stranger.key_secret",
        "allowed": allowed,
    }


def _curve_env(keys: dict[str, Path], allowed: Path | None = None) -> dict[str, str]:
    return {
        "TOKENCAKE_CURVE_SECRET_KEY_FILE": str(keys["server_secret"]),
        "TOKENCAKE_CURVE_AUTHORIZED_KEYS_DIR": str(allowed or keys["allowed"]),
    }


@pytest.fixture
def tcp_daemon(tmp_path: Path, curve_keys: dict[str, Path]) -> Iterator[tuple[Proc, bytes]]:
    server_public, _ = zmq.auth.load_certificate(curve_keys["server_public"])
    d = spawn_daemon(
        tmp_path, endpoint=f"tcp://127.0.0.1:{free_port()}", env=_curve_env(curve_keys)
    )
    wait_ready(
        d,
        lambda: TokenCakeClient(
            d.endpoint,
            timeout_s=0.5,
            server_public_key=server_public,
            client_key_file=str(curve_keys["known"]),
        ),
    )
    yield d, server_public
    assert d.stop() == 0


def test_known_client_key_is_served(
    tcp_daemon: tuple[Proc, bytes], curve_keys: dict[str, Path]
) -> None:
    d, server_public = tcp_daemon
    with TokenCakeClient(
        d.endpoint, server_public_key=server_public, client_key_file=str(curve_keys["known"])
    ) as c:
        assert c.call(p.Ping()).protocol_version == 1
        assert c.call(p.Stats()).engines == 0


def test_unknown_client_key_gets_no_service(
    tcp_daemon: tuple[Proc, bytes], curve_keys: dict[str, Path]
) -> None:
    d, server_public = tcp_daemon
    # A real certificate that is not in the allowlist, and a fresh throwaway key pair.
    for key_file in (str(curve_keys["stranger"]), None):
        with (
            TokenCakeClient(
                d.endpoint, timeout_s=1.0, server_public_key=server_public, client_key_file=key_file
            ) as c,
            pytest.raises(DaemonUnavailable),
        ):
            c.call(p.Ping())
    # No CURVE at all: the handshake never completes, nothing is answered.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(d.endpoint)
    with contextlib.suppress(zmq.Again):
        plain.send(b"\x84\xa1v\x01\xa2op\xa4ping\xa2id\x01\xa4body\x80", zmq.NOBLOCK)
    assert not plain.poll(1000)
    plain.close()
    # The denied peers cost nothing: the known client is still served.
    with TokenCakeClient(
        d.endpoint, server_public_key=server_public, client_key_file=str(curve_keys["known"])
    ) as c:
        assert c.call(p.Stats()).events.get("ping", 0) >= 1


@pytest.mark.parametrize("what", ["empty", "missing", "unset", "world_writable"])
def test_tcp_without_an_allowlist_is_refused(
    tmp_path: Path, curve_keys: dict[str, Path], what: str
) -> None:
    env = _curve_env(curve_keys)
    if what == "empty":
        empty = tmp_path / "empty"
        empty.mkdir(mode=0o700)
        env["TOKENCAKE_CURVE_AUTHORIZED_KEYS_DIR"] = str(empty)
    elif what == "missing":
        env["TOKENCAKE_CURVE_AUTHORIZED_KEYS_DIR"] = str(tmp_path / "nope")
    elif what == "unset":
        del env["TOKENCAKE_CURVE_AUTHORIZED_KEYS_DIR"]
    else:
        curve_keys["allowed"].chmod(0o777)
    d = spawn_daemon(tmp_path, endpoint=f"tcp://127.0.0.1:{free_port()}", env=env)
    rc = wait_exit(d)
    assert rc == (2 if what == "unset" else 1), d.log()
    assert "curve_authorized_keys_dir" in d.log() or "authorized" in d.log(), d.log()
    assert "Traceback" not in d.log()


def test_tcp_without_curve_is_refused(tmp_path: Path) -> None:
    d = spawn_daemon(tmp_path, endpoint=f"tcp://127.0.0.1:{free_port()}")
    assert wait_exit(d) == 2
    assert "curve_secret_key_file" in d.log()


# ---------------------------------------------------------------------- socket and shm


def test_socket_and_segment_are_0600_and_ours(tmp_path: Path) -> None:
    d = start(tmp_path)
    try:
        with TokenCakeClient(d.endpoint) as c:
            reply = c.call(p.RegisterEngine("e", LAYOUT))
        sock = Path(d.endpoint[len("ipc://") :])
        seg = Path("/dev/shm") / reply.arena_name
        for path in (sock, seg):
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600, path
            assert st.st_uid == os.getuid()
        # The engine side maps it after the same checks.
        with ArenaMapping.open(reply.arena_name, reply.slot_bytes) as m:
            assert m.num_slots == reply.num_slots
    finally:
        assert d.stop() == 0


def test_engine_refuses_a_segment_that_is_not_0600(tmp_path: Path) -> None:
    with Arena.create(1 << 20, instance="secmode", directory=str(tmp_path)) as arena:
        os.chmod(arena.path, 0o644)
        with pytest.raises(ArenaError, match="mode 644"):
            ArenaMapping.open(arena.name, 4096, directory=str(tmp_path))
        os.chmod(arena.path, 0o600)
        ArenaMapping.open(arena.name, 4096, directory=str(tmp_path)).close()


def test_engine_refuses_a_segment_owned_by_someone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Arena.create(1 << 20, instance="secowner", directory=str(tmp_path)) as arena:
        if os.getuid() == 0:
            os.chown(arena.path, 4242, -1)
        else:  # cannot give a file away: pretend to be another user instead
            monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 4242)
        with pytest.raises(ArenaError, match="owned by uid"):
            ArenaMapping.open(arena.name, 4096, directory=str(tmp_path))


def test_engine_refuses_a_symlinked_segment(tmp_path: Path) -> None:
    with Arena.create(1 << 20, instance="seclink", directory=str(tmp_path)) as arena:
        link = tmp_path / "tokencake-link"
        link.symlink_to(arena.path)
        with pytest.raises(OSError):
            ArenaMapping.open(link.name, 4096, directory=str(tmp_path))


# ---------------------------------------------------------------------- no pickle / eval

_PRODUCT = ["daemon", "clients", "connectors"]  # tokencake/ links to these
_BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
_BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
_BANNED_ATTRS = {("yaml", "load"), ("yaml", "unsafe_load"), ("numpy", "load"), ("np", "load")}


def _product_sources() -> list[Path]:
    files = {p for p in (REPO / "tokencake").glob("*.py") if not p.is_symlink()}
    for top in _PRODUCT:
        files.update((REPO / top).rglob("*.py"))
    return sorted(files)


def test_no_pickle_or_eval_anywhere_in_the_product() -> None:
    """No code path can unpickle or evaluate bytes: nothing imports a deserialiser that
    runs code, and nothing calls eval/exec. Peer data is decoded by msgspec into typed
    structs only."""
    sources = _product_sources()
    assert len(sources) > 20
    offences: list[str] = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in _BANNED_MODULES:
                        offences.append(f"{where} imports {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                if (node.module or "").split(".")[0] in _BANNED_MODULES:
                    offences.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in _BANNED_CALLS:
                    offences.append(f"{where} calls {fn.id}()")
                if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                    if (fn.value.id, fn.attr) in _BANNED_ATTRS:
                        offences.append(f"{where} calls {fn.value.id}.{fn.attr}()")
                    if fn.attr in {"recv_pyobj", "send_pyobj", "recv_serialized"}:
                        offences.append(f"{where} calls .{fn.attr}()")
                if isinstance(fn, ast.Attribute) and fn.attr in {"recv_pyobj", "send_pyobj"}:
                    offences.append(f"{where} calls .{fn.attr}()")
    assert not offences, "\n".join(offences)


def test_wire_decoding_is_msgspec_typed_only() -> None:
    """Every recv in the daemon and clients is followed by a msgspec decode, never by a
    generic loader."""
    for path in (REPO / "daemon" / "server.py", REPO / "clients" / "client.py"):
        text = path.read_text()
        assert "msgpack.unpackb" not in text and "raw=False" not in text
        assert "decode_reply_envelope" in text or "handle_frame" in text


# ---------------------------------------------------------------------- tenant isolation


def test_store_tenants_are_isolated_even_with_identical_hashes() -> None:
    store = HostStore(64, 1024, clock=lambda: 0.0)
    layout = store.register_layout("fp", 1024)
    hashes = [b"chain-0", b"chain-1", b"chain-2"]
    a = store.reserve(1, layout, "tenant-a", hashes)
    store.commit(1, a)
    assert store.lookup(layout, "tenant-a", hashes) == a
    # B sees nothing of A's, cannot pin it, and cannot drop it.
    assert store.lookup(layout, "tenant-b", hashes) == []
    assert store.begin_load(2, layout, "tenant-b", hashes) == []
    assert store.drop(layout, "tenant-b", hashes) == 0
    assert store.lookup(layout, "", hashes) == []
    # B storing the same hashes gets its own slots; neither overwrites the other.
    b = store.reserve(2, layout, "tenant-b", hashes)
    assert all(s >= 0 for s in b) and not set(a) & set(b)
    store.commit(2, b)
    assert store.lookup(layout, "tenant-a", hashes) == a
    assert store.lookup(layout, "tenant-b", hashes) == b
    # Slots are not capabilities across tenants: B cannot release A's pins or commits.
    pinned = store.begin_load(1, layout, "tenant-a", hashes)
    with pytest.raises(Exception, match="no pin"):
        store.end_load(2, pinned)
    store.end_load(1, pinned)
    store.check_invariants()


def test_daemon_tenants_are_isolated_even_with_identical_hashes(tmp_path: Path) -> None:
    d = start(tmp_path)
    try:
        with TokenCakeClient(d.endpoint) as a_client, TokenCakeClient(d.endpoint) as b_client:
            a = a_client.call(p.RegisterEngine("engine-a", LAYOUT))
            b = b_client.call(p.RegisterEngine("engine-b", LAYOUT))
            assert a.fingerprint == b.fingerprint  # same model: only the salt separates them
            hashes = [uuid.uuid4().bytes for _ in range(4)]
            slots = a_client.call(p.Reserve(a.engine_id, hashes, salt="tenant-a")).slots
            with ArenaMapping.open(a.arena_name, a.slot_bytes) as m:
                m.slots_view()[slots[0], :4] = [1, 2, 3, 4]
            a_client.call(p.Commit(a.engine_id, slots))
            assert a_client.call(p.Lookup(a.engine_id, hashes, salt="tenant-a")).hit_blocks == 4
            # Tenant B, same hashes, same layout: no lookup hit, no load, no drop.
            assert b_client.call(p.Lookup(b.engine_id, hashes, salt="tenant-b")).hit_blocks == 0
            assert b_client.call(p.LoadBegin(b.engine_id, hashes, salt="tenant-b")).slots == []
            assert b_client.call(p.Drop(b.engine_id, hashes, salt="tenant-b")).dropped == 0
            # B's engine cannot unpin or commit A's slots by number either.
            pinned = a_client.call(p.LoadBegin(a.engine_id, hashes, salt="tenant-a")).slots
            with pytest.raises(Exception, match=r"not_owner|no pin"):
                b_client.call(p.LoadEnd(b.engine_id, pinned))
            a_client.call(p.LoadEnd(a.engine_id, pinned))
            by_tenant = a_client.call(p.Pool()).by_tenant
            assert by_tenant == {"tenant-a": 4}
    finally:
        assert d.stop() == 0
