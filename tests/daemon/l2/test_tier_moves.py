"""What the bridge tells the scheduler: whose blocks left the arena for L2 (by slot tag),
whose were evicted and lost (their write dropped), whose came back with an upload's
prefetch, and what each fetch took. In-process: a real
HostStore over a numpy arena and a real disk backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.daemon.l2.test_bridge import NBYTES, SALT, Host, chain


def put_tagged(h: Host, hashes: list[bytes], tag: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, (len(hashes), NBYTES), np.uint8)
    slots = h.store.reserve(7, h.layout, SALT, hashes, tag)
    for s, block in zip(slots, data, strict=True):
        h.rows[s, :NBYTES] = block
    h.store.commit(7, slots)


def test_evicted_blocks_are_reported_by_tag(tmp_path: Path) -> None:
    h = Host(tmp_path / "l2", 4)
    put_tagged(h, chain("a", 3), tag=11, seed=1)
    assert h.bridge.take_moves() is None
    put_tagged(h, chain("b", 3), tag=12, seed=2)  # evicts two of tag 11's three
    moves = h.bridge.take_moves()
    assert moves is not None and moves.to_l2 == {11: 2}
    assert moves.to_host == [] and moves.fetches == []
    assert h.bridge.take_moves() is None  # taken once


def test_an_upload_prefetch_reports_the_agent_and_the_fetch(tmp_path: Path) -> None:
    h = Host(tmp_path / "l2", 4)
    x = chain("a", 3)
    put_tagged(h, x, tag=11, seed=1)
    h.bridge.remember("app", "agent", h.layout, SALT, x)
    put_tagged(h, chain("b", 4), tag=12, seed=2)  # all of x goes to L2
    h.bridge.take_moves()
    h.settle()
    assert h.bridge.upload("app", "agent")
    h.settle()
    moves = h.bridge.take_moves()
    assert moves is not None
    assert moves.to_host == [("app", "agent", 3)]
    ((nbytes, seconds, blocks),) = moves.fetches
    assert (nbytes, blocks) == (3 * NBYTES, 3) and seconds > 0
    assert moves.to_l2 == {12: 3}  # placing x evicted tag 12's blocks


def test_evicted_blocks_whose_write_is_dropped_are_reported_lost(tmp_path: Path) -> None:
    h = Host(tmp_path / "l2", 4, queue_bytes=0)  # no room in the write queue: every put drops
    put_tagged(h, chain("a", 3), tag=11, seed=1)
    put_tagged(h, chain("b", 3), tag=12, seed=2)  # evicts two of tag 11's three
    moves = h.bridge.take_moves()
    assert moves is not None and moves.lost == {11: 2} and moves.to_l2 == {}
    assert h.count("tokencake_l2_dropped_writes_total", reason="queue_full") == 2
