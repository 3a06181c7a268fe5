"""``TokenCakeConnector``: vLLM's KV connector API (``KVConnectorBase_V1``) backed by tokencaked.

One instance lives in vLLM's scheduler (role SCHEDULER) and one in each worker (role WORKER).
Like vLLM's own connectors (``NixlConnector``), it is a facade over one object per role,
each with its own state:

- ``TokenCakeConnectorScheduler`` (``connector_scheduler.py``): the control plane. It pins,
  reserves and commits host slots over the daemon link, reports agent events, applies the
  daemon's pushed decisions (``holds.py``) and queues copy jobs (``jobs.py``).
- ``TokenCakeConnectorWorker`` (``connector_worker.py``): the data plane, no sockets. It
  copies blocks between vLLM's KV tensors and the daemon's shared-memory arena and reports
  completions through ``get_finished``.

The two talk only through vLLM's metadata, declared with the copy jobs (``jobs.py``): this
step's copy jobs go to the workers, finished job ids come back.

Failure: a daemon that is down or slow costs at most ``timeout_ms`` once; the link is then
marked down, nothing is loaded or saved, vLLM computes everything itself, and the daemon is
retried every ``reconnect_s`` (ZMQ reconnects in its I/O thread; we re-register).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from tokencake.clients.client import DaemonLink
from tokencake.connectors.vllm.config import ConnectorConfig
from tokencake.connectors.vllm.connector_scheduler import (
    DECISION_GRACE_S as DECISION_GRACE_S,
)
from tokencake.connectors.vllm.connector_scheduler import TokenCakeConnectorScheduler
from tokencake.connectors.vllm.connector_worker import TokenCakeConnectorWorker
from tokencake.connectors.vllm.jobs import (
    ConnectorStats,
    TokenCakeMetadata,
    TokenCakeWorkerMetadata,
)
from tokencake.layout import KvLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

KV_FORMAT = "vllm-{order}-v2"
"""The slot format's name, part of the registered layout's identity: ``order`` is the byte
order of one layer's part of a slot (``regions.slot_order``: ``hnc``, ``nhc``), which vLLM's
resolved ``KVCacheLayout`` decides. Layouts with the same order are byte-compatible (the
L/B nesting only changes strides, and each slot holds layer after layer); others are not,
and never share a name. (v1 named every layout ``blockmajor``.)"""


def slot_order(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> str:
    """The slot byte order vLLM's resolved layout gives, in ``regions.AXES_4D`` letters:
    the physical order of heads (H), tokens (N) and content (C), heads or tokens left out
    when there is one only (as ``regions.slot_order`` does from the tensors)."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    name = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout
    if name is None:
        raise ValueError("vLLM has not resolved its KV cache layout yet")
    spec: Any = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    sizes = {2: getattr(spec, "num_heads", spec.num_kv_heads), 3: spec.num_states, 4: 2}
    # stride_order: the logical axes [L, B, H, N, C] in physical order, outermost first
    return "".join("LBHNC"[d] for d in KVCacheLayout[name].stride_order if sizes.get(d, 1) > 1)


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> KvLayout:
    """The ``KvLayout`` of one engine block as this connector copies it."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"TokenCakeConnector supports one KV cache group (full attention), got {len(groups)}"
        )
    spec: Any = groups[0].kv_cache_spec
    num_layers = len(groups[0].layer_names)
    dtype = str(spec.dtype).removeprefix("torch.")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
        raise ValueError("TokenCakeConnector supports tensor/pipeline parallel size 1 only")
    from vllm.platforms import current_platform

    model = vllm_config.model_config.served_model_name or vllm_config.model_config.model
    if isinstance(model, list):
        model = model[0]
    kv_format = KV_FORMAT.format(order=slot_order(vllm_config, kv_cache_config).lower())
    suffix = f"|{kv_format}|{current_platform.device_type}"  # never cut off a long name
    return KvLayout(
        model_id=str(model)[: 256 - len(suffix)] + suffix,
        num_layers=num_layers,
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=dtype,
        bytes_per_block=spec.page_size_bytes * num_layers,
        device=current_platform.device_type,
    )


def _hash_stride(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> int:
    """Hash units per engine block (vLLM may hash finer than it allocates)."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

    block_size = vllm_config.cache_config.block_size
    scheduler_bs, hash_bs = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    if scheduler_bs != block_size or block_size % hash_bs:
        raise ValueError(f"block size {scheduler_bs} vs hash block size {hash_bs}")
    return block_size // hash_bs


class TokenCakeConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.layout = engine_layout(vllm_config, kv_cache_config)
        self.connector_scheduler: TokenCakeConnectorScheduler | None = None
        self.connector_worker: TokenCakeConnectorWorker | None = None
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            logger.warning(
                "kv_load_failure_policy=%r: a failed TokenCake load fails the request; set "
                "'recompute' so the engine recomputes instead",
                self._kv_transfer_config.kv_load_failure_policy,
            )
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = TokenCakeConnectorScheduler(
                self.cfg,
                self.layout,
                block_size=self.block_size,
                hash_stride=_hash_stride(vllm_config, kv_cache_config),
                num_gpu_blocks=kv_cache_config.num_blocks,
            )
            self.stats = self.connector_scheduler.stats
        else:
            layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
            self.connector_worker = TokenCakeConnectorWorker(
                self.layout,
                layer_names,
                self.cfg,
                num_blocks=kv_cache_config.num_blocks,
                order=slot_order(vllm_config, kv_cache_config),
            )
            self.stats = ConnectorStats()  # the counters are the scheduler side's

    def _sched(self) -> TokenCakeConnectorScheduler:
        assert self.connector_scheduler is not None, "a scheduler-side call on a worker"
        return self.connector_scheduler

    def _worker(self) -> TokenCakeConnectorWorker:
        assert self.connector_worker is not None, "a worker-side call in the scheduler"
        return self.connector_worker

    @property
    def link(self) -> DaemonLink | None:
        """The scheduler side's daemon link (None on a worker)."""
        return self.connector_scheduler.link if self.connector_scheduler else None

    @property
    def link_up(self) -> bool:
        return self.connector_scheduler is not None and self.connector_scheduler.link_up

    def get_stats(self) -> dict[str, int]:
        """The counters, plus failed daemon calls by cause (``errors.<code>``)."""
        return self._sched().get_stats()

    # ------------------------------------------------------------------ scheduler side

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._sched().bind_gpu_block_pool(gpu_block_pool)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def on_new_request(self, request: Request) -> None:
        self._sched().on_new_request(request)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().update_connector_output(connector_output)

    def has_pending_push_work(self) -> bool:
        return self._sched().has_pending_push_work()

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register_kv_caches(kv_caches)

    def _metadata(self) -> TokenCakeMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TokenCakeMetadata)
        return meta

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker().start_load_kv(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous: nothing waits per layer

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # saves copy whole blocks in wait_for_save, after the forward wrote them

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self._worker().wait_for_save(self._metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker().get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> TokenCakeWorkerMetadata | None:
        done = self._worker().take_finished()
        return None if done is None else TokenCakeWorkerMetadata(**done._asdict())

    def shutdown(self) -> None:
        if self.connector_scheduler is not None:
            self.connector_scheduler.shutdown()
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
