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
