"""An in-process tokencaked for fuzzing, and the frame generators both the tests and
``bench/bench_fuzz.py`` use.

``InProcessDaemon`` is a real :class:`Daemon` with a real (small, unprefaulted) arena file
and a fake socket that records pushes, driven through ``handle_frame`` exactly as the event
loop drives it. ``check_case`` runs one frame and enforces the protocol's promises: exactly
one reply, a reply that decodes, the request id echoed, a typed error code that is never
``internal``, and, for a failed request, daemon state exactly as before.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import uuid
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from tokencake import PROTOCOL_VERSION
from tokencake import protocol as p
from tokencake.daemon.agent_service import AgentRecord
from tokencake.daemon.arena import Arena
from tokencake.daemon.config import DaemonConfig
from tokencake.daemon.server import Daemon, EngineRecord
from tokencake.layout import KvLayout

from .typed_values import OP_FIELD_TYPES, TypedValues

LAYOUT = KvLayout("fuzz-model", 1, 16, 1, 16, "float16", 4096)
OTHER_LAYOUT = KvLayout("fuzz-other", 1, 16, 1, 16, "float16", 4096)
DAG = p.AppDag(
    nodes=[p.DagNode("plan", expected_tool_s=3.0), p.DagNode("code"), p.DagNode("test")],
    edges=[("plan", "code"), ("code", "test")],
)
IDENTITY = b"\x00fuzz-peer"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSocket:
    """Stands in for the ROUTER: records what the daemon pushes."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(frames)
        if len(self.sent) > 10000:
            del self.sent[:5000]

    def close(self, linger: int = 0) -> None:
        pass


class InProcessDaemon:
    """A Daemon without its event loop: arena in ``directory``, fake socket, fake clock."""

    def __init__(
        self, directory: Path, *, arena_bytes: int = 1 << 20, lease_s: float = 30.0
    ) -> None:
        instance = "fz" + uuid.uuid4().hex[:10]
        self.clock = FakeClock()
        config = DaemonConfig(
            endpoint=f"ipc://{directory}/unused.sock",
            arena_bytes=arena_bytes,
            arena_dir=str(directory),
            instance=instance,
            lease_s=lease_s,
            metrics_port=0,
        )
        self.daemon = Daemon(config, clock=self.clock)
        self.daemon.arena = Arena.create(
            arena_bytes, instance=instance, directory=str(directory), prefault_pages=False
        )
        self.sock = FakeSocket()
        self.daemon.transport.sock = self.sock  # type: ignore[assignment]
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.daemon.transport.sock = None
        if self.daemon.arena is not None:
            self.daemon.arena.close()
            self.daemon.arena = None

    def call(self, req: p.Request, identity: bytes = IDENTITY) -> p.ReplyEnvelope:
        frame = p.encode_request(req, next(self._ids))
        return p.decode_reply_envelope(self.daemon.handle_frame(identity, frame))

    def ok(self, req: p.Request, identity: bytes = IDENTITY) -> Any:
        env = self.call(req, identity)
        return p.decode_reply_body(env, req)

    def seed_recorded(self) -> list[bytes]:
        """``seed`` this daemon and return the frames that did it, to replay elsewhere."""
        recorded: list[bytes] = []
        original = self.daemon.handle_frame

        def recording(identity: bytes, frame: bytes) -> bytes:
            recorded.append(frame)
            return original(identity, frame)

        self.daemon.handle_frame = recording  # type: ignore[method-assign]
        try:
            self.seed()
        finally:
            self.daemon.handle_frame = original  # type: ignore[method-assign]
        return recorded

    def seed(self) -> None:
        """Engines, an app, and slots in every state, so ops have something to hit."""
        d = self.daemon
        if not any(e.name == "eng" for e in d.engines.by_id.values()):
            self.ok(p.RegisterEngine("eng", LAYOUT, 64))
        if not any(e.name == "other" for e in d.engines.by_id.values()):
            self.ok(p.RegisterEngine("other", OTHER_LAYOUT, 64), identity=b"\x00other")
        app = d.apps._apps.get("app")
        if app is None or app.ended:
            self.ok(p.RegisterApp("app", DAG, tenant="t1"))
        eng = self.engine_id("eng")
        if d.store is not None and d.store.stats().ready < 4:
            hashes = [uuid.uuid4().bytes for _ in range(4)]
            slots = self.ok(p.Reserve(eng, hashes, "t1", "app", "plan")).slots
            self.ok(p.Commit(eng, [s for s in slots if s >= 0]))
            self.ok(p.LoadBegin(eng, hashes[:1], "t1"))
            self.ok(p.Reserve(eng, [uuid.uuid4().bytes], "t1"))

    def engine_id(self, name: str) -> str:
        for e in self.daemon.engines.by_id.values():
            if e.name == name:
                return e.engine_id
        return f"{name}#0"

    def state(self) -> dict[str, Any]:
        """Everything a failed request must leave as it was.

        Left out: request/error counters, and an engine's ``last_seen`` (any request from
        an engine, even a refused one, proves it alive).
        """
        d = self.daemon
        sched = d.scheduler
        agents = []
        for app in d.apps.apps():
            for a in app.agents.values():
                view = sched.agent_view(a)
                agents.append(
                    (
                        tuple(getattr(a, f) for f in _AGENT_FIELDS),
                        (view.priority, view.on_critical_path, view.host_blocks),
                    )
                )
        return {
            "store": d.store.snapshot() if d.store is not None else None,
            "engines": {
                k: tuple(
                    dict(v) if isinstance(v, dict) else v
                    for f in _ENGINE_FIELDS
                    if f != "last_seen"
                    for v in (getattr(e, f),)
                )
                for k, e in d.engines.by_id.items()
            },
            "by_owner": sorted(d.engines.by_owner),
            "by_name": sorted((k, v.engine_id) for k, v in d.engines.by_name.items()),
            "next_owner": d.engines.next_owner,
            "apps": [
                (a.app_id, a.tenant, a.ended, msgspec.to_builtins(a.dag)) for a in d.apps.apps()
            ],
            "agents": agents,
            "critical_paths": {a.app_id: sched.critical_path(a.app_id) for a in d.apps.apps()},
            "sched_apps": sorted(sched._apps),
            "sched_engines": sorted(sched._policies),
            "tags": dict(sched._tags),
            "next_tag": sched._next_tag,
            "decisions": (
                len(d.decisions.records),
                d.decisions.records[-1].seq if d.decisions.records else 0,
            ),
            "decision_seq": d.decisions.seq,
            "bytes": (d.kv.bytes_offloaded, d.kv.bytes_uploaded),
            "pushes": len(self.sock.sent),
        }


_ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineRecord)]
_AGENT_FIELDS = [f.name for f in dataclasses.fields(AgentRecord)]


class CaseFailure(AssertionError):
    """A frame that broke a promise; the message says which."""


@dataclasses.dataclass
class CaseResult:
    ok: bool
    code: str


_envelope = msgspec.msgpack.Decoder(p.Envelope)


def check_case(ipd: InProcessDaemon, frame: bytes, *, compare_state: bool = True) -> CaseResult:
    """Run one frame through ``handle_frame`` and check every promise about the reply."""
    before = ipd.state() if compare_state else None
    try:
        reply = ipd.daemon.handle_frame(IDENTITY, frame)
    except BaseException as exc:
        raise CaseFailure(f"handle_frame raised {exc!r}") from exc
    if not isinstance(reply, bytes):
        raise CaseFailure(f"handle_frame returned {type(reply)}")
    try:
        env = p.decode_reply_envelope(reply)
    except p.RemoteError as exc:
        raise CaseFailure(f"undecodable reply {reply[:80]!r}") from exc
    if env.v != PROTOCOL_VERSION:
        raise CaseFailure(f"reply version {env.v}")
    try:
        req = _envelope.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        req = None
    if req is not None and len(frame) <= ipd.daemon.config.max_frame_bytes and env.id != req.id:
        raise CaseFailure(f"reply id {env.id} for request id {req.id}")
    if env.ok:
        if env.error is not None:
            raise CaseFailure("ok reply with an error body")
        if ipd.daemon.store is not None:
            ipd.daemon.store.check_invariants()
        return CaseResult(True, "")
    if env.error is None:
        raise CaseFailure("error reply without an error body")
    code = env.error.code
    if code not in p.ErrorCode.ALL:
        raise CaseFailure(f"untyped error code {code!r}")
    if code == p.ErrorCode.INTERNAL:
        raise CaseFailure(f"internal error: {env.error.message} for {frame[:200]!r}")
    if before is not None:
        after = ipd.state()
        if after != before:
            changed = sorted(k for k in before if before[k] != after.get(k))
            raise CaseFailure(f"failed {env.op} ({code}) changed {changed}: {frame[:200]!r}")
    return CaseResult(False, code)


# ---------------------------------------------------------------------- generators

_OPS = [*p.REQUEST_TYPES, "", "nope", "LOOKUP", "decision", "x" * 300]
_FIELDS = sorted(
    {f.name for cls in p.REQUEST_TYPES.values() for f in msgspec.structs.fields(cls)}
    | {"pad", "v", "op", "id"}
)
_OP_FIELDS = {
    op: [f.name for f in msgspec.structs.fields(cls)] for op, cls in p.REQUEST_TYPES.items()
}
_INT_FIELDS = frozenset(
    {
        "num_gpu_blocks",
        "num_gpu_blocks_free",
        "num_waiting",
        "num_running",
        "prompt_tokens",
        "output_tokens",
        "kv_blocks",
        "limit",
    }
)
_MEANINGFUL = frozenset({"hashes", "slots", "layout", "dag", "predicted_s", "ok", *_INT_FIELDS})
_FLOATS = [0.0, -0.0, 1.5, -1.0, math.nan, math.inf, -math.inf, 1e308, 7 * 86400.0, 1e-300]
_INTS = [0, 1, -1, 2, 63, 64, 255, 1023, 1024, 65536, 2**31 - 1, 2**31, -(2**31)]
_INTS += [2**63 - 1, -(2**63)]


class FrameGen:
    """Structure-aware and byte-level fuzz frames from a seeded ``random.Random``.

    Structure-aware frames are envelopes whose ops are real and whose bodies mix valid
    values (live engine ids, stored hashes, owned slots) with wrong types, out-of-range
    numbers, oversized lists and unknown keys. Byte-level frames mutate encoded valid
    requests (bit flips, truncation, insertion, splicing) or are raw random bytes.
    """

    def __init__(self, rng: random.Random, ipd: InProcessDaemon) -> None:
        self.rng = rng
        self.ipd = ipd
        self.typed = TypedValues(rng)

    # -- values

    def name(self) -> Any:
        r = self.rng
        d = self.ipd.daemon
        pool: list[Any] = ["", "app", "plan", "code", "test", "ghost", "t1", "t2", "x" * 257]
        pool += [*d.engines.by_id, "eng#999", "é", "\x00"]
        choice = r.choice(pool)
        return choice if r.random() < 0.9 else self.junk()

    def hashes(self) -> Any:
        r = self.rng
        store = self.ipd.daemon.store
        known: list[bytes] = []
        if store is not None and r.random() < 0.6:
            t = store._t
            for s in r.sample(range(t.num_slots), min(8, t.num_slots)):
                if t.m_key_len[s]:
                    known.append(t.key_of(s))
        kind = r.random()
        if kind < 0.5:
            out = known + [r.randbytes(r.randint(1, 64)) for _ in range(r.randint(0, 4))]
            r.shuffle(out)
            return out
        if kind < 0.6:
            return [b""]
        if kind < 0.7:
            return [b"x" * 65]
        if kind < 0.75:
            return [b"dup", b"dup"]
        if kind < 0.8:
            return [b"h"] * (p.MAX_HASHES_PER_REQUEST + 1)
        if kind < 0.9:
            return [r.choice(["str", 1, None, 2.5, [b"a"]]) for _ in range(r.randint(1, 3))]
        return self.junk()

    def slots(self) -> Any:
        r = self.rng
        store = self.ipd.daemon.store
        n = store.num_slots if store is not None else 1024
        live: list[int] = []
        for e in self.ipd.daemon.engines.by_id.values():
            live += list(e.stores) + list(e.loads)
        kind = r.random()
        if kind < 0.5 and live:
            return r.sample(live, r.randint(1, min(4, len(live))))
        if kind < 0.8:
            return [r.choice([*_INTS, n - 1, n, r.randrange(n)]) for _ in range(r.randint(0, 4))]
        if kind < 0.9:
            s = r.randrange(n)
            return [s, s]
        return self.junk()

    def junk(self) -> Any:
        r = self.rng
        kind = r.randrange(9)
        if kind == 0:
            return r.choice(_INTS)
        if kind == 1:
            return r.choice(_FLOATS)
        if kind == 2:
            return r.randbytes(r.randint(0, 16))
        if kind == 3:
            return "".join(chr(r.randint(1, 0x2FFF)) for _ in range(r.randint(0, 8)))
        if kind == 4:
            return None
        if kind == 5:
            return r.choice([True, False])
        if kind == 6:
            return [self.junk() for _ in range(r.randint(0, 3))] if r.random() < 0.5 else []
        if kind == 7:
            return {str(self.junk()): self.junk() for _ in range(r.randint(0, 2))}
        return {}

    def layout(self) -> Any:
        r = self.rng
        base = msgspec.to_builtins(r.choice([LAYOUT, OTHER_LAYOUT]))
        for _ in range(r.randint(0, 3)):
            key = r.choice([*base, "extra"])
            base[key] = r.choice([self.junk(), r.choice(_INTS), "float13", 0, 1 << 40])
        return base if r.random() < 0.95 else self.junk()

    def dag(self) -> Any:
        r = self.rng
        ids = [r.choice(["a", "b", "c", "plan", "", "x" * 300]) for _ in range(r.randint(0, 4))]
        nodes: list[Any] = []
        for i in ids:
            node: dict[str, Any] = {"id": i}
            if r.random() < 0.5:
                node[r.choice(["importance", "expected_llm_s", "expected_tool_s"])] = r.choice(
                    _FLOATS
                )
            if r.random() < 0.1:
                node["bogus"] = 1
            nodes.append(node)
        edges = [[r.choice([*ids, "zz"]), r.choice([*ids, "zz"])] for _ in range(r.randint(0, 4))]
        out: dict[str, Any] = {"nodes": nodes, "edges": edges}
        return out if r.random() < 0.9 else self.junk()

    def field_value(self, field: str) -> Any:
        r = self.rng
        if r.random() < 0.1:
            return self.junk()
        if field == "hashes":
            return self.hashes()
        if field == "slots":
            return self.slots()
        if field == "layout":
            return self.layout()
        if field == "dag":
            return self.dag()
        if field in ("predicted_s",):
            return r.choice([*_FLOATS, None, 2.0])
        if field in ("ok",):
            return r.choice([True, False, 1, "yes"])
        if field in _INT_FIELDS:
            return r.choice(_INTS)
        return self.name()

    # -- frames

    def body(self, op: str) -> dict[str, Any]:
        r = self.rng
        names = _OP_FIELDS.get(op, [])
        types = OP_FIELD_TYPES.get(op, {})
        body: dict[str, Any] = {}
        for f in names:
            if r.random() < 0.9:
                # Fields this generator knows the meaning of get live values most of the
                # time; every field gets values from its declared type and bounds too.
                known = f in _MEANINGFUL or isinstance(types.get(f), mi.StrType)
                if known and r.random() < 0.75:
                    body[f] = self.field_value(f)
                else:
                    body[f] = self.typed.value(types[f])
        if r.random() < 0.15:
            body[r.choice(_FIELDS)] = self.junk()
        return body

    def structured(self) -> bytes:
        r = self.rng
        op = r.choice(_OPS) if r.random() < 0.1 else r.choice(list(p.REQUEST_TYPES))
        env: dict[Any, Any] = {
            "v": 1 if r.random() < 0.93 else r.choice([0, 2, -1, "1", 1.0, None]),
            "op": op if r.random() < 0.97 else self.junk(),
            "id": r.randint(1, 2**31) if r.random() < 0.9 else r.choice([*_INTS, "7", None]),
            "body": self.body(op) if r.random() < 0.95 else self.junk(),
        }
        if r.random() < 0.05:
            del env[r.choice(list(env))]
        if r.random() < 0.05:
            env[r.choice(["extra", 1, b"k"])] = self.junk()
        try:
            return msgspec.msgpack.encode(env)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError):
            return msgspec.msgpack.encode({"v": 1, "op": op, "id": 1, "body": {}})

    def valid(self) -> bytes:
        """A well-formed request for a random op (mutation seeds)."""
        r = self.rng
        eng = self.ipd.engine_id("eng")
        drawn = self.hashes() if r.random() < 0.3 else [r.randbytes(8)]
        hashes = drawn if isinstance(drawn, list) else []
        reqs: list[p.Request] = [
            p.Ping(),
            p.Lookup(eng, [h for h in hashes if isinstance(h, bytes) and h][:4] or [b"a"], "t1"),
            p.Reserve(eng, [r.randbytes(8)], "t1", "app", "plan"),
            p.Commit(eng, [0]),
            p.LoadBegin(eng, [b"a"], "t1"),
            p.LlmCallStart("app", "plan", eng, "r", 10),
            p.ToolCallStart("app", "code", "search", 2.0, "c"),
            p.RegisterApp("app2", DAG),
            p.Stats(),
            p.ListDecisions(5, "plan"),
            p.EngineHeartbeat(eng, 3, 1, 1),
        ]
        if r.random() < 0.5:
            return p.encode_request(r.choice(reqs), r.randint(1, 1000))
        # A well-typed request of any op of the protocol, with live names where they fit.
        op = r.choice(list(p.REQUEST_TYPES))
        body = {f: self.typed.valid(t) for f, t in OP_FIELD_TYPES[op].items()}
        live = {"engine_id": eng, "app_id": "app", "agent_id": "plan", "salt": "t1"}
        body.update({k: v for k, v in live.items() if k in body})
        return msgspec.msgpack.encode({"v": 1, "op": op, "id": r.randint(1, 1000), "body": body})

    def mutated(self) -> bytes:
        r = self.rng
        data = bytearray(self.valid() if r.random() < 0.7 else self.structured())
        for _ in range(r.randint(1, 4)):
            kind = r.randrange(6)
            if kind == 0 and data:
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
            elif kind == 1 and data:
                data[r.randrange(len(data))] = r.randrange(256)
            elif kind == 2:
                data[r.randint(0, len(data)) :] = b""
            elif kind == 3:
                i = r.randint(0, len(data))
                data[i:i] = r.randbytes(r.randint(1, 8))
            elif kind == 4 and len(data) > 2:
                i, j = sorted(r.sample(range(len(data)), 2))
                data[i:i] = data[i:j]
            else:
                i = r.randint(0, len(data))
                nested = r.choice([b"\x91", b"\x81\xa1k"]) * r.choice([64, 5000])
                odd = [b"\xc1", b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", nested]
                data[i:i] = r.choice(odd)
        return bytes(data)

    def raw(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 64))

    def frame(self) -> tuple[str, bytes]:
        x = self.rng.random()
        if x < 0.6:
            return "structured", self.structured()
        if x < 0.9:
            return "mutated", self.mutated()
        return "raw", self.raw()
