"""TokenCake's SGLang backend: ``batch_set_v1`` then ``batch_get_v1`` through the arena,
against a numpy memcpy of the same bytes in the same run.

A real tokencaked (subprocess), SGLang 0.5.23's real ``MHATokenToKVPoolHost`` on CPU
(built as the tests build it, ``bench/common/sglang_env.py``), and the backend made
by SGLang's own dynamic backend factory with ``interface_v1``. Every repeat stores the whole
pool under fresh keys in batches of 128 pages (SGLang's ``STORAGE_BATCH_SIZE``), loads them
back into the pool, checks the bytes, and drops the keys. Repeats interleave the memcpy
baseline with the backend so machine load drifts hit both alike. Bandwidths are the best
repeat; the ratio is given both from those bests and as the median of each repeat's own
ratio.

Run from the repository root (after ``bash scripts/bootstrap.sh test``):

    python bench/bench_sglang.py [--mib 1024] [--page-tokens 64] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencake import protocol as p
from tokencake.clients.launcher import daemon_flags, launch

# The bench builds SGLang's host pool and the daemon as the tests do; run from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import sglang_env

BATCH = 128  # sglang.srt.mem_cache.hicache_storage.STORAGE_BATCH_SIZE
MiB = 1 << 20


def run(mib: int, page_tokens: int, repeats: int) -> dict[str, Any]:
    sglang_env.import_sglang()
    from sglang.srt.mem_cache.hicache_storage import STORAGE_BATCH_SIZE

    assert STORAGE_BATCH_SIZE == BATCH
    layers, heads, head_dim = 32, 8, 128  # an 8B-class model's KV, bf16
    token_bytes = 2 * layers * heads * head_dim * 2
    page_bytes = page_tokens * token_bytes
    pages = mib * MiB // page_bytes
    tokens = pages * page_tokens
    pool = sglang_env.host_pool(
        "page_first",
        layers=layers,
        heads=heads,
        head_dim=head_dim,
        page_size=page_tokens,
        device_tokens=page_tokens,
        host_tokens=tokens,
    )
    pool_bytes = pool.kv_buffer.view(torch.uint8).numpy().reshape(-1)
    pool_bytes[:] = np.random.default_rng(0).integers(0, 256, pool_bytes.size, dtype=np.uint8)
    indices = pool.alloc(tokens)
    assert indices is not None and indices.numel() == tokens
    spans = [
        (b, indices[b * page_tokens : (b + BATCH) * page_tokens]) for b in range(0, pages, BATCH)
    ]
    rounds = _Rounds(pool_bytes, spans, pages)
    with tempfile.TemporaryDirectory() as tmp:
        d = launch(*daemon_flags(arena=f"{mib + 64}MiB"), workdir=Path(tmp))
        try:
            backend = _backend(d.endpoint, pool)
            with d.client(timeout_s=30) as client:
                for rep in range(repeats):
                    rounds.run(backend, client, rep)
            backend.close()
        finally:
            d.stop()
    return _summary(rounds, pages * page_bytes, pages, page_bytes)


def _backend(endpoint: str, pool: Any) -> Any:
    """TokenCake's backend as SGLang's dynamic factory makes it, on ``pool``."""
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    cfg = sglang_env.storage_config(
        {
            "backend_name": "tokencake",
            "module_path": "tokencake.connectors.sglang.backend",
            "class_name": "TokenCakeStorage",
            "interface_v1": 1,
            "endpoint": endpoint,
            "timeout_ms": 5000,
        },
        model_name="bench-8b-class",
    )
    backend = StorageBackendFactory.create_backend("dynamic", cfg, None)
    backend.register_mem_pool_host(pool)
    return backend


class _Rounds:
    """Each repeat: the memcpy baseline, the whole pool stored, zeroed and loaded back (its
    bytes checked), and the keys dropped; the three times kept."""

    def __init__(self, pool_bytes: np.ndarray, spans: list[tuple[int, Any]], pages: int) -> None:
        self.pool_bytes = pool_bytes
        self.digest = hashlib.blake2b(pool_bytes.data).hexdigest()
        self.baseline_dst = np.ones_like(pool_bytes)
        self.spans = spans  # (first page, the batch's token indices)
        self.pages = pages
        self.memcpy_t: list[float] = []
        self.set_t: list[float] = []
        self.get_t: list[float] = []

    def _batched(self, op: Any, keys: list[str]) -> tuple[float, list[bool]]:
        t0 = time.perf_counter()
        done: list[bool] = []
        for b, span in self.spans:
            done += op(keys[b : b + BATCH], span)
        return time.perf_counter() - t0, done

    def run(self, backend: Any, client: Any, rep: int) -> None:
        t0 = time.perf_counter()
        np.copyto(self.baseline_dst, self.pool_bytes)
        self.memcpy_t.append(time.perf_counter() - t0)
        keys = [hashlib.sha256(f"{rep}:{i}".encode()).hexdigest() for i in range(self.pages)]
        set_s, ok = self._batched(backend.batch_set_v1, keys)
        self.set_t.append(set_s)
        if not all(ok):
            raise SystemExit(f"batch_set_v1 stored {sum(ok)} of {self.pages} pages")
        self.pool_bytes[:] = 0
        get_s, got = self._batched(backend.batch_get_v1, keys)
        self.get_t.append(get_s)
        if not all(got) or hashlib.blake2b(self.pool_bytes.data).hexdigest() != self.digest:
            raise SystemExit("batch_get_v1 did not bring back the stored bytes")
        engine_id = backend._link.engine_id
        client.call(p.Drop(engine_id, [bytes.fromhex(k) for k in keys]))


def _summary(rounds: _Rounds, total: int, pages: int, page_bytes: int) -> dict[str, Any]:
    gb = total / 1e9
    memcpy_t, set_t, get_t = rounds.memcpy_t, rounds.set_t, rounds.get_t
    memcpy_s, set_s, get_s = min(memcpy_t), min(set_t), min(get_t)
    ratio = 2 * memcpy_s / (set_s + get_s)
    # Each repeat's own ratio: its three timings ran back to back, so load drift between
    # repeats cancels out of it.
    per_repeat = sorted(2 * m / (s + g) for m, s, g in zip(memcpy_t, set_t, get_t, strict=True))
    return {
        "bytes": total,
        "pages": pages,
        "page_bytes": page_bytes,
        "memcpy_gbps": round(gb / memcpy_s, 2),
        "batch_set_v1_gbps": round(gb / set_s, 2),
        "batch_get_v1_gbps": round(gb / get_s, 2),
        "set_get_vs_2x_memcpy": round(ratio, 3),
        "per_repeat_ratio_median": round(per_repeat[len(per_repeat) // 2], 3),
        "per_repeat_ratios": [round(r, 3) for r in per_repeat],
        "target": ">= 0.70",
        "ok": ratio >= 0.70,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="bytes moved each way, in MiB")
    ap.add_argument("--page-tokens", type=int, default=64, help="SGLang page size in tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if min(args.mib, args.page_tokens, args.repeats) < 1:
        ap.error("--mib, --page-tokens and --repeats must be >= 1")
    result = run(args.mib, args.page_tokens, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
