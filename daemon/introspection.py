"""Read-only views of the daemon for ``tokencake-ctl`` and the metrics gauges.

Nothing here changes state; each view is built from the registries and the store as they
are when the request arrives.
"""

from __future__ import annotations

from tokencake import PROTOCOL_VERSION, __version__
from tokencake import protocol as p
from tokencake.daemon.agent_service import DecisionLog
from tokencake.daemon.kv_service import KvService
from tokencake.daemon.parts import DaemonParts

POOL_STATES = ("free", "writing", "ready", "reading")


class Introspection:
    def __init__(self, parts: DaemonParts, kv: KvService, decisions: DecisionLog) -> None:
        self._parts = parts
        self._started = parts.clock()
        self._kv = kv
        self._decisions = decisions
        self._evictions_reported = 0

    def refresh_gauges(self) -> None:
        if self._kv.store is None:
            return
        pool = self._kv.pool_stats()
        for state in POOL_STATES:
            self._parts.metrics.pool_slots.labels(state).set(getattr(pool, state))
        self._parts.metrics.evictions.inc(pool.evictions - self._evictions_reported)
        self._evictions_reported = pool.evictions

    def ping(self, _identity: bytes, _req: p.Ping) -> p.PingReply:
        return p.PingReply(__version__, PROTOCOL_VERSION, self._parts.clock() - self._started)

    def stats(self, _identity: bytes, _req: p.Stats) -> p.StatsReply:
        kv = self._kv
        return p.StatsReply(
            uptime_s=self._parts.clock() - self._started,
            pool=kv.pool_stats(),
            engines=len(self._parts.engines),
            apps=sum(1 for a in self._parts.apps.apps() if not a.ended),
            agents=self._parts.apps.num_agents(),
            bytes_offloaded=kv.bytes_offloaded,
            bytes_uploaded=kv.bytes_uploaded,
            events=dict(self._parts.metrics.event_counts),
            errors=dict(self._parts.metrics.error_counts),
            decisions=self._decisions.seq,
            l2=kv.l2.stats() if kv.l2 is not None else {},
            early_tool_ends=dict(self._parts.metrics.early_tool_ends),
        )

    def list_engines(self, _identity: bytes, _req: p.ListEngines) -> p.ListEnginesReply:
        now = self._parts.clock()
        usage = self._kv.store.leases_by_owner() if self._kv.store is not None else {}
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
                for e in self._parts.engines.by_id.values()
            ]
        )

    def list_agents(self, _identity: bytes, req: p.ListAgents) -> p.ListAgentsReply:
        apps = [self._parts.apps.app(req.app_id)] if req.app_id else self._parts.apps.apps()
        now = self._parts.clock()
        out: list[p.AgentInfo] = []
        for app in apps:
            for agent in app.agents.values():
                view = self._parts.scheduler.agent_view(agent)
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
                        app_lead_s=view.app_lead_s,
                    )
                )
        return p.ListAgentsReply(agents=out)

    def list_apps(self, _identity: bytes, _req: p.ListApps) -> p.ListAppsReply:
        now = self._parts.clock()
        return p.ListAppsReply(
            apps=[
                p.AppInfo(
                    app_id=app.app_id,
                    tenant=app.tenant,
                    state="ended" if app.ended else "live",
                    nodes=len(app.dag.nodes),
                    edges=list(app.dag.edges),
                    node_states={a.agent_id: a.state for a in app.agents.values()},
                    critical_path=self._parts.scheduler.critical_path(app.app_id),
                    age_s=now - app.registered_at,
                )
                for app in self._parts.apps.apps()
            ]
        )

    def pool(self, _identity: bytes, _req: p.Pool) -> p.PoolReply:
        store = self._kv.store
        by_owner = store.usage_by_owner() if store is not None else {}
        owners = self._parts.engines.by_owner
        by_engine = {
            (owners[o].engine_id if o in owners else f"owner{o}"): n for o, n in by_owner.items()
        }
        by_tenant = store.usage_by_tenant() if store is not None else {}
        return p.PoolReply(pool=self._kv.pool_stats(), by_engine=by_engine, by_tenant=by_tenant)

    def get_config(self, _identity: bytes, _req: p.GetConfig) -> p.ConfigReply:
        cfg = self._parts.config().to_dict()
        if cfg.get("curve_secret_key_file"):
            cfg["curve_secret_key_file"] = "<set>"
        if "@" in cfg.get("l2_url", ""):
            cfg["l2_url"] = "<set, with credentials>"
        return p.ConfigReply(config=cfg)

    def list_decisions(self, _identity: bytes, req: p.ListDecisions) -> p.ListDecisionsReply:
        """The latest ``req.limit`` decisions kept (of ``req.agent_id`` when set), oldest first."""
        picked: list[p.DecisionRecord] = []
        for decision in reversed(self._decisions.records):
            if req.agent_id and decision.agent_id != req.agent_id:
                continue
            picked.append(decision)
            if len(picked) >= req.limit:
                break
        picked.reverse()
        return p.ListDecisionsReply(decisions=picked)
