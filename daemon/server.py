"""tokencaked: one thread owns the store, the registries and the scheduler.

``Daemon`` builds the daemon's parts and runs their loop; each part is a module of its own:
the wire (``transport``), engines (``engines``, ``engine_service``), the KV ops and the pool
(``kv_service``), the apps and agents with their events, the policies they feed and where
decisions go (``agent_service``), read-only views (``introspection``) and the loop's
``timers``. The handler table below binds every request type of the protocol
to the part that serves it.

The loop blocks in ``recv`` on the ROUTER socket, with a timeout set by its timers; signal
handlers only set flags that the loop reads between messages. Nothing here copies KV bytes:
engines copy through the shared-memory arena, and the frames carry slot numbers.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq

from tokencake import protocol as p
from tokencake.daemon.agent_service import AgentService, AppRegistry, DecisionLog, SchedulerBridge
from tokencake.daemon.arena import Arena
from tokencake.daemon.auth import AuthError
from tokencake.daemon.config import RELOADABLE_KEYS, ConfigError, DaemonConfig, load_config
from tokencake.daemon.engine_service import EngineService
from tokencake.daemon.engines import EngineRecord, EngineRegistry
from tokencake.daemon.gpu.handlers import GpuCopyHandlers
from tokencake.daemon.host_store import HostStore
from tokencake.daemon.introspection import Introspection
from tokencake.daemon.kv_service import KvService
from tokencake.daemon.l2 import L2StartError, open_l2
from tokencake.daemon.memwatch import MemoryWatch, container_sizes
from tokencake.daemon.metrics import DaemonMetrics
from tokencake.daemon.parts import DaemonParts
from tokencake.daemon.sd_notify import SystemdNotifier
from tokencake.daemon.timers import Timers
from tokencake.daemon.transport import DaemonError, Dispatcher, Handler, Transport, socket_in_use

__all__ = ["Daemon", "DaemonError", "EngineRecord"]

logger = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.5
SIGNAL_LATENCY_MS = 100


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
        self._stop = False
        self._reload = False
        self._memwatch: MemoryWatch | None = None  # debug_memory_file reports
        self.metrics = DaemonMetrics()
        self.event_counts = self.metrics.event_counts
        self.error_counts = self.metrics.error_counts
        self.timers = Timers(clock)
        self.transport = Transport()
        self.apps = AppRegistry()
        self.engines = EngineRegistry()
        self.scheduler = SchedulerBridge(config.policy, clock=clock)
        cfg = self._current_config
        parts = DaemonParts(
            config=cfg,
            clock=clock,
            metrics=self.metrics,
            engines=self.engines,
            apps=self.apps,
            scheduler=self.scheduler,
            apply=self._apply,
        )
        self.kv = KvService(parts, self.timers)
        self.decisions = DecisionLog(
            config.decision_history,
            metrics=self.metrics,
            engines=self.engines,
            send=self.transport.send,
            on_upload=self.kv.l2_upload,
        )
        self.gpu = GpuCopyHandlers(config=cfg, clock=clock, engines=self.engines, kv=self.kv)
        self.engine_service = EngineService(parts, self.kv, on_leave=self.gpu.engine_gone)
        self.agents = AgentService(parts)
        self.introspection = Introspection(parts, self.kv, self.decisions)
        self.dispatcher = Dispatcher(
            self._handler_table(),
            max_frame_bytes=lambda: self.config.max_frame_bytes,
            event_counts=self.event_counts,
            error_counts=self.error_counts,
        )
        self.dispatcher.send_later = self.transport.send
        self.kv.defer = self.dispatcher.defer  # lookups that wait for L2 answer late

    def _handler_table(self) -> Mapping[type[p.Request], Handler]:
        """Every request type of the protocol, bound to the part that serves it."""
        engines, kv, events, info = (
            self.engine_service,
            self.kv,
            self.agents,
            self.introspection,
        )
        return {
            p.Ping: info.ping,
            p.RegisterEngine: engines.register,
            p.EngineHeartbeat: engines.heartbeat,
            p.UnregisterEngine: engines.unregister,
            p.RegisterApp: events.register_app,
            p.LlmCallStart: events.llm_call_start,
            p.LlmCallAdmitted: events.llm_call_admitted,
            p.LlmCallPreempted: events.llm_call_preempted,
            p.LlmCallFinish: events.llm_call_finish,
            p.ToolCallStart: events.tool_call_start,
            p.ToolCallEnd: events.tool_call_end,
            p.AppEnd: events.app_end,
            p.Lookup: kv.lookup,
            p.Reserve: kv.reserve,
            p.Commit: kv.commit,
            p.Abort: kv.abort,
            p.LoadBegin: kv.load_begin,
            p.LoadEnd: kv.load_end,
            p.Drop: kv.drop,
            p.ShareGpuKv: self.gpu.share,
            p.GpuCopy: self.gpu.copy,
            p.GpuCopyStatus: self.gpu.status,
            p.Stats: info.stats,
            p.ListEngines: info.list_engines,
            p.ListAgents: info.list_agents,
            p.ListApps: info.list_apps,
            p.Pool: info.pool,
            p.GetConfig: info.get_config,
            p.ListDecisions: info.list_decisions,
        }

    def _container_sizes(self) -> dict[str, int]:
        """Lengths of the parts' containers, for ``debug_memory_file`` reports."""
        parts: dict[str, object] = {
            "kv": self.kv,
            "engines": self.engines,
            "apps": self.apps,
            "decisions": self.decisions,
            "scheduler": self.scheduler,
            "timers": self.timers,
        }
        policies = getattr(self.scheduler, "_policies", {})
        parts.update({f"policy{i}": pol for i, pol in enumerate(policies.values())})
        return container_sizes(**parts)

    def _current_config(self) -> DaemonConfig:
        return self.config

    def _apply(self, decisions: list[p.DecisionRecord]) -> None:
        self.decisions.apply(decisions)

    # The pool's parts, as tests and tools reach them.
    @property
    def arena(self) -> Arena | None:
        return self.kv.arena

    @arena.setter
    def arena(self, arena: Arena | None) -> None:
        self.kv.arena = arena

    @property
    def store(self) -> HostStore | None:
        return self.kv.store

    def handle_frame(self, identity: bytes, frame: bytes) -> bytes:
        """One request frame in, one reply frame out. Never raises."""
        return self.dispatcher.handle_frame(identity, frame)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the arena, bind the socket, start metrics. Raises DaemonError."""
        cfg = self.config
        # A live daemon on our socket is found before the arena is created and pre-faulted
        # (a second or more for 1 GiB); the transport checks again, for a race.
        path = cfg.socket_path
        if path is not None and path.exists() and socket_in_use(path):
            raise DaemonError(f"another daemon is serving {path}")
        self._open_pool()
        try:
            self.transport.bind(cfg)
            self.metrics.serve(cfg.metrics_port)
        except (OSError, zmq.ZMQError, DaemonError, AuthError) as exc:
            self.close()
            raise DaemonError(str(exc)) from exc
        self.metrics.pool_bytes.set(cfg.arena_bytes)
        self._install_signals()
        self.timers.schedule(HOUSEKEEPING_S, self._housekeeping)
        if self._notifier.watchdog_interval_s:
            self.timers.schedule(self._notifier.watchdog_interval_s, self._watchdog)
        if cfg.debug_memory_file:
            self._memwatch = MemoryWatch(
                cfg.debug_memory_file, self._container_sizes, trace=cfg.debug_memory_trace
            )
            self._memwatch.start(self.timers, cfg.debug_memory_s)
        assert self.kv.arena is not None
        logger.info(
            "tokencaked ready",
            extra={
                "endpoint": cfg.endpoint,
                "arena": self.kv.arena.name,
                "arena_bytes": cfg.arena_bytes,
                "policy": self.scheduler.policy_name,
                "pid": os.getpid(),
            },
        )
        self._notifier.notify(f"READY=1\nSTATUS=serving on {cfg.endpoint}\nMAINPID={os.getpid()}")

    def _open_pool(self) -> None:
        """The arena (stale ones of dead daemons removed first), the L2 tier, the store."""
        cfg = self.config
        removed = Arena.remove_stale(cfg.arena_dir)
        if removed:
            logger.warning(
                "removed stale shared memory from dead daemons", extra={"names": removed}
            )
        try:
            self.kv.arena = Arena.create(
                cfg.arena_bytes, instance=cfg.instance, directory=cfg.arena_dir
            )
        except OSError as exc:
            raise DaemonError(f"cannot create the {cfg.arena_bytes}-byte arena: {exc}") from exc
        if cfg.l2_backend:
            try:
                self.kv.l2 = open_l2(cfg, self.metrics.registry)
            except L2StartError as exc:
                self.close()
                raise DaemonError(str(exc)) from exc
        if cfg.slot_bytes:
            self.kv.format(cfg.slot_bytes)

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

        The receive timeout is the time to the next timer, capped at ``SIGNAL_LATENCY_MS``:
        signal handlers only set flags, and the loop looks at them at least that often.
        """
        try:
            while not self._stop:
                timeout_ms = min(self.timers.run_due(), SIGNAL_LATENCY_MS)
                if self._reload:
                    self._reload = False
                    self.reload()
                self.transport.serve_once(timeout_ms, self.dispatcher.handle_frames)
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent shutdown: STOPPING=1, socket closed and removed, arena unlinked."""
        if self._notifier.enabled:
            self._notifier.notify("STOPPING=1")
        self.transport.close()
        self.gpu.close()  # copy workers are reaped before the arena goes
        self.kv.close()
        self.metrics.close()
        if self._memwatch is not None:
            self._memwatch.stop()
            self._memwatch = None
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
                self.decisions.resize(self.config.decision_history)
            if "policy" in applied:
                self.scheduler.switch_policy(self.config.policy)
        logger.info("config reloaded", extra={"applied": applied, "ignored_need_restart": ignored})

    # ------------------------------------------------------------------ timers

    def _housekeeping(self) -> None:
        # Next round first: a part that raises is logged (Timers) and housekeeping goes on;
        # were it scheduled last, one exception would end lease expiry for good.
        self.timers.schedule(HOUSEKEEPING_S, self._housekeeping)
        now = self._clock()
        # Copy workers first: one overrunning its copies is reaped before their slots' lease
        # can expire below, so no slot freed here is still being written.
        self.gpu.poll()
        store = self.kv.store
        if store is not None:
            expired = store.expire_leases()
            if expired:
                logger.warning("reclaimed expired leases", extra={"slots": expired})
        self.engine_service.expire_silent(now)
        # Each part reads the clock afresh: the scheduler takes events in time order, and
        # what came before (an engine dropped, an app ended) was told it at a later time.
        self._apply(self.scheduler.tick(self._clock()))
        self.agents.expire_idle(self._clock(), self.config.app_idle_timeout_s)
        self.introspection.refresh_gauges()

    def _watchdog(self) -> None:
        self._notifier.notify("WATCHDOG=1")
        assert self._notifier.watchdog_interval_s
        self.timers.schedule(self._notifier.watchdog_interval_s, self._watchdog)
