"""The SGLang backend when the daemon dies in the middle of ``batch_set_v1``: after the
pages were reserved, while they are copied into the arena, before the commit.

(A daemon that is down before the call, that stalls, and that restarts between calls are
``test_backend.py``'s ``test_down_daemon_is_a_miss_and_a_dropped_write``,
``test_a_stalled_daemon_costs_one_timeout`` and ``test_daemon_restart_is_survived``.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench.common import sglang_env
from tests.connectors.sglang.test_backend import PAGE, fill, keys
from tests.procs import Proc, start

pytest.importorskip("torch")
pytest.importorskip("sglang", reason="sglang not installed (bash scripts/bootstrap.sh test)")


def _kill_during_the_copy(backend: Any, on_copy: Any) -> None:
    """Run ``on_copy`` (kill the daemon) when the backend starts copying into the arena."""
    pages = backend._pages
    original = pages.to_arena

    def to_arena(*args: Any, **kwargs: Any) -> Any:
        on_copy()
        return original(*args, **kwargs)

    pages.to_arena = to_arena


@pytest.mark.parametrize("replaced", [False, True], ids=["stays-down", "replaced"])
def test_daemon_killed_during_batch_set_v1(
    make_backend: Any, tmp_path: Path, replaced: bool
) -> None:
    """kill -9 between the reserve and the commit: every page of the call is False (SGLang
    must not count them stored), the engine does not stall, and nothing of the call is ever
    served: the daemon that comes back (a new one on the same socket) has none of it, and
    a commit meant for the dead daemon never lands in the new one."""
    d = start(tmp_path, arena="1MiB")
    daemons: list[Proc] = [d]
    try:
        pool = sglang_env.host_pool()
        backend = make_backend(pool, endpoint=d.endpoint, timeout_ms=300, reconnect_s=0.01)
        idx = pool.alloc(3 * PAGE)
        fill(pool, idx, seed=21)
        before = keys(0, prefix="kill-set")
        assert backend.batch_set_v1(before, idx[:PAGE]) == [True]

        def kill() -> None:
            daemons[-1].kill9()
            if replaced:
                daemons.append(start(tmp_path, arena="1MiB", endpoint=d.endpoint))

        _kill_during_the_copy(backend, kill)
        ks = keys(1, 2, prefix="kill-set")
        assert backend.batch_set_v1(ks, idx[PAGE:]) == [False, False]
        assert backend.stats.dropped_writes == 2
        if not replaced:
            daemons.append(start(tmp_path, arena="1MiB", endpoint=d.endpoint))
        backend._pages.to_arena = type(backend._pages).to_arena.__get__(backend._pages)
        out = pool.alloc(3 * PAGE)
        for _ in range(200):  # until ZMQ has reconnected and the backend re-registered
            if backend.batch_set_v1(keys(9, prefix="kill-probe"), idx[:PAGE]) == [True]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the backend never came back to the new daemon")
        assert backend.batch_exists(before + ks) == 0
        assert backend.batch_get_v1(before + ks, out) == [False, False, False]
    finally:
        for proc in daemons:
            proc.stop()
