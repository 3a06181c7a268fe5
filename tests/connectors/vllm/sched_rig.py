"""``SchedRig``: vLLM's real ``Scheduler`` (as ``TokenCakeScheduler``) and KV cache manager at
a small size, with the ``TokenCakeConnector``'s scheduler side and a real daemon, and no
model. Each step's model output is made up (one token per request that finished its prompt)
and the worker's copies are reported done, without moving bytes, in the step after they were
shipped (what cannot run without an engine), as vLLM's own scheduler tests stand in for the
model. Tests import it; it is not collected itself.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from tokencake.agent_params import kv_transfer_params
from tokencake.connectors.vllm.jobs import TokenCakeMetadata, TokenCakeWorkerMetadata
from tokencake.connectors.vllm.scheduler import TokenCakeScheduler

BLOCK = 32
BLOCKS = 9  # 8 usable: vLLM keeps one null block


class SchedRig:
    """The scheduler, stepped with made-up model outputs; the worker's copies reported done."""

    def __init__(self, model: Path, endpoint: str, app: str, **extra: Any) -> None:
        self.app = app
        cfg = {"endpoint": endpoint, "engine_name": "sched-rig", "timeout_ms": 5000, **extra}
        vllm_config = VllmConfig(
            model_config=ModelConfig(
                model=str(model),
                dtype="float32",
                seed=0,
                skip_tokenizer_init=True,
                max_model_len=512,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=4,
                max_num_batched_tokens=512,
                max_model_len=512,
                is_encoder_decoder=False,
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            kv_transfer_config=KVTransferConfig(
                kv_connector="TokenCakeConnector",
                kv_connector_module_path="tokencake.connectors.vllm.connector",
                kv_role="kv_both",
                kv_connector_extra_config=cfg,
            ),
        )
        vllm_config.cache_config.num_gpu_blocks = BLOCKS
        spec = FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32
        )
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
        kv_cache_config = KVCacheConfig(
            num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)]
        )
        kv_cache_config.kv_cache_layout = "LBHNC"  # what the engine would resolve
        self.sched = TokenCakeScheduler(
            vllm_config=vllm_config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(vllm_config),
            block_size=BLOCK,
        )
        conn = self.sched._tc_conn
        assert conn is not None and conn.link_up
        self.conn = conn
        hash_fn = get_hash_fn_by_name(self.sched.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._hasher = get_request_block_hasher(BLOCK, hash_fn)
        self._stores: list[Any] = []
        self._loads: list[Any] = []

    def add(self, req_id: str, agent: str, tokens: int, max_tokens: int) -> None:
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args={"kv_transfer_params": kv_transfer_params(self.app, agent)},
        )
        rng = random.Random(f"{self.app}/{agent}")  # distinct KV per test and agent
        prompt = [rng.randrange(4, 500) for _ in range(tokens)]
        self.sched.add_request(Request(req_id, prompt, params, None, block_hasher=self._hasher))

    def step(self) -> Any:
        """One engine step; the worker copies what the previous step shipped (a request's
        save reported as vLLM's ``finished_sending``, so vLLM frees its blocks; its load as
        ``finished_recving``, so vLLM schedules it)."""
        sched = self.sched
        out = sched.schedule()
        ids = list(out.num_scheduled_tokens)
        done = [
            [7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens else []
            for r in ids
        ]
        shipped = out.kv_connector_metadata
        assert isinstance(shipped, TokenCakeMetadata)
        stored, self._stores = self._stores, list(shipped.stores)
        loaded, self._loads = self._loads, list(shipped.loads)
        meta = None
        if stored or loaded:  # the worker reports only when a copy ended
            meta = TokenCakeWorkerMetadata(
                loaded=[j.job_id for j in loaded], stored=[j.job_id for j in stored]
            )
        worker = KVConnectorOutput(
            finished_sending={j.req_id for j in stored if j.req_id} or None,
            finished_recving={j.req_id for j in loaded if j.req_id} or None,
            kv_connector_worker_meta=meta,
        )
        model_out = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=done,
            kv_connector_output=worker,
        )
        sched.update_from_output(out, model_out)
        return out

    def until_scheduled(self, req_id: str, steps: int) -> int:
        """Steps until ``req_id`` is scheduled (``steps + 1``: never within ``steps``)."""
        for n in range(1, steps + 1):
            if req_id in self.step().num_scheduled_tokens:
                return n
        return steps + 1
