"""tokencaked's event loop: one thread owns the store, the registry and the scheduler.

The loop blocks in ``recv`` on a ZMQ ROUTER socket, with a timeout set by its timers; signal
handlers only set flags that the loop reads between messages. Each request is decoded,
validated and handled to completion before the next; handlers either succeed or raise
``ProtocolError`` before changing anything, so a bad request leaves the daemon as it was.
Nothing here copies KV bytes: engines copy through the shared-memory arena, and the frames
carry slot numbers.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import signal
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import zmq

from tokencake import PROTOCOL_VERSION, __version__
from tokencake import protocol as p
from tokencake.daemon.apps import AgentState, AppRegistry
from tokencake.daemon.arena import SLOT_BASE_OFFSET, Arena, slot_count
from tokencake.daemon.auth import AuthError
from tokencake.daemon.config import RELOADABLE_KEYS, ConfigError, DaemonConfig, load_config
from tokencake.daemon.host_store import HostStore
from tokencake.daemon.l2 import L2StartError, open_l2
from tokencake.daemon.metrics import DaemonMetrics
from tokencake.daemon.scheduling import SchedulerBridge
from tokencake.daemon.sd_notify import SystemdNotifier
from tokencake.layout import LayoutError
from tokencake.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from tokencake.daemon.l2.bridge import L2Bridge

logger = logging.getLogger(__name__)

Handler = Callable[[bytes, Any], msgspec.Struct]

HOUSEKEEPING_S = 0.5
MAX_BATCH = 512
SIGNAL_LATENCY_MS = 100
L2_POLL_S = 0.002  # how often finished L2 prefetches are looked for while any is in flight


@dataclass(slots=True)
class EngineRecord:
    engine_id: str
    owner: int
    name: str
    identity: bytes
    layout: Any
    fingerprint: str
    layout_id: int
    num_gpu_blocks: int
    last_seen: float
    num_gpu_blocks_free: int = -1
    num_waiting: int = 0
    num_running: int = 0
    # slot -> (start time, app id, agent id) of this engine's unfinished stores and loads
    stores: dict[int, tuple[float, str, str]] = field(default_factory=dict)
    loads: dict[int, tuple[float, str, str]] = field(default_factory=dict)


class DaemonError(RuntimeError):
    """The daemon cannot start (socket in use, no shared memory, bad config)."""


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        config_path: Path | None = None,
        flag_overrides: dict[str, Any] | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._config_path = config_path
        self._flag_overrides = dict(flag_overrides or {})
        self._notifier = notifier or SystemdNotifier()
        self._started = clock()
        self.metrics = DaemonMetrics()
        self.apps = AppRegistry()
        self.engines: dict[str, EngineRecord] = {}
        self._engines_by_owner: dict[int, EngineRecord] = {}
        self._engines_by_name: dict[str, EngineRecord] = {}
        self._next_owner = 1
        self.arena: Arena | None = None
        self.store: HostStore | None = None
        self.l2: L2Bridge | None = None
        self._l2_polling = False
        self.scheduler = SchedulerBridge(config.policy, clock=clock)
        self.decisions: deque[p.DecisionRecord] = deque(maxlen=max(1, config.decision_history))
        self._decision_seq = 0
        self.bytes_offloaded = 0
        self._evictions_reported = 0
        self.bytes_uploaded = 0
        self.event_counts = self.metrics.event_counts
        self.error_counts = self.metrics.error_counts
        self._stop = False
        self._reload = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._auth: Any = None  # the ZAP handler (a ThreadAuthenticator) of a TCP endpoint
        self._handlers: dict[str, Handler] = {
            "ping": self._ping,
            "register_engine": self._register_engine,
            "engine_heartbeat": self._engine_heartbeat,
            "unregister_engine": self._unregister_engine,
            "register_app": self._register_app,
            "llm_call_start": self._llm_call_start,
            "llm_call_admitted": self._llm_call_admitted,
            "llm_call_finish": self._llm_call_finish,
            "tool_call_start": self._tool_call_start,
            "tool_call_end": self._tool_call_end,
            "app_end": self._app_end,
            "lookup": self._lookup,
            "reserve": self._reserve,
            "commit": self._commit,
            "abort": self._abort,
            "load_begin": self._load_begin,
            "load_end": self._load_end,
            "drop": self._drop,
            "stats": self._stats,
            "list_engines": self._list_engines,
            "list_agents": self._list_agents,
            "list_apps": self._list_apps,
            "pool": self._pool,
            "get_config": self._get_config,
            "list_decisions": self._list_decisions,
        }
        missing = set(p.REQUEST_TYPES) - set(self._handlers)
        assert not missing, f"ops without handlers: {missing}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the arena, bind the socket, start metrics. Raises DaemonError."""
        cfg = self.config
        # A live daemon on our socket is found before the arena is created and pre-faulted
        # (a second or more for 1 GiB); _bind_socket checks again, for a race.
        path = cfg.socket_path
        if path is not None and path.exists() and _socket_in_use(path):
            raise DaemonError(f"another daemon is serving {path}")
        removed = Arena.remove_stale(cfg.arena_dir)
        if removed:
            logger.warning(
                "removed stale shared memory from dead daemons", extra={"names": removed}
            )
        try:
            self.arena = Arena.create(
                cfg.arena_bytes, instance=cfg.instance, directory=cfg.arena_dir
            )
        except OSError as exc:
            raise DaemonError(f"cannot create the {cfg.arena_bytes}-byte arena: {exc}") from exc
        if cfg.l2_backend:
            try:
                self.l2 = open_l2(cfg, self.metrics.registry)
            except L2StartError as exc:
                self.close()
                raise DaemonError(str(exc)) from exc
        if cfg.slot_bytes:
            self._format_store(cfg.slot_bytes)
        try:
            self._bind()
            self.metrics.serve(cfg.metrics_port)
        except (OSError, zmq.ZMQError, DaemonError, AuthError) as exc:
            self.close()
            raise DaemonError(str(exc)) from exc
        self.metrics.pool_bytes.set(cfg.arena_bytes)
        self._install_signals()
        self._schedule(HOUSEKEEPING_S, self._housekeeping)
        if self._notifier.watchdog_interval_s:
            self._schedule(self._notifier.watchdog_interval_s, self._watchdog)
        logger.info(
            "tokencaked ready",
            extra={
                "endpoint": cfg.endpoint,
                "arena": self.arena.name,
                "arena_bytes": cfg.arena_bytes,
                "policy": self.scheduler.policy_name,
                "pid": os.getpid(),
            },
        )
        self._notifier.notify(f"READY=1\nSTATUS=serving on {cfg.endpoint}\nMAINPID={os.getpid()}")

    def _bind(self) -> None:
        cfg = self.config
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Hard cap well above the soft limit: a peer past it is cut off by libzmq, one between
        # the two gets a typed frame_too_large reply.
        sock.setsockopt(zmq.MAXMSGSIZE, max(cfg.max_frame_bytes * 4, 16 << 20))
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        try:
            if cfg.endpoint.startswith("tcp://"):
                from tokencake.daemon.auth import configure_curve_server, start_authenticator

                configure_curve_server(sock, Path(cfg.curve_secret_key_file))
                self._auth = start_authenticator(self._ctx, Path(cfg.curve_authorized_keys_dir))
            self._bind_socket(sock)
        except BaseException:
            sock.close(linger=0)  # else the context's term() would wait on it forever
            raise
        self._sock = sock

    def _bind_socket(self, sock: zmq.Socket[Any]) -> None:
        cfg = self.config
        path = cfg.socket_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.exists():
                if _socket_in_use(path):
                    raise DaemonError(f"another daemon is serving {path}")
                path.unlink()
            old_umask = os.umask(0o177)
            try:
                sock.bind(cfg.endpoint)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
        else:
            sock.bind(cfg.endpoint)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def request_stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or ``request_stop``; always cleans up.

        The loop blocks in ``recv`` on the ROUTER socket itself (a zmq poller costs a
        measurable share of a round trip), with a receive timeout that is the time to the
        next timer, capped at ``SIGNAL_LATENCY_MS``: signal handlers only set flags, and the
        loop looks at them at least that often.
        """
        sock = self._sock
        assert sock is not None
        current_timeout = -2
        try:
            while not self._stop:
                timeout_ms = min(self._run_due_timers(), SIGNAL_LATENCY_MS)
                if self._reload:
                    self._reload = False
                    self.reload()
                if timeout_ms != current_timeout:
                    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
                    current_timeout = timeout_ms
                try:
                    frames = sock.recv_multipart()
                except zmq.Again:
                    continue
                self._serve(frames)
                # Drain what is already queued before looking at timers again.
                for _ in range(MAX_BATCH):
                    events = sock.get(zmq.EVENTS)
                    if not (isinstance(events, int) and events & zmq.POLLIN):
                        break
                    self._serve(sock.recv_multipart(zmq.NOBLOCK))
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent shutdown: STOPPING=1, socket closed and removed, arena unlinked."""
        if self._notifier.enabled:
            self._notifier.notify("STOPPING=1")
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            path = self.config.socket_path
            if path is not None:
                path.unlink(missing_ok=True)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.l2 is not None:
            self.l2.close()  # drops its arena view first
            self.l2 = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        self.metrics.close()
        self._notifier.close()
        logger.info("tokencaked stopped")

    def reload(self) -> None:
        """SIGHUP: re-read file and environment; apply only the keys safe to change live."""
        try:
            fresh = load_config(self._config_path, flags=self._flag_overrides)
        except ConfigError as exc:
            logger.error("reload refused, keeping the running config", extra={"error": str(exc)})
            return
        old = self.config.to_dict()
        new = fresh.to_dict()
        applied = {k: new[k] for k in RELOADABLE_KEYS if old[k] != new[k]}
        ignored = sorted(k for k in new if k not in RELOADABLE_KEYS and old[k] != new[k])
        if applied:
            self.config = self.config.with_overrides(applied)
            logging.getLogger().setLevel(self.config.log_level)
            if "decision_history" in applied:
                self.decisions = deque(self.decisions, maxlen=max(1, self.config.decision_history))
            if "policy" in applied:
                self.scheduler.switch_policy(self.config.policy)
        logger.info("config reloaded", extra={"applied": applied, "ignored_need_restart": ignored})

    # ------------------------------------------------------------------ timers

    def _schedule(self, delay_s: float, fn: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (self._clock() + delay_s, self._timer_seq, fn))

    def _run_due_timers(self) -> int:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                logger.exception("timer failed")
            now = self._clock()
        if not self._timers:
            return 1000
        return max(0, min(1000, int((self._timers[0][0] - now) * 1000) + 1))

    def _housekeeping(self) -> None:
        now = self._clock()
        if self.store is not None:
            expired = self.store.expire_leases()
            if expired:
                logger.warning("reclaimed expired leases", extra={"slots": expired})
        for engine in list(self.engines.values()):
            if now - engine.last_seen > self.config.engine_timeout_s:
                logger.warning(
                    "engine timed out",
                    extra={"engine_id": engine.engine_id, "engine_name": engine.name},
                )
                self._drop_engine(engine)
        self._apply_decisions(self.scheduler.tick(now))
        self._refresh_gauges()
        self._schedule(HOUSEKEEPING_S, self._housekeeping)

    def _watchdog(self) -> None:
        self._notifier.notify("WATCHDOG=1")
        assert self._notifier.watchdog_interval_s
        self._schedule(self._notifier.watchdog_interval_s, self._watchdog)

    def _serve(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            # A DEALER sends [payload]; the ROUTER prepends the identity.
            self._send(
                frames[0],
                p.encode_error(
                    "?", 0, ErrorCode.BAD_FRAME, f"expected one frame, got {len(frames) - 1}"
                ),
            )
            self._count_error(ErrorCode.BAD_FRAME)
            return
        identity, frame = frames
        self._send(identity, self.handle_frame(identity, frame))

    def handle_frame(self, identity: bytes, frame: bytes) -> bytes:
        """One request frame in, one reply frame out. Never raises."""
        op = "?"
        request_id = 0
        try:
            if len(frame) > self.config.max_frame_bytes:
                request_id, op = _peek_ids(frame)
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"{len(frame)} bytes over the {self.config.max_frame_bytes}-byte limit",
                )
            try:
                request_id, op, body = p.decode_request(frame)
            except ProtocolError as exc:
                request_id = getattr(exc, "request_id", 0)
                op = getattr(exc, "op", "?")
                raise
            except UnicodeDecodeError as exc:
                # msgspec raises this, not DecodeError, for a str that is not UTF-8.
                request_id, op = _peek_ids(frame)
                code = ErrorCode.BAD_FRAME if op == "?" else ErrorCode.BAD_REQUEST
                raise ProtocolError(code, f"invalid UTF-8: {exc.reason}") from None
            counts = self.event_counts
            counts[op] = counts.get(op, 0) + 1
            reply = self._handlers[op](identity, body)
            return p.encode_reply(op, request_id, reply)
        except ProtocolError as exc:
            self._count_error(exc.code)
            return p.encode_error(op[:64], request_id, exc.code, exc.message)
        except Exception as exc:  # a bug must cost one request, never the daemon
            logger.exception("internal error handling %s", op)
            self._count_error(ErrorCode.INTERNAL)
            return p.encode_error(op[:64], request_id, ErrorCode.INTERNAL, type(exc).__name__)

    def _count_error(self, code: str) -> None:
        self.error_counts[code] = self.error_counts.get(code, 0) + 1

    def _send(self, identity: bytes, frame: bytes) -> bool:
        if self._sock is None:  # not serving (in-process use by tests and tools)
            return False
        try:
            self._sock.send_multipart([identity, frame], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer left; EAGAIN: it does not read. Neither may block us.
            logger.debug("reply to %r dropped: %s", identity, exc)
            return False

    # ------------------------------------------------------------------ engines

    def _format_store(self, slot_bytes: int) -> None:
        assert self.arena is not None
        num_slots = slot_count(self.arena.size, slot_bytes)
        if num_slots < 1:
            raise ProtocolError(ErrorCode.LAYOUT_REJECTED, "a block is larger than the arena")
        self.store = HostStore(
            num_slots,
            slot_bytes,
            clock=self._clock,
            lease_s=self.config.lease_s,
            eviction=self.scheduler.eviction_policy(),
            on_evict=self.l2.on_evict if self.l2 is not None else None,
        )
        if self.l2 is not None:
            self.l2.attach(self.store, self.arena.slots(slot_bytes))
        logger.info("arena formatted", extra={"slot_bytes": slot_bytes, "num_slots": num_slots})

    def _engine(self, engine_id: str) -> EngineRecord:
        engine = self.engines.get(engine_id)
        if engine is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_ENGINE, f"no engine {engine_id[:64]!r}; register first"
            )
        engine.last_seen = self._clock()
        return engine

    def _ping(self, _identity: bytes, _req: p.Ping) -> p.PingReply:
        return p.PingReply(__version__, PROTOCOL_VERSION, self._clock() - self._started)

    def _register_engine(self, identity: bytes, req: p.RegisterEngine) -> p.RegisterEngineReply:
        try:
            req.layout.validate()
        except LayoutError as exc:
            raise ProtocolError(ErrorCode.LAYOUT_REJECTED, str(exc)) from None
        if not req.name or len(req.name) > p.MAX_NAME_CHARS or req.num_gpu_blocks < 0:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "name must be 1..256 chars, num_gpu_blocks >= 0"
            )
        if self.store is None:
            self._format_store(req.layout.bytes_per_block)
        assert self.store is not None and self.arena is not None
        fingerprint = req.layout.fingerprint()
        layout_id = self.store.register_layout(fingerprint, req.layout.bytes_per_block)
        previous = self._engines_by_name.get(req.name)
        if previous is not None:
            logger.info(
                "engine re-registered; releasing its old leases", extra={"engine_name": req.name}
            )
            self._drop_engine(previous)
        owner = self._next_owner
        self._next_owner += 1
        engine_id = f"{req.name}#{owner}"
        record = EngineRecord(
            engine_id=engine_id,
            owner=owner,
            name=req.name,
            identity=identity,
            layout=req.layout,
            fingerprint=fingerprint,
            layout_id=layout_id,
            num_gpu_blocks=req.num_gpu_blocks,
            last_seen=self._clock(),
        )
        self.engines[engine_id] = record
        self._engines_by_owner[owner] = record
        self._engines_by_name[req.name] = record
        self.scheduler.engine_registered(
            engine_id, req.num_gpu_blocks, req.layout.bytes_per_block, self.store.num_slots
        )
        self.metrics.engines.set(len(self.engines))
        logger.info(
            "engine registered",
            extra={
                "engine_id": engine_id,
                "fingerprint": fingerprint,
                "model": req.layout.model_id,
            },
        )
        return p.RegisterEngineReply(
            engine_id=engine_id,
            fingerprint=fingerprint,
            arena_name=self.arena.name,
            arena_bytes=self.arena.size,
            slot_bytes=self.store.slot_bytes,
            slot_offset=SLOT_BASE_OFFSET,
            num_slots=self.store.num_slots,
            lease_s=self.config.lease_s,
            heartbeat_s=min(self.config.lease_s, self.config.engine_timeout_s) / 3,
        )

    def _drop_engine(self, engine: EngineRecord) -> int:
        released = self.store.release_owner(engine.owner) if self.store is not None else 0
        self.engines.pop(engine.engine_id, None)
        self._engines_by_owner.pop(engine.owner, None)
        if self._engines_by_name.get(engine.name) is engine:
            del self._engines_by_name[engine.name]
        self.scheduler.engine_gone(engine.engine_id)
        self.metrics.engines.set(len(self.engines))
        return released

    def _engine_heartbeat(self, _identity: bytes, req: p.EngineHeartbeat) -> p.EngineHeartbeatReply:
        engine = self._engine(req.engine_id)
        if (
            req.num_waiting < 0
            or req.num_running < 0
            or req.num_gpu_blocks_free < -1
            or req.waiting_blocks < 0
        ):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "negative engine state")
        engine.num_gpu_blocks_free = req.num_gpu_blocks_free
        engine.num_waiting = req.num_waiting
        engine.num_running = req.num_running
        assert self.store is not None
        renewed = self.store.renew_leases(engine.owner)
        self._apply_decisions(
            self.scheduler.engine_state(
                engine.engine_id,
                engine.num_gpu_blocks,
                req.num_gpu_blocks_free,
                req.num_waiting,
                req.num_running,
                self.store.num_slots,
                self.store.stats().free,
                req.waiting_blocks,
            )
        )
        return p.EngineHeartbeatReply(leases_renewed=renewed)

    def _unregister_engine(
        self, _identity: bytes, req: p.UnregisterEngine
    ) -> p.UnregisterEngineReply:
        engine = self._engine(req.engine_id)
        return p.UnregisterEngineReply(released_slots=self._drop_engine(engine))

    # ------------------------------------------------------------------ agent events

    def _register_app(self, _identity: bytes, req: p.RegisterApp) -> p.EventAck:
        if len(req.tenant) > p.MAX_NAME_CHARS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "tenant longer than 256 chars")
        record, created = self.apps.register(req.app_id, req.dag, req.tenant, self._clock())
        if created:
            self.metrics.apps.set(len(self.apps))
            return self._ack(self.scheduler.app_registered(record))
        return p.EventAck(accepted=True)

    def _llm_call_start(self, _identity: bytes, req: p.LlmCallStart) -> p.EventAck:
        agent = self.apps.agent(req.app_id, req.agent_id)
        if req.engine_id and req.engine_id not in self.engines:
            raise ProtocolError(ErrorCode.UNKNOWN_ENGINE, f"no engine {req.engine_id[:64]!r}")
        if req.prompt_tokens < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "prompt_tokens must be >= 0")
        if agent.state == AgentState.LLM:
            return p.EventAck(accepted=False)
        agent.state, agent.state_since = AgentState.LLM, self._clock()
        agent.llm_calls += 1
        agent.admitted = False
        if req.engine_id:
            agent.engine_id = req.engine_id
        return self._ack(self.scheduler.llm_call_start(agent, req.request_id, req.prompt_tokens))

    def _llm_call_admitted(self, _identity: bytes, req: p.LlmCallAdmitted) -> p.EventAck:
        agent = self.apps.agent(req.app_id, req.agent_id)
        if req.kv_blocks < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "kv_blocks must be >= 0")
        if agent.state != AgentState.LLM or agent.admitted:
            return p.EventAck(accepted=False)
        agent.admitted = True
        agent.kv_blocks = req.kv_blocks
        return self._ack(self.scheduler.llm_call_admitted(agent, req.request_id, req.kv_blocks))

    def _llm_call_finish(self, _identity: bytes, req: p.LlmCallFinish) -> p.EventAck:
        agent = self.apps.agent(req.app_id, req.agent_id)
        if req.output_tokens < 0 or req.kv_blocks < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "output_tokens and kv_blocks must be >= 0")
        if agent.state != AgentState.LLM:
            return p.EventAck(accepted=False)
        agent.state, agent.state_since = AgentState.IDLE, self._clock()
        agent.kv_blocks = req.kv_blocks
        return self._ack(
            self.scheduler.llm_call_finish(agent, req.request_id, req.output_tokens, req.kv_blocks)
        )

    def _tool_call_start(self, _identity: bytes, req: p.ToolCallStart) -> p.EventAck:
        agent = self.apps.agent(req.app_id, req.agent_id)
        if req.predicted_s is not None and not 0 <= req.predicted_s <= 7 * 86400:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "predicted_s must be within 0..7 days")
        if not req.tool_kind or len(req.tool_kind) > p.MAX_NAME_CHARS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "tool_kind must be 1..256 chars")
        if agent.state == AgentState.TOOL:
            return p.EventAck(accepted=False)
        agent.state, agent.state_since = AgentState.TOOL, self._clock()
        agent.tool_calls += 1
        agent.tool_kind, agent.tool_call_id = req.tool_kind, req.call_id
        agent.tool_predicted_s = req.predicted_s
        return self._ack(
            self.scheduler.tool_call_start(agent, req.tool_kind, req.predicted_s, req.call_id)
        )

    def _tool_call_end(self, _identity: bytes, req: p.ToolCallEnd) -> p.EventAck:
        agent = self.apps.agent(req.app_id, req.agent_id)
        if agent.state != AgentState.TOOL or (req.call_id and req.call_id != agent.tool_call_id):
            return p.EventAck(accepted=False)
        agent.state, agent.state_since = AgentState.IDLE, self._clock()
        return self._ack(self.scheduler.tool_call_end(agent, req.call_id, req.ok))

    def _app_end(self, _identity: bytes, req: p.AppEnd) -> p.EventAck:
        record = self.apps.end(req.app_id, self._clock())
        self.metrics.apps.set(len(self.apps))
        return self._ack(self.scheduler.app_end(record))

    def _ack(self, decisions: list[p.DecisionRecord]) -> p.EventAck:
        self._apply_decisions(decisions)
        return p.EventAck(accepted=True, decisions=len(decisions))

    def _apply_decisions(self, decisions: list[p.DecisionRecord]) -> None:
        """Keep each decision for introspection and push it to the engine it concerns."""
        for decision in decisions:
            self._decision_seq += 1
            decision.seq = self._decision_seq
            self.decisions.append(decision)
            self.metrics.decisions.labels(decision.kind).inc()
            if self.l2 is not None and decision.kind == "upload":
                self._l2_upload(decision.app_id, decision.agent_id)
            engine = self.engines.get(decision.engine_id)
            if engine is not None and decision.kind in self.scheduler.PUSHED_KINDS:
                self._send(engine.identity, p.encode_push(p.DECISION_PUSH_OP, decision))

    # ------------------------------------------------------------------ KV ops

    def _store_for(self, engine_id: str) -> tuple[EngineRecord, HostStore]:
        engine = self._engine(engine_id)
        assert self.store is not None  # formatted by the first registration
        return engine, self.store

    def _lookup(self, _identity: bytes, req: p.Lookup) -> p.LookupReply:
        engine, store = self._store_for(req.engine_id)
        slots = store.lookup(engine.layout_id, _salt(req.salt), _hashes(req.hashes))
        if self.l2 is not None and len(slots) < len(req.hashes):
            self._l2_missed(engine.layout_id, req.salt, req.hashes[len(slots) :])
        self.metrics.lookups.labels("hit").inc(len(slots))
        self.metrics.lookups.labels("miss").inc(len(req.hashes) - len(slots))
        return p.LookupReply(hit_blocks=len(slots), slots=slots)

    def _reserve(self, _identity: bytes, req: p.Reserve) -> p.ReserveReply:
        engine, store = self._store_for(req.engine_id)
        app_id, agent_id = self._attribution(req.app_id, req.agent_id)
        tag = self.scheduler.agent_tag(app_id, agent_id)
        hashes = _hashes(req.hashes)
        slots = store.reserve(engine.owner, engine.layout_id, _salt(req.salt), hashes, tag)
        if self.l2 is not None and app_id and slots:
            self.l2.remember(app_id, agent_id, engine.layout_id, req.salt, hashes[: len(slots)])
        started = (self._clock(), app_id, agent_id)
        for slot in slots:
            if slot >= 0:
                engine.stores[slot] = started
        present = sum(1 for slot in slots if slot < 0)
        if app_id and present:
            # Already on the host (an earlier save): for this agent's offload those blocks
            # arrived at once. Without this the scheduler would wait for them forever.
            self._apply_decisions(
                self.scheduler.transfer_done(engine.engine_id, app_id, agent_id, "d2h", present)
            )
        return p.ReserveReply(slots=slots)

    def _commit(self, _identity: bytes, req: p.Commit) -> p.CommitReply:
        engine, store = self._store_for(req.engine_id)
        committed = store.commit(engine.owner, req.slots)
        if self.l2 is not None:
            self.l2.committed(list(req.slots))
        self._transfer_finished(engine, engine.stores, req.slots, committed, "d2h", req.copy_s)
        return p.CommitReply(committed=committed)

    def _abort(self, _identity: bytes, req: p.Abort) -> p.AbortReply:
        engine, store = self._store_for(req.engine_id)
        aborted = store.abort(engine.owner, req.slots)
        for slot in req.slots:
            engine.stores.pop(slot, None)
        return p.AbortReply(aborted=aborted)

    def _load_begin(self, _identity: bytes, req: p.LoadBegin) -> p.LoadBeginReply:
        engine, store = self._store_for(req.engine_id)
        app_id, agent_id = self._attribution(req.app_id, req.agent_id)
        hashes = _hashes(req.hashes)
        slots = store.begin_load(engine.owner, engine.layout_id, _salt(req.salt), hashes)
        if self.l2 is not None and len(slots) < len(hashes):
            self._l2_missed(engine.layout_id, req.salt, hashes[len(slots) :])
        started = (self._clock(), app_id, agent_id)
        for slot in slots:
            engine.loads.setdefault(slot, started)
        return p.LoadBeginReply(slots=slots)

    def _load_end(self, _identity: bytes, req: p.LoadEnd) -> p.LoadEndReply:
        engine, store = self._store_for(req.engine_id)
        released = store.end_load(engine.owner, req.slots)
        self._transfer_finished(engine, engine.loads, req.slots, released, "h2d", req.copy_s)
        return p.LoadEndReply(released=released)

    def _l2_missed(self, layout: int, salt: str, hashes: list[bytes]) -> None:
        """Ask L2 for the blocks the host lacks."""
        assert self.l2 is not None
        self._l2_watch(self.l2.missed(layout, salt, hashes))

    def _l2_upload(self, app_id: str, agent_id: str) -> None:
        """An upload needs the agent's KV in the arena: bring back what went to L2."""
        assert self.l2 is not None
        self._l2_watch(self.l2.upload(app_id, agent_id))

    def _l2_watch(self, queued: bool) -> None:
        """Poll for finished prefetches while any is in flight."""
        if queued and not self._l2_polling:
            self._l2_polling = True
            self._schedule(L2_POLL_S, self._l2_poll)

    def _l2_poll(self) -> None:
        assert self.l2 is not None
        try:
            self.l2.poll()
        finally:
            if self.l2.busy:
                self._schedule(L2_POLL_S, self._l2_poll)
            else:
                self._l2_polling = False

    def _attribution(self, app_id: str, agent_id: str) -> tuple[str, str]:
        """The agent a KV op names, if it is live. Attribution is optional: blocks of an app
        that just ended are still stored, only not accounted to an agent."""
        if not app_id:
            return "", ""
        try:
            self.apps.agent(app_id, agent_id)
        except ProtocolError:
            return "", ""
        return app_id, agent_id

    def _transfer_finished(
        self,
        engine: EngineRecord,
        pending: dict[int, tuple[float, str, str]],
        slots: list[int],
        done: int,
        direction: Literal["d2h", "h2d"],
        copy_s: float = -1.0,
    ) -> None:
        """Account bytes, measure the copy, and tell the scheduler whose KV moved.

        The cost model learns from ``copy_s``, the engine's own measure of the copy, when it
        sent one (finite and positive); otherwise from the time since the reservation, an
        upper bound that includes the engine's wait for its next step.
        """
        now = self._clock()
        nbytes = done * engine.layout.bytes_per_block
        label = "offload" if direction == "d2h" else "upload"
        if direction == "d2h":
            self.bytes_offloaded += nbytes
        else:
            self.bytes_uploaded += nbytes
        self.metrics.bytes_moved.labels(label).inc(nbytes)
        per_agent: dict[tuple[str, str], int] = {}
        first = now
        for slot in slots:
            started_at, app_id, agent_id = pending.pop(slot, (now, "", ""))
            first = min(first, started_at)
            if app_id:
                per_agent[(app_id, agent_id)] = per_agent.get((app_id, agent_id), 0) + 1
        if not slots:
            return
        elapsed = now - first
        if math.isfinite(copy_s) and copy_s > 0:
            elapsed = min(copy_s, elapsed) if elapsed > 0 else copy_s
        self.metrics.transfer_seconds.labels(label).observe(elapsed)
        self.scheduler.transfer_measured(engine.engine_id, direction, nbytes, elapsed, len(slots))
        for (app_id, agent_id), blocks in per_agent.items():
            self._apply_decisions(
                self.scheduler.transfer_done(engine.engine_id, app_id, agent_id, direction, blocks)
            )

    def _drop(self, _identity: bytes, req: p.Drop) -> p.DropReply:
        engine, store = self._store_for(req.engine_id)
        return p.DropReply(
            dropped=store.drop(engine.layout_id, _salt(req.salt), _hashes(req.hashes))
        )

    # ------------------------------------------------------------------ introspection

    def _pool_stats(self) -> p.PoolStats:
        assert self.arena is not None
        if self.store is None:
            return p.PoolStats(self.arena.name, self.arena.size, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        s = self.store.stats()
        return p.PoolStats(
            arena_name=self.arena.name,
            arena_bytes=self.arena.size,
            slot_bytes=s.slot_bytes,
            num_slots=s.num_slots,
            free=s.free,
            writing=s.writing,
            ready=s.ready,
            reading=s.reading,
            evictions=s.evictions,
            hits=s.hits,
            misses=s.misses,
        )

    def _refresh_gauges(self) -> None:
        if self.store is None:
            return
        pool = self._pool_stats()
        for state in ("free", "writing", "ready", "reading"):
            self.metrics.pool_slots.labels(state).set(getattr(pool, state))
        self.metrics.evictions.inc(pool.evictions - self._evictions_reported)
        self._evictions_reported = pool.evictions

    def _stats(self, _identity: bytes, _req: p.Stats) -> p.StatsReply:
        return p.StatsReply(
            uptime_s=self._clock() - self._started,
            pool=self._pool_stats(),
            engines=len(self.engines),
            apps=sum(1 for a in self.apps.apps() if not a.ended),
            agents=self.apps.num_agents(),
            bytes_offloaded=self.bytes_offloaded,
            bytes_uploaded=self.bytes_uploaded,
            events=dict(self.event_counts),
            errors=dict(self.error_counts),
            decisions=self._decision_seq,
            l2=self.l2.stats() if self.l2 is not None else {},
        )

    def _list_engines(self, _identity: bytes, _req: p.ListEngines) -> p.ListEnginesReply:
        now = self._clock()
        usage = self.store.leases_by_owner() if self.store is not None else {}
        return p.ListEnginesReply(
            engines=[
                p.EngineInfo(
                    engine_id=e.engine_id,
                    name=e.name,
                    fingerprint=e.fingerprint,
                    layout=e.layout,
                    num_gpu_blocks=e.num_gpu_blocks,
                    num_gpu_blocks_free=e.num_gpu_blocks_free,
                    num_waiting=e.num_waiting,
                    num_running=e.num_running,
                    leased_slots=usage.get(e.owner, 0),
                    last_seen_s_ago=now - e.last_seen,
                )
                for e in self.engines.values()
            ]
        )

    def _list_agents(self, _identity: bytes, req: p.ListAgents) -> p.ListAgentsReply:
        apps = [self.apps.app(req.app_id)] if req.app_id else self.apps.apps()
        now = self._clock()
        out: list[p.AgentInfo] = []
        for app in apps:
            for agent in app.agents.values():
                view = self.scheduler.agent_view(agent)
                out.append(
                    p.AgentInfo(
                        app_id=agent.app_id,
                        agent_id=agent.agent_id,
                        agent_type=agent.agent_type,
                        state=agent.state,
                        importance=agent.importance,
                        priority=view.priority,
                        on_critical_path=view.on_critical_path,
                        kv_blocks=agent.kv_blocks,
                        host_blocks=view.host_blocks,
                        tool_kind=agent.tool_kind,
                        tool_predicted_s=agent.tool_predicted_s,
                        state_for_s=now - agent.state_since,
                        protect_blocks=view.protect_blocks,
                        app_age_s=(
                            max(0.0, now - view.app_registered_s)
                            if view.app_registered_s is not None
                            else 0.0
                        ),
                    )
                )
        return p.ListAgentsReply(agents=out)

    def _list_apps(self, _identity: bytes, _req: p.ListApps) -> p.ListAppsReply:
        now = self._clock()
        return p.ListAppsReply(
            apps=[
                p.AppInfo(
                    app_id=app.app_id,
                    tenant=app.tenant,
                    state="ended" if app.ended else "live",
                    nodes=len(app.dag.nodes),
                    edges=list(app.dag.edges),
                    node_states={a.agent_id: a.state for a in app.agents.values()},
                    critical_path=self.scheduler.critical_path(app.app_id),
                    age_s=now - app.registered_at,
                )
                for app in self.apps.apps()
            ]
        )

    def _pool(self, _identity: bytes, _req: p.Pool) -> p.PoolReply:
        by_owner = self.store.usage_by_owner() if self.store is not None else {}
        by_engine = {
            (self._engines_by_owner[o].engine_id if o in self._engines_by_owner else f"owner{o}"): n
            for o, n in by_owner.items()
        }
        by_tenant = self.store.usage_by_tenant() if self.store is not None else {}
        return p.PoolReply(pool=self._pool_stats(), by_engine=by_engine, by_tenant=by_tenant)

    def _get_config(self, _identity: bytes, _req: p.GetConfig) -> p.ConfigReply:
        cfg = self.config.to_dict()
        if cfg.get("curve_secret_key_file"):
            cfg["curve_secret_key_file"] = "<set>"
        if "@" in cfg.get("l2_url", ""):
            cfg["l2_url"] = "<set, with credentials>"
        return p.ConfigReply(config=cfg)

    def _list_decisions(self, _identity: bytes, req: p.ListDecisions) -> p.ListDecisionsReply:
        if not 0 < req.limit <= 10000:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "limit must be within 1..10000")
        picked: list[p.DecisionRecord] = []
        for decision in reversed(self.decisions):
            if req.agent_id and decision.agent_id != req.agent_id:
                continue
            picked.append(decision)
            if len(picked) >= req.limit:
                break
        picked.reverse()
        return p.ListDecisionsReply(decisions=picked)


def _salt(salt: str) -> str:
    if len(salt) > p.MAX_NAME_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "salt longer than 256 chars")
    return salt


def _hashes(hashes: list[bytes]) -> list[bytes]:
    if len(hashes) > p.MAX_HASHES_PER_REQUEST:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"at most {p.MAX_HASHES_PER_REQUEST} hashes per request"
        )
    for h in hashes:
        if not 0 < len(h) <= p.MAX_HASH_BYTES:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"hashes must be 1..{p.MAX_HASH_BYTES} bytes"
            )
    return hashes


def _peek_ids(frame: bytes) -> tuple[int, str]:
    try:
        env = msgspec.msgpack.decode(frame, type=p.Envelope)
        return env.id, env.op
    except (msgspec.DecodeError, UnicodeDecodeError):
        return 0, "?"


def _socket_in_use(path: Path) -> bool:
    """True when a live process accepts connections on the ipc socket file."""
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise DaemonError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
