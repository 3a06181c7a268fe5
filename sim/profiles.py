"""Model x GPU profiles: where every cost the engine model charges comes from.

Formulas (all documented in docs/benchmarks.md, section Simulator):

* KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes;
  a block holds ``block_tokens`` tokens.
* GPU blocks = floor((gpu_mem x gpu_mem_util - weight bytes - reserve) / block bytes), as
  vLLM sizes its pool; ``reserve`` (peak activations, CUDA graphs, non-torch memory) is the
  one fitted term, chosen so the A800 profile gives the 3,050 blocks the authors' fork
  reported.
* Step time (roofline): max(FLOPs / (peak x MFU), bytes / (HBM bandwidth x MBU)) plus a
  fixed per-step CPU overhead. FLOPs = 2 x params per token (linear layers) + attention
  4 x layers x q_heads x head_dim per (query, key) pair; bytes = the weights once per step +
  the KV each token attends to. A profile may run attention at its own share of peak
  (``attn_mfu``; a CPU fit's measured cost per pair): then the compute time is the linear
  layers' at MFU plus attention's at ``attn_mfu``. A profile fitted to a CPU engine may
  instead give a measured duration for steps that only decode (``decode_step_s``): there a
  decode step costs about the same whatever the batch, and far less than the fitted line's
  intercept.
* Host link: a transfer of ``n`` bytes takes ``copy_overhead_s + n / bandwidth`` and each
  direction serves one transfer at a time (FIFO), so concurrent copies queue (contention).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)

GIB = 1024**3


class ProfileError(ValueError):
    """An unknown profile or an impossible setting (no room for a single block)."""


@dataclass(slots=True, frozen=True)
class ModelSpec:
    name: str
    params: float
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> float:
        """QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, over all query heads and layers."""
        return 4.0 * self.layers * self.q_heads * self.head_dim


@dataclass(slots=True, frozen=True)
class GpuSpec:
    name: str
    mem_bytes: float
    peak_flops: float
    hbm_bytes_per_s: float
    host_bytes_per_s: float
    """Effective DMA bandwidth each way between GPU and pinned host memory."""


@dataclass(slots=True, frozen=True)
class Profile:
    """Everything the engine model needs; derived numbers are properties, not inputs."""

    name: str
    model: ModelSpec
    gpu: GpuSpec
    gpu_mem_util: float
    reserve_bytes: float
    block_tokens: int = 16
    mfu: float = 0.55
    mbu: float = 0.80
    step_overhead_s: float = 0.002
    max_batched_tokens: int = 8192
    max_num_seqs: int = 256
    copy_overhead_s: float = 0.001
    host_kv_bytes: float = 100 * GIB
    source: str = ""
    fixed_gpu_blocks: int | None = None
    """A measured pool size (e.g. vLLM's log line) used instead of the memory formula."""
    decode_step_s: float | None = None
    """A measured step in which every request moves one token (decoding); None: the
    roofline, as for any other step."""
    attn_mfu: float | None = None
    """The share of peak FLOPs attention runs at, where it is not ``mfu``: a profile fitted
    to a CPU engine, whose attention kernels run at their own measured rate (the fit's
    cost per (query, key) pair). None: attention FLOPs count with the linear layers'."""

    @property
    def block_bytes(self) -> int:
        return self.model.kv_bytes_per_token * self.block_tokens

    @property
    def gpu_blocks(self) -> int:
        if self.fixed_gpu_blocks is not None:
            return self.fixed_gpu_blocks
        free = self.gpu.mem_bytes * self.gpu_mem_util - self.model.weight_bytes
        n = math.floor((free - self.reserve_bytes) / self.block_bytes)
        if n <= 0:
            raise ProfileError(f"{self.name}: no KV blocks fit at gpu_mem_util={self.gpu_mem_util}")
        return n

    @property
    def host_blocks(self) -> int:
        return int(self.host_kv_bytes // self.block_bytes)

    def transfer_s(self, nbytes: int) -> float:
        return self.copy_overhead_s + nbytes / self.gpu.host_bytes_per_s

    def step_s(
        self,
        tokens: int,
        attn_pairs: float,
        kv_tokens_read: float,
        decode_only: bool | None = None,
    ) -> float:
        """Duration of one engine step.

        ``tokens``: tokens processed (prefill chunk tokens + one per decoding request);
        ``attn_pairs``: (query, key) pairs attended; ``kv_tokens_read``: KV tokens read.
        ``decode_only``: every request of the step moves one token. None: read it off the
        counts, as the engine model sums them: a chunk of ``c`` tokens at context ``s``
        attends ``c*s + c*(c+1)/2`` pairs and reads ``s + c`` KV tokens, equal only for
        ``c = 1``, so the two totals are equal exactly when every chunk is one token.
        """
        if tokens <= 0:
            return 0.0
        if decode_only is None:
            decode_only = kv_tokens_read > 0 and attn_pairs == kv_tokens_read
        if decode_only and self.decode_step_s is not None:
            return self.decode_step_s
        nbytes = self.model.weight_bytes + kv_tokens_read * self.model.kv_bytes_per_token
        if self.attn_mfu is None:
            flops = 2.0 * self.model.params * tokens + self.model.attn_flops_per_pair * attn_pairs
            compute = flops / (self.gpu.peak_flops * self.mfu)
        else:
            linear = 2.0 * self.model.params * tokens / (self.gpu.peak_flops * self.mfu)
            attn = self.model.attn_flops_per_pair * attn_pairs
            compute = linear + attn / (self.gpu.peak_flops * self.attn_mfu)
        memory = nbytes / (self.gpu.hbm_bytes_per_s * self.mbu)
        return max(compute, memory) + self.step_overhead_s

    def with_overrides(self, gpu_mem_util: float | None = None) -> Profile:
        if gpu_mem_util is None:
            return self
        if not 0 < gpu_mem_util <= 1:
            raise ProfileError("gpu_mem_util must be in (0, 1]")
        return replace(self, gpu_mem_util=gpu_mem_util)


# Hugging Face config of Qwen/Qwen2.5-14B-Instruct: 48 layers, 40 query heads, 8 KV
# heads (GQA), head_dim 128, 14.77B parameters.
QWEN25_14B = ModelSpec(
    name="Qwen2.5-14B", params=14.77e9, layers=48, q_heads=40, kv_heads=8, head_dim=128
)

# meta-llama/Llama-3.1-8B-Instruct: 32 layers, 32 query heads, 8 KV heads, head_dim 128,
# 8.03B parameters.
LLAMA31_8B = ModelSpec(
    name="Llama-3.1-8B", params=8.03e9, layers=32, q_heads=32, kv_heads=8, head_dim=128
)

# A800 80GB = A100 80GB silicon: 312 TFLOPS dense BF16, 2.039 TB/s HBM2e, 80 GiB.
# Host link: the authors' fork measured ~25 GB/s effective D2H/H2D.
A800_80GB = GpuSpec(
    name="A800-80GB",
    mem_bytes=80 * GIB,
    peak_flops=312e12,
    hbm_bytes_per_s=2.039e12,
    host_bytes_per_s=25e9,
)

# H100 SXM5: 989 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GiB; PCIe Gen5 DMA ~50 GB/s
# (LMCache's measured figure on H100).
H100_80GB = GpuSpec(
    name="H100-80GB",
    mem_bytes=80 * GIB,
    peak_flops=989e12,
    hbm_bytes_per_s=3.35e12,
    host_bytes_per_s=50e9,
)

# bench/common/vllm_models.py: random-weight Llama, hidden 64, 2 layers, 2 query /
# 2 KV heads, head_dim 32, vocab 512, fp32 (about 0.15M parameters).
TINY_LLAMA = ModelSpec(
    name="tiny-llama", params=0.15e6, layers=2, q_heads=2, kv_heads=2, head_dim=32, dtype_bytes=4
)

# vLLM-CPU on a 2-core VM: "device" memory is host memory, transfers are memcpy. Rough
# speeds; only the fidelity check uses this profile, and it compares counts, not times.
CPU_2CORE = GpuSpec(
    name="cpu-2core", mem_bytes=1 * GIB, peak_flops=20e9, hbm_bytes_per_s=5e9, host_bytes_per_s=2e9
)

# bench/bench_engine.py's random-weight Llama: 12 layers, hidden 768, 12 query / 4 KV
# heads of 64, intermediate 2048, vocab 508, fp32: 76.3M parameters. q_heads 0: the
# fitted step slope below already contains the attention cost.
LLAMA_79M = ModelSpec(
    name="llama-79m-random",
    params=76.3e6,
    layers=12,
    q_heads=0,
    kv_heads=4,
    head_dim=64,
    dtype_bytes=4,
)

PROFILES: dict[str, Profile] = {
    "qwen2.5-14b-a800": Profile(
        name="qwen2.5-14b-a800",
        model=QWEN25_14B,
        gpu=A800_80GB,
        gpu_mem_util=0.5,
        # Fitted: a run of the TokenCake authors' vLLM fork (github.com/pku-lemonade/TokenCake)
        # reported 3,050 blocks of 16 tokens at gpu-mem-util 0.5.
        reserve_bytes=3.553 * GIB,
        source="TokenCake fork rerun: Qwen2.5-14B, one A800 80GB, gpu-mem-util 0.5, 3,050 blocks",
    ),
    "llama3.1-8b-h100": Profile(
        name="llama3.1-8b-h100",
        model=LLAMA31_8B,
        gpu=H100_80GB,
        gpu_mem_util=0.9,
        # vLLM's profiled activation + graph memory for an 8B model at 8,192 batched tokens
        # is about 2 GiB; an assumption, not a measurement.
        reserve_bytes=2.0 * GIB,
        copy_overhead_s=0.001,
        source="vLLM defaults (gpu-mem-util 0.9) on one H100 SXM 80GB",
    ),
    "tiny-llama-cpu": Profile(
        name="tiny-llama-cpu",
        model=TINY_LLAMA,
        gpu=CPU_2CORE,
        gpu_mem_util=1.0,
        reserve_bytes=0.0,
        # The engine of bench/common/vllm_workload.py: kv_cache_memory_bytes = 40 blocks
        # of 32 tokens; vLLM keeps block 0 as its null block, so 39 hold KV.
        block_tokens=32,
        fixed_gpu_blocks=39,
        max_batched_tokens=1024,
        max_num_seqs=8,
        step_overhead_s=0.005,
        host_kv_bytes=64 * 1024**2,
        source="bench/bench_fidelity.py: the tiny vLLM-CPU engine of the connector tests",
    ),
    "llama-79m-cpu": Profile(
        name="llama-79m-cpu",
        model=LLAMA_79M,
        # Fitted by bench/bench_engine.py to run 1 of docs/benchmarks.md (2026-12-01, load
        # average 11-18 on 2 cores), over the 307 measured steps of every setup that ran:
        # steps that only decode took 0.781 s on average; the others
        # 1.941 s + 4.22 ms x tokens (least squares; compute = 2 x params x tokens /
        # peak_flops). Host copy 3.08 GB/s (that run's measured block copy). The bench
        # refits from each run; this entry is that run's fit.
        gpu=GpuSpec(
            name="cpu-2core-fit",
            mem_bytes=0.0,
            peak_flops=2 * 76.3e6 / 4.22e-3,
            hbm_bytes_per_s=1e18,
            host_bytes_per_s=3.08e9,
        ),
        gpu_mem_util=1.0,
        reserve_bytes=0.0,
        block_tokens=32,
        mfu=1.0,
        mbu=1.0,
        step_overhead_s=1.941,
        decode_step_s=0.781,
        max_batched_tokens=3072,
        max_num_seqs=8,
        copy_overhead_s=0.0,
        # 120 blocks of 32 tokens, less vLLM's null block: vLLM-CPU 0.32 made exactly
        # num_gpu_blocks = 120 (119 free) from kv_cache_memory_bytes = 120 x 768 KiB.
        fixed_gpu_blocks=119,
        host_kv_bytes=4 * 120 * 786432,
        source="bench/bench_engine.py: vLLM-CPU, 12-layer random Llama, 120 KV blocks",
    ),
}

DEFAULT_PROFILE = "qwen2.5-14b-a800"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(
            f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None
