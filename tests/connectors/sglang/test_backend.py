"""TokenCakeStorage against SGLang 0.5.23's real storage interface, backend factory and host
pool (``MHATokenToKVPoolHost`` on CPU), with a real tokencaked.

SGLang's server cannot run on this machine (see docs/sglang.md), so these tests drive the
backend the way SGLang's cache controller does: ``batch_exists`` from the prefetch thread,
``batch_get_v1`` into freshly allocated host pages, ``batch_set_v1`` from the backup thread.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from typing import Any

import pytest

from bench.common import sglang_env
from tests.procs import start

pytest.importorskip("torch")
pytest.importorskip("sglang", reason="sglang not installed (bash scripts/bootstrap.sh test)")

import torch

from tokencake import protocol as p
from tokencake.connectors.sglang.pages import HostPages, page_key

PAGE = 4  # tokens per page in sglang_env.host_pool


def keys(*ids: int, prefix: str = "p") -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in ids]


def fill(pool: Any, indices: torch.Tensor, seed: int) -> None:
    """Random bytes in the pool's pages at ``indices`` (one index per token)."""
    gen = torch.Generator().manual_seed(seed)
    for start_idx in indices[::PAGE].tolist():
        page = pool.get_data_page(start_idx, flat=True)
        pool.set_from_flat_data_page(
            start_idx, torch.randn(page.numel(), generator=gen).to(page.dtype)
        )


def pages_of(pool: Any, indices: torch.Tensor) -> list[torch.Tensor]:
    return [pool.get_data_page(i, flat=True).clone() for i in indices[::PAGE].tolist()]


@pytest.mark.parametrize("layout", ["page_first", "layer_first", "page_first_direct"])
def test_zero_copy_round_trip_between_engines(make_backend: Any, layout: str) -> None:
    writer_pool = sglang_env.host_pool(layout)
    writer = make_backend(writer_pool)
    src = writer_pool.alloc(5 * PAGE)
    fill(writer_pool, src, seed=1)
    ks = keys(0, 1, 2, 3, 4, prefix=layout)

    assert writer.batch_set_v1(ks, src) == [True] * 5
    assert writer.stats.stored_pages == 5
    # Stored again: the daemon already holds them, nothing is copied.
    assert writer.batch_set_v1(ks, src) == [True] * 5
    assert writer.stats.already_stored_pages == 5

    # Another engine of the same layout (another SGLang process, or this one after a
    # restart) finds and loads them into different host pages.
    reader_pool = sglang_env.host_pool(layout)
    reader = make_backend(reader_pool)
    reader_pool.alloc(3 * PAGE)  # so the reader's pages sit elsewhere
    dst = reader_pool.alloc(5 * PAGE)
    assert reader.batch_exists(ks) == 5
    assert reader.batch_get_v1(ks, dst) == [True] * 5
    for got, want in zip(pages_of(reader_pool, dst), pages_of(writer_pool, src), strict=True):
        assert torch.equal(got, want)
    assert reader.stats.loaded_pages == 5


def test_batch_exists_counts_the_leading_run(make_backend: Any, daemon: Any) -> None:
    pool = sglang_env.host_pool()
    backend = make_backend(pool)
    idx = pool.alloc(4 * PAGE)
    fill(pool, idx, seed=2)
    ks = keys(0, 1, 2, 3, prefix="lead")
    stored = torch.cat([idx[: 2 * PAGE], idx[3 * PAGE :]])
    assert backend.batch_set_v1([ks[0], ks[1], ks[3]], stored) == [True] * 3

    assert backend.batch_exists(ks) == 2
    assert backend.batch_exists(ks[2:]) == 0
    assert backend.exists(ks[3]) and not backend.exists(ks[2])
    dst = pool.alloc(4 * PAGE)
    assert backend.batch_get_v1(ks, dst) == [True, True, False, False]
    loaded, stored_pages = pages_of(pool, dst)[:2], pages_of(pool, idx)[:2]
    assert all(torch.equal(a, b) for a, b in zip(loaded, stored_pages, strict=True))
    # Every pin taken for the read was released.
    with daemon.client() as client:
        assert client.call(p.Pool()).pool.reading == 0


def test_flat_page_path(make_backend: Any) -> None:
    """Without interface_v1 SGLang moves one flat tensor per page (get_data_page)."""
    pool = sglang_env.host_pool()
    backend = make_backend(pool, interface_v1=0)
    idx = pool.alloc(2 * PAGE)
    fill(pool, idx, seed=3)
    ks = keys(0, 1, prefix="flat")
    values = [pool.get_data_page(i, flat=True) for i in idx[::PAGE].tolist()]
    assert backend.batch_set(ks, values)
    assert backend.exists(ks[1])

    targets = [pool.get_dummy_flat_data_page() for _ in ks]
    got = backend.batch_get(ks, targets)
    assert all(torch.equal(g, v) for g, v in zip(got, values, strict=True))
    assert backend.get(keys(9, prefix="flat")[0], pool.get_dummy_flat_data_page()) is None
    # A value that is not one page is refused, and counted.
    assert not backend.set(keys(5, prefix="flat")[0], values[0][:-1])
    assert backend.stats.dropped_writes == 1
    assert not backend.exists(keys(5, prefix="flat")[0])


def test_layouts_paths_and_tenants_never_mix(make_backend: Any) -> None:
    pool = sglang_env.host_pool("page_first")
    backend = make_backend(pool)
    idx = pool.alloc(2 * PAGE)
    fill(pool, idx, seed=4)
    ks = keys(0, 1, prefix="mix")
    assert backend.batch_set_v1(ks, idx) == [True, True]
    assert make_backend(sglang_env.host_pool("page_first")).batch_exists(ks) == 2
    # Same bytes per page, different byte order or access path, or another tenant: a miss.
    assert make_backend(sglang_env.host_pool("layer_first")).batch_exists(ks) == 0
    assert make_backend(sglang_env.host_pool("page_first"), interface_v1=0).batch_exists(ks) == 0
    assert make_backend(sglang_env.host_pool("page_first"), salt="tenant-b").batch_exists(ks) == 0


def test_v2_moves_kv_pages_and_misses_other_pools(make_backend: Any) -> None:
    from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer

    pool = sglang_env.host_pool()
    backend = make_backend(pool)
    backend.register_mem_host_pool_v2(pool, PoolName.KV)
    idx = pool.alloc(3 * PAGE)
    fill(pool, idx, seed=5)
    ks = keys(0, 1, 2, prefix="v2")
    put = backend.batch_set_v2(
        [
            PoolTransfer(name=PoolName.KV, host_indices=idx, keys=ks),
            PoolTransfer(name=PoolName.MAMBA, host_indices=idx[:PAGE], keys=ks[-1:]),
        ]
    )
    assert put == {"kv": [True] * 3, "mamba": [False]}

    hit = backend.batch_exists_v2(ks)
    assert (hit.kv_hit_pages, hit.extra_pool_hit_pages) == (3, {PoolName.KV: 3})
    mamba = PoolTransfer(name=PoolName.MAMBA, keys=ks[-1:], hit_policy=PoolHitPolicy.TRAILING_PAGES)
    assert backend.batch_exists_v2(ks, [mamba]).kv_hit_pages == 0

    dst = pool.alloc(3 * PAGE)
    got = backend.batch_get_v2([PoolTransfer(name=PoolName.KV, host_indices=dst, keys=ks)])
    assert got == {"kv": [True] * 3}
    loaded, stored = pages_of(pool, dst), pages_of(pool, idx)
    assert all(torch.equal(a, b) for a, b in zip(loaded, stored, strict=True))


def test_pages_outside_the_pool_are_refused(make_backend: Any, daemon: Any) -> None:
    pool = sglang_env.host_pool()
    backend = make_backend(pool)
    beyond = torch.arange(pool.size, pool.size + PAGE, dtype=torch.int64)
    k = keys(0, prefix="outside")
    assert backend.batch_set_v1(k, beyond) == [False]
    assert backend.stats.dropped_writes == 1
    assert backend.batch_exists(k) == 0
    with daemon.client() as client:
        assert client.call(p.Pool()).pool.writing == 0  # the reservation was given back


def test_key_mapping() -> None:
    h = hashlib.sha256(b"x").hexdigest()
    assert page_key(h) == bytes.fromhex(h)
    assert page_key(h.upper()) != bytes.fromhex(h)
    assert len(page_key("not-a-hash")) == 32 and page_key("a") != page_key("b")


def test_host_pages_geometry() -> None:
    sglang_env.import_sglang()
    pool = sglang_env.host_pool("layer_first", layers=3)
    pages = HostPages(pool)
    assert len(pages.piece_sizes) == 2 * 3
    assert pages.bytes_per_page == 2 * 3 * PAGE * 2 * 8 * 2
    layout = pages.kv_layout("m|x", tp_rank=1, tp_size=2)
    assert (layout.num_layers, layout.block_size, layout.dtype) == (3, PAGE, "bfloat16")
    assert layout.bytes_per_block == layout.min_bytes_per_block()


def test_unknown_config_keys_fail_at_start(daemon: Any) -> None:
    sglang_env.import_sglang()
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    from tests.connectors.sglang.conftest import extra_config

    cfg = sglang_env.storage_config(extra_config(daemon.endpoint, timeout_msec=5))
    with pytest.raises(ValueError, match="unknown TokenCake backend keys"):
        StorageBackendFactory.create_backend("dynamic", cfg, None)


def test_down_daemon_is_a_miss_and_a_dropped_write(make_backend: Any, tmp_sock: str) -> None:
    pool = sglang_env.host_pool()
    backend = make_backend(pool, endpoint=tmp_sock, timeout_ms=20, reconnect_s=3600)
    idx = pool.alloc(2 * PAGE)
    ks = keys(0, 1, prefix="down")
    assert backend.batch_exists(ks) == 0
    assert backend.batch_set_v1(ks, idx) == [False, False]
    assert backend.batch_get_v1(ks, idx) == [False, False]
    assert not backend.exists(ks[0]) and backend.batch_get(ks) == [None, None]
    assert backend.stats.dropped_writes == 2
    # Registration was tried once (at register_mem_pool_host); the link stays down until
    # reconnect_s passes, so none of the calls above waited for the missing daemon.
    assert backend.stats.daemon_failures == 0 and backend._link.reg is None


def test_daemon_restart_is_survived(make_backend: Any, tmp_path: Any) -> None:
    d = start(tmp_path, arena="1MiB")
    pool = sglang_env.host_pool()
    try:
        backend = make_backend(pool, endpoint=d.endpoint, timeout_ms=500, reconnect_s=0.01)
        idx = pool.alloc(2 * PAGE)
        fill(pool, idx, seed=6)
        ks = keys(0, 1, prefix="restart")
        assert backend.batch_set_v1(ks, idx) == [True, True]
        d.kill9()
        d = start(tmp_path, arena="1MiB", endpoint=d.endpoint)
        # The new daemon forgot the engine and the pages: the backend re-registers, maps the
        # new arena, and what it had stored is a miss, never wrong bytes.
        # (Until ZMQ has reconnected, the daemon is down to the backend: a miss as well.)
        assert backend.batch_exists(ks) == 0
        assert backend.batch_get_v1(ks, pool.alloc(2 * PAGE)) == [False, False]
        for _ in range(200):
            if backend.batch_set_v1(ks, idx) == [True, True]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the backend never came back to the restarted daemon")
        assert backend.batch_exists(ks) == 2
        assert backend.stats.reconnects >= 1
    finally:
        d.stop()


def test_sglangs_three_storage_threads_at_once(make_backend: Any) -> None:
    """Prefetch queries, prefetch reads and backups run in three threads in SGLang."""
    pool = sglang_env.host_pool(device_tokens=256)
    backend = make_backend(pool)
    base = pool.alloc(4 * PAGE)
    fill(pool, base, seed=8)
    stored = keys(0, 1, 2, 3, prefix="threads-base")
    assert backend.batch_set_v1(stored, base) == [True] * 4
    want = pages_of(pool, base)
    errors: list[str] = []

    def backups() -> None:
        for i in range(30):
            if backend.batch_set_v1(keys(i, prefix="threads-w"), base[:PAGE]) != [True]:
                errors.append(f"backup {i}")

    def queries() -> None:
        for i in range(30):
            if backend.batch_exists(stored) != 4:
                errors.append(f"query {i}")

    def reads() -> None:
        dst = pool.alloc(4 * PAGE)
        for i in range(30):
            if backend.batch_get_v1(stored, dst) != [True] * 4:
                errors.append(f"read {i}")
            elif not all(torch.equal(a, b) for a, b in zip(pages_of(pool, dst), want, strict=True)):
                errors.append(f"read {i} bytes")

    threads = [threading.Thread(target=f) for f in (backups, queries, reads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert backend.stats.daemon_failures == 0 and backend.stats.dropped_writes == 0


def test_a_forgotten_engine_registers_again_within_the_call(make_backend: Any, daemon: Any) -> None:
    """The daemon drops an engine that went quiet (engine_timeout_s); SGLang has no step hook
    to heartbeat from, so the next storage call registers again and is served."""
    pool = sglang_env.host_pool()
    backend = make_backend(pool)
    idx = pool.alloc(2 * PAGE)
    fill(pool, idx, seed=9)
    ks = keys(0, 1, prefix="forgotten")
    assert backend.batch_set_v1(ks, idx) == [True, True]
    with daemon.client() as client:
        client.call(p.UnregisterEngine(backend._link.engine_id))  # as the daemon's timeout does
    assert backend.batch_exists(ks) == 2
    assert backend.batch_get_v1(ks, pool.alloc(2 * PAGE)) == [True, True]
    assert backend.stats.reconnects == 1


def test_pages_larger_than_the_daemons_slots_keep_the_backend_off(
    make_backend: Any, tmp_path: Any
) -> None:
    d = start(tmp_path, "--slot-bytes", "256", arena="1MiB")
    try:
        pool = sglang_env.host_pool()  # 512-byte pages
        backend = make_backend(pool, endpoint=d.endpoint, reconnect_s=3600)
        ks = keys(0, prefix="too-big")
        assert backend.batch_set_v1(ks, pool.alloc(PAGE)) == [False]
        assert backend.batch_exists(ks) == 0 and backend._link.reg is None
    finally:
        d.stop()


def test_a_stalled_daemon_costs_one_timeout(make_backend: Any, tmp_path: Any) -> None:
    """A daemon that stops answering (SIGSTOP) costs one timeout_ms wait; the calls after
    it do not wait at all until reconnect_s has passed."""
    d = start(tmp_path, arena="1MiB")
    try:
        pool = sglang_env.host_pool()
        backend = make_backend(pool, endpoint=d.endpoint, timeout_ms=100, reconnect_s=3600)
        idx = pool.alloc(2 * PAGE)
        fill(pool, idx, seed=10)
        ks = keys(0, 1, prefix="stalled")
        assert backend.batch_set_v1(ks, idx) == [True, True]
        os.kill(d.pid, signal.SIGSTOP)
        try:
            assert backend.batch_exists(ks) == 0  # waits timeout_ms, then the link is down
            assert backend.batch_get_v1(ks, idx) == [False, False]
            assert backend.batch_set_v1(keys(2, prefix="stalled"), idx[:PAGE]) == [False]
            assert backend.stats.daemon_failures == 1
            assert backend.stats.dropped_writes == 1
        finally:
            os.kill(d.pid, signal.SIGCONT)
    finally:
        d.stop()


def test_a_new_segment_under_the_old_name_is_mapped_afresh(
    make_backend: Any, tmp_path: Any
) -> None:
    """A restarted daemon can reuse its segment's name (same instance, and the same pid in a
    container); the backend tells segments apart by inode and never keeps a stale mapping."""
    from tokencake.segment import segment_path

    d = start(tmp_path, arena="1MiB")
    try:
        backend = make_backend(sglang_env.host_pool(), endpoint=d.endpoint)
        link = backend._link
        old = link.arena
        path = segment_path(link.reg.arena_name)
        size = os.path.getsize(path)
        os.unlink(path)  # what the old daemon's exit leaves for the new one
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        with d.client() as client:
            client.call(p.UnregisterEngine(link.engine_id))  # the new daemon does not know us
        assert backend.batch_exists(keys(0, prefix="inode")) == 0
        assert link.arena is not old and link.retired == [old]
        assert link.arena_ident == (os.stat(path).st_dev, os.stat(path).st_ino)
    finally:
        d.stop()
