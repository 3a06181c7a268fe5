"""The wire protocol between tokencaked and its peers (connectors, clients, tokencake-ctl).

Every message is one ZMQ frame holding one msgpack map:

    request  {"v": 1, "op": "lookup", "id": 7, "body": {...}}
    one-way  {"v": 1, "op": "tool_call_end", "id": 8, "ack": false, "body": {...}}
    reply    {"v": 1, "op": "lookup", "id": 7, "ok": true,  "body": {...}}
    error    {"v": 1, "op": "lookup", "id": 7, "ok": false,
              "error": {"code": "...", "message": "..."}}
    push     {"v": 1, "op": "decision", "id": 0, "ok": true, "body": {...}}

The daemon binds a ROUTER socket; peers connect DEALER sockets. Bodies are typed structs
below; ``docs/protocol.md`` documents them for clients written without this module.
KV bytes never travel in these frames: they move through the shared-memory arena and the
frames carry slot numbers and chain hashes.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Generic, Literal, TypeVar, get_args

import msgspec

from tokencake import PROTOCOL_VERSION
from tokencake.layout import KvLayout

MAX_HASHES_PER_REQUEST: Final = 65536
MAX_HASH_BYTES: Final = 64
MAX_DAG_NODES: Final = 4096
MAX_NAME_CHARS: Final = 256
MAX_NODE_SECONDS: Final = 7 * 86400.0
"""Upper bound of a DAG node's expected durations and importance, and of a tool hint: a week."""
MAX_LISTED_DECISIONS: Final = 10000

# Constrained field types: the daemon's decoder checks them, so a request out of range is a
# one-line ``bad_request`` that names the field, before any handler runs.
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
RequiredName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Hash = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_HASH_BYTES)]
Hashes = Annotated[list[Hash], msgspec.Meta(max_length=MAX_HASHES_PER_REQUEST)]
Count = Annotated[int, msgspec.Meta(ge=0)]
NodeSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_NODE_SECONDS)]


class ErrorCode:
    """Typed error codes. Every failed request gets exactly one of these."""

    BAD_FRAME: Final = "bad_frame"  # not msgpack, not a map, or missing envelope keys
    BAD_VERSION: Final = "bad_version"
    UNKNOWN_OP: Final = "unknown_op"
    BAD_REQUEST: Final = "bad_request"  # wrong types or values in the body
    FRAME_TOO_LARGE: Final = "frame_too_large"
    UNKNOWN_ENGINE: Final = "unknown_engine"
    UNKNOWN_APP: Final = "unknown_app"
    UNKNOWN_AGENT: Final = "unknown_agent"
    NOT_OWNER: Final = "not_owner"  # slots the sender does not own, or in the wrong state
    NO_SPACE: Final = "no_space"
    LAYOUT_REJECTED: Final = "layout_rejected"
    CONFLICT: Final = "conflict"  # a duplicate registration that does not match the first
    INTERNAL: Final = "internal"

    ALL: ClassVar[tuple[str, ...]] = (
        BAD_FRAME,
        BAD_VERSION,
        UNKNOWN_OP,
        BAD_REQUEST,
        FRAME_TOO_LARGE,
        UNKNOWN_ENGINE,
        UNKNOWN_APP,
        UNKNOWN_AGENT,
        NOT_OWNER,
        NO_SPACE,
        LAYOUT_REJECTED,
        CONFLICT,
        INTERNAL,
    )


class ProtocolError(Exception):
    """An error with a wire code. Raised by handlers, turned into an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(ProtocolError):
    """An error reply, raised on the client side."""


# --------------------------------------------------------------------------- envelope


class Envelope(msgspec.Struct):
    v: int
    op: str
    id: int
    body: msgspec.Raw = msgspec.Raw(b"\x80")
    ack: bool = True
    """False: a one-way request. The daemon replies only when it fails (an error reply
    with its id); success is silent. A later reply to the same peer says it was handled:
    the daemon handles a peer's requests in order."""


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ReplyEnvelope(msgspec.Struct):
    v: int
    op: str
    id: int
    ok: bool
    body: msgspec.Raw = msgspec.Raw(b"\x80")
    error: ErrorBody | None = None


ReplyT = TypeVar("ReplyT", bound=msgspec.Struct)


class Request(msgspec.Struct, Generic[ReplyT], forbid_unknown_fields=False):
    """Base of every request body. ``op`` names it on the wire; the type argument is its
    reply (``class Ping(Request[PingReply])``), kept at run time as ``reply`` for decoding,
    so ``TokenCakeClient.call(Ping())`` is typed ``PingReply``."""

    op: ClassVar[str]
    reply: ClassVar[type[msgspec.Struct]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            args = get_args(base)
            if args and isinstance(args[0], type):
                cls.reply = args[0]


# --------------------------------------------------------------------------- engines


class PingReply(msgspec.Struct):
    daemon_version: str
    protocol_version: int
    uptime_s: float


class Ping(Request[PingReply]):
    op = "ping"


class RegisterEngineReply(msgspec.Struct):
    engine_id: str
    fingerprint: str
    arena_name: str
    arena_bytes: int
    slot_bytes: int
    slot_offset: int
    num_slots: int
    lease_s: float
    heartbeat_s: float


class RegisterEngine(Request[RegisterEngineReply]):
    """An engine (one TP rank of one model) announces its KV layout.

    ``name`` is the engine's stable name; registering the same name again (after a
    restart) replaces the earlier registration and releases its leases.
    """

    op = "register_engine"
    name: RequiredName
    layout: KvLayout
    num_gpu_blocks: Count = 0


class EngineHeartbeatReply(msgspec.Struct):
    leases_renewed: int


class EngineHeartbeat(Request[EngineHeartbeatReply]):
    """Keeps the engine's leases alive and reports its GPU KV state to the scheduler."""

    op = "engine_heartbeat"
    engine_id: str
    num_gpu_blocks_free: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """-1: not reported."""
    num_waiting: Count = 0
    num_running: Count = 0
    waiting_blocks: Count = 0
    """GPU blocks the waiting requests need in all (0: not reported)."""


class UnregisterEngineReply(msgspec.Struct):
    released_slots: int


class UnregisterEngine(Request[UnregisterEngineReply]):
    op = "unregister_engine"
    engine_id: str


# --------------------------------------------------------------------------- agent events


class DagNode(msgspec.Struct, forbid_unknown_fields=True):
    """One agent of an application's DAG.

    ``expected_llm_s`` and ``expected_tool_s`` feed the critical-path computation; zeros
    are allowed and then the daemon's measured history decides.
    """

    id: RequiredName
    agent_type: str = ""
    importance: NodeSeconds = 1.0
    expected_llm_s: NodeSeconds = 0.0
    expected_tool_s: NodeSeconds = 0.0
    tool_kind: str = ""


class AppDag(msgspec.Struct, forbid_unknown_fields=True):
    nodes: Annotated[list[DagNode], msgspec.Meta(min_length=1, max_length=MAX_DAG_NODES)]
    edges: list[tuple[str, str]] = []


class EventAck(msgspec.Struct):
    accepted: bool = True
    decisions: int = 0
    held: bool = False
    """A ``tool_call_end`` that came before its ``tool_call_start`` (they have different
    senders): the daemon keeps it a while, and applies the start, if it comes then, as a
    call that has ended (docs/protocol.md, "Agent events")."""


class RegisterApp(Request[EventAck]):
    op = "register_app"
    app_id: RequiredName
    dag: AppDag
    tenant: Name = ""


class LlmCallStart(Request[EventAck]):
    """An agent's LLM request entered the engine's waiting queue."""

    op = "llm_call_start"
    app_id: str
    agent_id: str
    engine_id: str = ""
    request_id: str = ""
    prompt_tokens: Count = 0
    blocks: Count = 0
    """GPU blocks the request needs to start (its prompt blocks not already cached); 0: the
    scheduler derives them from ``prompt_tokens`` and the engine's block size."""


class LlmCallAdmitted(Request[EventAck]):
    """The engine scheduled the agent's request: it now holds ``kv_blocks`` GPU blocks.

    Optional: without it the daemon infers the admission when the call finishes.
    """

    op = "llm_call_admitted"
    app_id: str
    agent_id: str
    request_id: str = ""
    kv_blocks: Count = 0
    reported: bool = False
    """The engine's pool reports already count these blocks as taken (an admission told
    late, after heartbeats taken while the call ran), so they are not taken twice."""


class LlmCallPreempted(Request[EventAck]):
    """The engine preempted the agent's running request: it waits again, and its blocks are
    back in the engine's free queue (still cached, but the first a new request takes).

    Engines only (vLLM's ``TokenCakeScheduler``), optional.
    """

    op = "llm_call_preempted"
    app_id: str
    agent_id: str
    request_id: str = ""
    blocks_freed: Count = 0
    """The GPU blocks the request held."""
    blocks_cached: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """Of those, how many still hold its KV (a prefix) when this is sent, which a copy to the
    host can save; -1: all of them."""


class LlmCallFinish(Request[EventAck]):
    op = "llm_call_finish"
    app_id: str
    agent_id: str
    request_id: str = ""
    output_tokens: Count = 0
    kv_blocks: Count = 0


class ToolCallStart(Request[EventAck]):
    op = "tool_call_start"
    app_id: str
    agent_id: str
    tool_kind: RequiredName
    predicted_s: NodeSeconds | None = None
    call_id: str = ""


class ToolCallEnd(Request[EventAck]):
    op = "tool_call_end"
    app_id: str
    agent_id: str
    call_id: str = ""
    ok: bool = True


class AppEnd(Request[EventAck]):
    op = "app_end"
    app_id: str


# --------------------------------------------------------------------------- KV ops


class LookupReply(msgspec.Struct):
    hit_blocks: int
    slots: list[int]


class HashesRequest(Request[ReplyT]):
    """Base of the requests about an engine's chained block hashes (``salt``: the tenant's
    namespace, as the connector hashes)."""

    engine_id: str
    hashes: Hashes
    salt: Name = ""


class AgentHashesRequest(HashesRequest[ReplyT]):
    """A hashes request that may name the agent whose KV it moves, so the scheduler can
    account for the copy when it completes."""

    app_id: str = ""
    agent_id: str = ""


class SlotsRequest(Request[ReplyT]):
    """Base of the requests that finish or give back slots the engine holds."""

    engine_id: str
    slots: list[int]


class Lookup(HashesRequest[LookupReply]):
    """Longest ready prefix of ``hashes``. Informational: it pins nothing."""

    op = "lookup"


class ReserveReply(msgspec.Struct):
    """``slots[i]`` is the slot to write ``hashes[i]`` into, or -1 when it is stored already.

    Only a prefix of the hashes may be reserved when the pool is short: ``len(slots)``
    may be below ``len(hashes)``.
    """

    slots: list[int]


class Reserve(AgentHashesRequest[ReserveReply]):
    """Slots to store ``hashes`` into. Naming the agent lets the scheduler account for its
    offload when the slots are committed."""

    op = "reserve"


class CommitReply(msgspec.Struct):
    committed: int


class Commit(SlotsRequest[CommitReply]):
    """The sender has written these reserved slots completely; make them servable."""

    op = "commit"
    copy_s: float = -1.0
    """Seconds the copy itself took, on the engine's clock; negative: not measured (the
    daemon then takes the time since the reservation, waiting included)."""


class AbortReply(msgspec.Struct):
    aborted: int


class Abort(SlotsRequest[AbortReply]):
    """Give back reserved slots that will not be written."""

    op = "abort"


class LoadBeginReply(msgspec.Struct):
    slots: list[int]


class LoadBegin(AgentHashesRequest[LoadBeginReply]):
    """Pin the longest ready prefix of ``hashes`` for reading; it cannot be evicted.

    Naming the agent lets the scheduler account for its upload at ``load_end``."""

    op = "load_begin"


class LoadEndReply(msgspec.Struct):
    released: int


class LoadEnd(SlotsRequest[LoadEndReply]):
    """Release the slots ``load_begin`` pinned: the engine has read them."""

    op = "load_end"
    copy_s: float = -1.0
    """Seconds the copy into the engine took; negative: not measured (see ``Commit``)."""


class DropReply(msgspec.Struct):
    dropped: int


class Drop(HashesRequest[DropReply]):
    """Forget stored blocks. Blocks being read are freed when their readers finish."""

    op = "drop"


# --------------------------------------------------------------------------- GPU data plane


class GpuKvTensor(msgspec.Struct, forbid_unknown_fields=True):
    """One engine KV tensor shared through CUDA IPC (torch's storage sharing: the fields of
    ``torch.multiprocessing.reductions.reduce_tensor``). ``kind`` "fake" is the CPU stand-in
    the tests use (docs/vllm.md)."""

    kind: Literal["cuda", "fake"]
    device_uuid: str
    handle: bytes
    storage_bytes: int
    storage_offset_bytes: int
    dtype: str
    shape: list[int]
    stride: list[int]
    offset: int
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False


class ShareGpuKvReply(msgspec.Struct):
    worker_pid: int
    deadline_s: float
    """No copy of the worker runs longer; once the daemon is gone, a block lent to it is
    free again after this long, or as soon as ``worker_pid`` has exited."""


class ShareGpuKv(Request[ShareGpuKvReply]):
    """The engine's GPU KV tensors, for the daemon's copy worker on that GPU to open.
    Sharing again replaces the earlier tensors; a copy in flight on them fails."""

    op = "share_gpu_kv"
    engine_id: str
    num_blocks: int
    tensors: list[GpuKvTensor]


class GpuCopyReply(msgspec.Struct):
    copy_id: int


class GpuCopy(Request[GpuCopyReply]):
    """The engine lends ``blocks`` for one copy by the daemon's worker: ``upload`` reads the
    slots it pinned with ``load_begin`` into them, ``offload`` writes them into slots it
    reserved. The copy waits for ``after_event`` (an IPC event recorded on the engine's
    compute stream). The engine keeps the blocks out of use until ``gpu_copy_status``
    reports the copy finished."""

    op = "gpu_copy"
    engine_id: str
    copy_id: int
    direction: Literal["upload", "offload"]
    blocks: list[int]
    slots: list[int]
    after_event: bytes = b""


class GpuCopyStatusReply(msgspec.Struct):
    states: list[str]
    """Per asked copy: "running", "done", "failed" or "unknown" (never lent, or already
    reported). A finished copy is reported once and then forgotten."""
    errors: list[str]


class GpuCopyStatus(Request[GpuCopyStatusReply]):
    op = "gpu_copy_status"
    engine_id: str
    copy_ids: list[int]


# --------------------------------------------------------------------------- introspection


class PoolStats(msgspec.Struct):
    arena_name: str
    arena_bytes: int
    slot_bytes: int
    num_slots: int
    free: int
    writing: int
    ready: int
    reading: int
    evictions: int
    hits: int
    misses: int


class StatsReply(msgspec.Struct):
    uptime_s: float
    pool: PoolStats
    engines: int
    apps: int
    agents: int
    bytes_offloaded: int
    bytes_uploaded: int
    events: dict[str, int]
    errors: dict[str, int]
    decisions: int
    l2: dict[str, int] = msgspec.field(default_factory=dict)
    """The L2 tier's counters (docs/distributed.md); empty when the daemon runs without one."""
    early_tool_ends: dict[str, int] = msgspec.field(default_factory=dict)
    """``tool_call_end`` events that came before their start: ``held``, then ``applied``
    (their start came) or ``dropped`` (none came in time)."""


class Stats(Request[StatsReply]):
    op = "stats"


class EngineInfo(msgspec.Struct):
    engine_id: str
    name: str
    fingerprint: str
    layout: KvLayout
    num_gpu_blocks: int
    num_gpu_blocks_free: int
    num_waiting: int
    num_running: int
    leased_slots: int
    last_seen_s_ago: float


class ListEnginesReply(msgspec.Struct):
    engines: list[EngineInfo]


class ListEngines(Request[ListEnginesReply]):
    op = "list_engines"


class AgentInfo(msgspec.Struct):
    app_id: str
    agent_id: str
    agent_type: str
    state: str
    importance: float
    priority: float
    on_critical_path: bool
    kv_blocks: int
    host_blocks: int
    tool_kind: str
    tool_predicted_s: float | None
    state_for_s: float
    protect_blocks: int = 0
    """GPU blocks the critical-inversion guard keeps free for this agent."""
    app_age_s: float = 0.0
    """Seconds since the agent's application registered: older applications rank ahead."""
    app_lead_s: float = 0.0
    """Seconds the application ranks ahead of its registration (the tail guard,
    ``guard.app_lead_s``): it ranks as if it had registered ``app_age_s + app_lead_s`` ago."""


class ListAgentsReply(msgspec.Struct):
    agents: list[AgentInfo]


class ListAgents(Request[ListAgentsReply]):
    op = "list_agents"
    app_id: str = ""


class AppInfo(msgspec.Struct):
    app_id: str
    tenant: str
    state: str
    nodes: int
    edges: list[tuple[str, str]]
    node_states: dict[str, str]
    critical_path: list[str]
    age_s: float


class ListAppsReply(msgspec.Struct):
    apps: list[AppInfo]


class ListApps(Request[ListAppsReply]):
    op = "list_apps"


class PoolReply(msgspec.Struct):
    pool: PoolStats
    by_engine: dict[str, int]
    by_tenant: dict[str, int]


class Pool(Request[PoolReply]):
    op = "pool"


class ConfigReply(msgspec.Struct):
    config: dict[str, Any]


class GetConfig(Request[ConfigReply]):
    op = "get_config"


KvTier = Literal["gpu", "host"]
"""Where an agent's KV blocks live: on the engine's GPU or in the host store."""
Term = float | int | str | bool | None
"""One input or intermediate value of a decision (a predicted stall, a margin, a rule flag)."""


class DecisionReason(msgspec.Struct, forbid_unknown_fields=True):
    """Why a decision was taken: the deciding ``rule`` and every term it used (for example
    the predicted stall, the transfer estimate and the margin of an offload)."""

    rule: str
    terms: dict[str, Term] = {}


class DecisionBase(msgspec.Struct, tag_field="kind", kw_only=True):
    """One scheduler decision. On the wire ``kind`` names it (``offload``, ``upload``...);
    ``seq`` numbers it within the daemon, ``at_s`` is the daemon's clock when it was
    decided, ``blocks`` the blocks it concerns."""

    seq: int = 0
    at_s: float
    app_id: str = ""
    agent_id: str = ""
    engine_id: str = ""
    blocks: int = 0
    policy: str = ""
    reason: DecisionReason

    @property
    def kind(self) -> str:
        return str(self.__struct_config__.tag)


URGENT: Final = 0
PREDICTIVE: Final = 1
PREFETCH: Final = 2


class OffloadDecision(DecisionBase, tag="offload"):
    """Copy ``blocks`` of the agent's GPU KV to the host. ``free_gpu``: the GPU blocks are
    freed once the copy is done (a move); otherwise they stay cached (a saved copy)."""

    free_gpu: bool = True


class UploadDecision(DecisionBase, tag="upload"):
    """Reserve ``blocks`` GPU blocks and copy that many of the agent's host blocks into
    them, starting ``start_in_s`` from now. A large upload comes as several pieces
    (``piece`` of ``pieces``). ``priority``: 0 urgent (the agent is back and waits),
    1 predictive (lands just before the predicted tool return), 2 prefetch."""

    priority: int = URGENT
    piece: int = 1
    pieces: int = 1
    start_in_s: float = 0.0


class DropDecision(DecisionBase, tag="drop"):
    """Free ``blocks`` of the agent's KV on the GPU (the next call recomputes) or host."""

    where: KvTier = "gpu"


class PinDecision(DecisionBase, tag="pin"):
    """The agent's cached GPU KV must not be evicted for ``ttl_s`` seconds."""

    ttl_s: float = 0.0


class UnpinDecision(DecisionBase, tag="unpin"):
    """The pin ends early (the tool returned, or the agent runs again)."""


class KeepDecision(DecisionBase, tag="keep"):
    """Nothing to do: the policy considered an offload or drop and decided against it
    (kept so an operator can ask why an agent was not offloaded). Never pushed."""


class PartitionDecision(DecisionBase, tag="partition"):
    """The GPU pool's split into per-agent-type reservations and a shared pool. Applied
    through admission queries, never pushed."""

    reservations: dict[str, int] = {}
    shared_blocks: int = 0


PushedDecision = OffloadDecision | UploadDecision | DropDecision | PinDecision | UnpinDecision
"""What the daemon pushes to the engine a decision concerns (op ``decision``)."""
DecisionRecord = PushedDecision | KeepDecision | PartitionDecision
"""Every decision the daemon keeps and lists (``list_decisions``)."""
PUSHED_KINDS: Final = frozenset(str(c.__struct_config__.tag) for c in get_args(PushedDecision))


class ListDecisionsReply(msgspec.Struct):
    decisions: list[DecisionRecord]


class ListDecisions(Request[ListDecisionsReply]):
    op = "list_decisions"
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LISTED_DECISIONS)] = 50
    agent_id: str = ""


# --------------------------------------------------------------------------- registry

REQUEST_TYPES: Final[dict[str, type[Request]]] = {
    cls.op: cls
    for cls in (
        Ping,
        RegisterEngine,
        EngineHeartbeat,
        UnregisterEngine,
        RegisterApp,
        LlmCallStart,
        LlmCallAdmitted,
        LlmCallPreempted,
        LlmCallFinish,
        ToolCallStart,
        ToolCallEnd,
        AppEnd,
        Lookup,
        Reserve,
        Commit,
        Abort,
        LoadBegin,
        LoadEnd,
        Drop,
        ShareGpuKv,
        GpuCopy,
        GpuCopyStatus,
        Stats,
        ListEngines,
        ListAgents,
        ListApps,
        Pool,
        GetConfig,
        ListDecisions,
    )
}

AGENT_EVENT_OPS: Final = frozenset(
    {
        "register_app",
        "llm_call_start",
        "llm_call_preempted",
        "llm_call_finish",
        "tool_call_start",
        "tool_call_end",
        "app_end",
    }
)

DECISION_PUSH_OP: Final = "decision"

PushKind = Literal["decision"]


# --------------------------------------------------------------------------- codec

_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_reply_decoder = msgspec.msgpack.Decoder(ReplyEnvelope)
_body_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    op: msgspec.msgpack.Decoder(cls) for op, cls in REQUEST_TYPES.items()
}

_reply_body_decoders: dict[type[msgspec.Struct], msgspec.msgpack.Decoder[Any]] = {}


def encode_request(req: Request, request_id: int, *, ack: bool = True) -> bytes:
    """``ack=False``: one-way, answered only if it fails (``Envelope.ack``)."""
    if ack:
        return _encoder.encode({"v": PROTOCOL_VERSION, "op": req.op, "id": request_id, "body": req})
    return _encoder.encode(
        {"v": PROTOCOL_VERSION, "op": req.op, "id": request_id, "ack": False, "body": req}
    )


def decode_request(frame: bytes) -> tuple[int, str, Request]:
    """Decode one request frame. Raises ProtocolError with the right code.

    The request id and op are returned even on some failures (through the exception's
    ``request_id`` and ``op`` attributes) so the error reply can name them.
    """
    request_id, op, body, _ack = decode_request_ack(frame)
    return request_id, op, body


def decode_request_ack(frame: bytes) -> tuple[int, str, Request, bool]:
    """``decode_request``, with the envelope's ``ack`` (False: a one-way request)."""
    try:
        env = _envelope_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise _with_ids(ProtocolError(ErrorCode.BAD_FRAME, str(exc)), 0, "?") from None
    except RecursionError:
        # msgspec raises this (not DecodeError) for arrays or maps nested too deeply.
        raise _with_ids(ProtocolError(ErrorCode.BAD_FRAME, "nested too deeply"), 0, "?") from None
    if env.v != PROTOCOL_VERSION:
        raise _with_ids(
            ProtocolError(
                ErrorCode.BAD_VERSION,
                f"protocol version {env.v} not supported; this daemon speaks {PROTOCOL_VERSION}",
            ),
            env.id,
            env.op,
        )
    decoder = _body_decoders.get(env.op)
    if decoder is None:
        raise _with_ids(
            ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {env.op[:64]!r}"), env.id, env.op
        )
    try:
        body = decoder.decode(env.body)
    except msgspec.DecodeError as exc:
        raise _with_ids(ProtocolError(ErrorCode.BAD_REQUEST, str(exc)), env.id, env.op) from None
    except RecursionError:
        error = ProtocolError(ErrorCode.BAD_REQUEST, "nested too deeply")
        raise _with_ids(error, env.id, env.op) from None
    return env.id, env.op, body, env.ack


def _with_ids(exc: ProtocolError, request_id: int, op: str) -> ProtocolError:
    exc.request_id = request_id  # type: ignore[attr-defined]
    exc.op = op  # type: ignore[attr-defined]
    return exc


def encode_reply(op: str, request_id: int, body: msgspec.Struct) -> bytes:
    return _encoder.encode(
        {"v": PROTOCOL_VERSION, "op": op, "id": request_id, "ok": True, "body": body}
    )


def encode_error(op: str, request_id: int, code: str, message: str) -> bytes:
    return _encoder.encode(
        {
            "v": PROTOCOL_VERSION,
            "op": op,
            "id": request_id,
            "ok": False,
            "error": {"code": code, "message": message[:1024]},
        }
    )


def encode_push(op: str, body: msgspec.Struct) -> bytes:
    return _encoder.encode({"v": PROTOCOL_VERSION, "op": op, "id": 0, "ok": True, "body": body})


def decode_reply_envelope(frame: bytes) -> ReplyEnvelope:
    try:
        return _reply_decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteError(ErrorCode.BAD_FRAME, f"undecodable reply: {exc}") from None


def decode_reply_body(env: ReplyEnvelope, req: Request[ReplyT]) -> ReplyT:
    """The body of ``req``'s reply, as the type ``req`` declares; an error reply raises
    ``RemoteError`` with its code."""
    if not env.ok:
        err = env.error or ErrorBody(ErrorCode.INTERNAL, "error reply without error body")
        raise RemoteError(err.code, err.message)
    reply_type = type(req).reply
    decoder = _reply_body_decoders.get(reply_type)
    if decoder is None:
        decoder = _reply_body_decoders[reply_type] = msgspec.msgpack.Decoder(reply_type)
    try:
        result: ReplyT = decoder.decode(env.body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteError(ErrorCode.BAD_FRAME, f"reply body for {env.op}: {exc}") from None
    return result


def to_builtins(obj: Any) -> Any:
    """Plain dicts and lists for JSON output (bytes become hex)."""
    return msgspec.to_builtins(obj, enc_hook=None, builtin_types=None, str_keys=True)
