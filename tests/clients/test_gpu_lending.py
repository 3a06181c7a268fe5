"""The engine's side of the block-ownership protocol (``BlockLedger``), with a fake clock."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from tokencake.clients.gpu_lending import BlockBusy, BlockLedger, WorkerWatch


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_lent_block_is_not_lent_again_until_settled() -> None:
    ledger = BlockLedger(Clock())
    loan = ledger.lend([1, 2, 3], [10, 11, 12], "upload", worker_pid=7)
    assert ledger.is_lent(2) and ledger.running() == [loan.copy_id]
    with pytest.raises(BlockBusy):
        ledger.lend([3, 4], [13, 14], "offload", worker_pid=7)
    assert not ledger.is_lent(4)  # a refused loan lends nothing
    done = ledger.settle(loan.copy_id, ok=True)
    assert done is not None and done.blocks == (1, 2, 3) and done.ok
    assert ledger.settle(loan.copy_id, ok=True) is None  # settled once
    ledger.lend([3, 4], [13, 14], "offload", worker_pid=7)
    with pytest.raises(ValueError):
        ledger.lend([5, 5], [1, 2], "offload", worker_pid=7)


def test_orphans_wait_for_the_worker_or_the_deadline() -> None:
    clock = Clock()
    ledger = BlockLedger(clock)
    a = ledger.lend([1], [0], "upload", worker_pid=7)
    b = ledger.lend([2], [1], "upload", worker_pid=8)
    ledger.orphan_all()
    assert ledger.running() == [] and ledger.orphaned() == [a.copy_id, b.copy_id]
    clock.t += 29.0
    assert ledger.reap(30.0, lambda pid: False) == []  # may still be written
    assert ledger.is_lent(1) and ledger.is_lent(2)
    (gone,) = ledger.reap(30.0, lambda pid: pid == 8)  # worker 8 exited: no more writes
    assert gone.copy_id == b.copy_id and not gone.ok and not ledger.is_lent(2)
    clock.t += 1.0
    (late,) = ledger.reap(30.0, lambda pid: False)
    assert late.copy_id == a.copy_id and not late.ok and not ledger.is_lent(1)


def test_random_operations_keep_every_block_in_one_loan() -> None:
    """Against a model: a block is lent at most once, comes back exactly once, and never
    before its copy is reported over, its worker gone or the deadline passed."""
    rng = random.Random(13)
    clock = Clock()
    ledger = BlockLedger(clock)
    model: dict[int, tuple[set[int], float, int]] = {}  # copy -> (blocks, orphaned at, pid)
    for _ in range(3000):
        op = rng.random()
        if op < 0.4:
            blocks = rng.sample(range(32), rng.randint(1, 4))
            lent = set().union(*(m[0] for m in model.values())) if model else set()
            pid = rng.randint(1, 3)
            try:
                loan = ledger.lend(blocks, blocks, "offload", worker_pid=pid)
            except BlockBusy:
                assert lent.intersection(blocks)
                continue
            assert not lent.intersection(blocks)
            model[loan.copy_id] = (set(blocks), -1.0, pid)
        elif op < 0.6 and model:
            copy_id = rng.choice(list(model))
            settled = ledger.settle(copy_id, ok=rng.random() < 0.5)
            assert settled is not None and set(settled.blocks) == model.pop(copy_id)[0]
        elif op < 0.7:
            ledger.orphan_all()
            model = {c: (b, clock.t if t < 0 else t, w) for c, (b, t, w) in model.items()}
        elif op < 0.8:
            dead = {pid for pid in (1, 2, 3) if rng.random() < 0.3}
            for s in ledger.reap(10.0, dead.__contains__):
                back, orphaned, pid = model.pop(s.copy_id)
                assert orphaned >= 0 and (pid in dead or clock.t - orphaned >= 10.0)
                assert not s.ok and set(s.blocks) == back
            for _blocks, orphaned, pid in model.values():  # nothing due was left lent
                assert orphaned < 0 or (pid not in dead and clock.t - orphaned < 10.0)
        else:
            clock.t += rng.random() * 4
        lent_now = {b for b in range(32) if ledger.is_lent(b)}
        assert lent_now == (set().union(*(m[0] for m in model.values())) if model else set())


def test_worker_watch_sees_the_process_exit() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    watch = WorkerWatch(proc.pid)
    assert not watch.gone()
    assert proc.stdin is not None
    proc.stdin.close()  # as when the daemon dies: the worker's stdin ends
    proc.wait()
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd on this platform: the deadline decides")
    assert watch.gone()
    watch.close()
