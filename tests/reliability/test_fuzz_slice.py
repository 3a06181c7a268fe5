"""The fixed-seed slice of ``bench/bench_fuzz.py`` (which runs a million cases): the same
generator, the same checks on every case (one typed reply, the id echoed, never
``internal``, store invariants after a success, the whole daemon state unchanged after a
failure), a few thousand cases, and every op of ``protocol.REQUEST_TYPES`` reached, so an
op added to the protocol is fuzzed from the day it is added.
"""

from __future__ import annotations

import collections
import random
import tempfile
from pathlib import Path

import msgspec

from bench.common.fuzz_harness import FrameGen, InProcessDaemon, check_case
from tokencake import protocol as p

CASES = 3000
SEED = 15


def test_fixed_seed_slice_reaches_every_op_and_breaks_no_promise() -> None:
    reached: collections.Counter[str] = collections.Counter()
    rejected = 0
    with tempfile.TemporaryDirectory(prefix="tcfuzz-slice-") as tmp:
        ipd = InProcessDaemon(Path(tmp))
        try:
            ipd.seed()
            gen = FrameGen(random.Random(SEED), ipd)
            for i in range(CASES):
                if i % 200 == 0:
                    ipd.seed()
                _, frame = gen.frame()
                result = check_case(ipd, frame)  # raises CaseFailure on a broken promise
                rejected += not result.ok
                try:
                    op = msgspec.msgpack.decode(frame, type=p.Envelope).op
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    continue
                if op in p.REQUEST_TYPES:
                    reached[op] += 1
        finally:
            ipd.close()
    assert sorted(set(p.REQUEST_TYPES) - set(reached)) == []
    assert CASES // 2 < rejected < CASES  # most frames are hostile; some ops succeed


def test_a_refused_reserve_gives_its_agent_no_tag() -> None:
    """Found by the 1M-case run (case ~680k): a reserve naming a live agent, with too many
    or duplicate hashes, was refused (``bad_request``) after the agent had been given a
    slot-table tag: a refused op that changed the scheduler's state."""
    with tempfile.TemporaryDirectory(prefix="tcfuzz-tag-") as tmp:
        ipd = InProcessDaemon(Path(tmp))
        try:
            ipd.seed()
            eng = ipd.engine_id("eng")
            for hashes in ([b"h"] * (p.MAX_HASHES_PER_REQUEST + 1), [b"dup", b"dup"]):
                body = {"engine_id": eng, "hashes": hashes, "salt": "t1"}
                body |= {"app_id": "app", "agent_id": "code"}  # live, and not tagged yet
                frame = msgspec.msgpack.encode({"v": 1, "op": "reserve", "id": 7, "body": body})
                result = check_case(ipd, frame)  # CaseFailure if the state changed
                assert not result.ok and result.code == p.ErrorCode.BAD_REQUEST
        finally:
            ipd.close()
