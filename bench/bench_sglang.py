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
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    assert STORAGE_BATCH_SIZE == BATCH
    layers, heads, head_dim = 32, 8, 128  # an 8B-class model's KV, bf16
    token_bytes = 2 * layers * heads * head_dim * 2
    page_bytes = page_tokens * token_bytes
    pages = mib * MiB // page_bytes
    tokens = pages * page_tokens
    total = pages * page_bytes

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
    digest = hashlib.blake2b(pool_bytes.data).hexdigest()
    baseline_dst = np.ones_like(pool_bytes)
    indices = pool.alloc(tokens)
    assert indices is not None and indices.numel() == tokens

    with tempfile.TemporaryDirectory() as tmp:
        d = launch(*daemon_flags(arena=f"{mib + 64}MiB"), workdir=Path(tmp))
        try:
            cfg = sglang_env.storage_config(
                {
                    "backend_name": "tokencake",
                    "module_path": "tokencake.connectors.sglang.backend",
                    "class_name": "TokenCakeStorage",
                    "interface_v1": 1,
                    "endpoint": d.endpoint,
                    "timeout_ms": 5000,
                },
                model_name="bench-8b-class",
            )
            backend = StorageBackendFactory.create_backend("dynamic", cfg, None)
            backend.register_mem_pool_host(pool)
            memcpy_t: list[float] = []
            set_t: list[float] = []
            get_t: list[float] = []
            with d.client(timeout_s=30) as client:
                for rep in range(repeats):
                    t0 = time.perf_counter()
                    np.copyto(baseline_dst, pool_bytes)
                    memcpy_t.append(time.perf_counter() - t0)

                    keys = [hashlib.sha256(f"{rep}:{i}".encode()).hexdigest() for i in range(pages)]
                    t0 = time.perf_counter()
                    ok = []
                    for b in range(0, pages, BATCH):
                        span = indices[b * page_tokens : (b + BATCH) * page_tokens]
                        ok += backend.batch_set_v1(keys[b : b + BATCH], span)
                    set_t.append(time.perf_counter() - t0)
                    if not all(ok):
                        raise SystemExit(f"batch_set_v1 stored {sum(ok)} of {pages} pages")

                    pool_bytes[:] = 0
                    t0 = time.perf_counter()
                    got = []
                    for b in range(0, pages, BATCH):
                        span = indices[b * page_tokens : (b + BATCH) * page_tokens]
                        got += backend.batch_get_v1(keys[b : b + BATCH], span)
                    get_t.append(time.perf_counter() - t0)
                    if not all(got) or hashlib.blake2b(pool_bytes.data).hexdigest() != digest:
                        raise SystemExit("batch_get_v1 did not bring back the stored bytes")

                    engine_id = backend._link.engine_id
                    client.call(p.Drop(engine_id, [bytes.fromhex(k) for k in keys]))
            backend.close()
        finally:
            d.stop()

    gb = total / 1e9
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
