"""Fuzz tokencaked's protocol decoder and every op: >= 100k cases, nothing may crash.

Three phases, all bounded:

1. in-process (``--cases``, default 100,000): structure-aware frames (real ops, bodies
   mixing live engine ids, stored hashes and owned slots with wrong types, out-of-range
   numbers, oversized lists, unknown keys), byte-level mutations of valid requests (bit
   flips, truncation, insertion, splicing), and raw random bytes, through
   ``Daemon.handle_frame``. Each case checks: one reply that decodes, the request id
   echoed, a typed error code that is never ``internal``, store invariants after a success,
   and after a failure the whole daemon state (store, engines, registry, scheduler views,
   decisions) exactly as before.
2. real process (``--real``, default 5,000): the same frames over a private ipc socket to a
   tokencaked subprocess; each must get exactly one reply with the outcome the in-process
   shadow daemon gave, and the process must stay up with no ``internal`` errors.
3. atheris (``--atheris-runs``, default 20,000, 0 to skip; only if atheris is installed):
   coverage-guided byte inputs into the same checks, in a child process.

    python bench/bench_fuzz.py [--cases 100000] [--real 5000] [--atheris-runs 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.common.fuzz_harness import CaseResult
    from tokencake import protocol as p

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_CASES = 10_000_000
PROGRESS_EVERY = 50_000


def _op_of(frame: bytes) -> str | None:
    """The op a frame names, if it decodes as an envelope of a known op."""
    import msgspec

    from tokencake import protocol as p

    try:
        op = msgspec.msgpack.decode(frame, type=p.Envelope).op
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return op if op in p.REQUEST_TYPES else None


def _phase_in_process(
    cases: int, seed: int, tmp: Path
) -> tuple[int, int, int, dict[str, int], dict[str, list[int]]]:
    """Returns (cases, crashes, failed ops checked, outcome counts, op -> [ok, failed])."""
    from bench.common.fuzz_harness import CaseFailure, FrameGen, InProcessDaemon, check_case

    ipd = InProcessDaemon(tmp)
    ipd.seed()
    gen = FrameGen(random.Random(seed), ipd)
    crashes = checks = 0
    outcomes: collections.Counter[str] = collections.Counter()
    per_op: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    first: list[str] = []
    try:
        t0 = time.perf_counter()
        for i in range(cases):
            if i % PROGRESS_EVERY == 0 and i:
                rate = i / (time.perf_counter() - t0)
                print(f"  ... {i:,} cases, {crashes} crashes ({rate:,.0f}/s)", flush=True)
            if i % 200 == 0:
                ipd.seed()
            if i % 20000 == 19999:
                # A fresh daemon now and then, so the registry's bounded history does not
                # make every later case slower and coverage of early states is kept.
                ipd.close()
                ipd = InProcessDaemon(tmp)
                ipd.seed()
                gen = FrameGen(gen.rng, ipd)
            kind, frame = gen.frame()
            try:
                result = check_case(ipd, frame)
            except CaseFailure as exc:
                crashes += 1
                if len(first) < 5:
                    first.append(str(exc)[:400])
                continue
            outcomes[f"{kind}:{result.code or 'ok'}"] += 1
            if not result.ok:
                checks += 1
            op = _op_of(frame)
            if op is not None:
                per_op[op][0 if result.ok else 1] += 1
    finally:
        ipd.close()
    for line in first:
        print("  FAILURE", line)
    return cases, crashes, checks, dict(outcomes), dict(per_op)


class _RealSocket:
    """A DEALER socket to the tokencaked subprocess: one frame out, its reply in."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.endpoint = endpoint
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def roundtrip(self, frame: bytes) -> p.ReplyEnvelope | None:
        """The frame's reply (pushed decisions skipped); None after 10 s without one."""
        from tokencake import protocol as p

        self._sock.send(frame)
        while self._sock.poll(10000):
            env = p.decode_reply_envelope(self._sock.recv())
            if env.id != 0 or env.op != p.DECISION_PUSH_OP:
                return env
        return None

    def past_cap(self, frame: bytes) -> None:
        """Past the hard cap libzmq drops the peer without a reply, by design
        (docs/protocol.md): the daemon must stay up and answer a fresh client."""
        from tokencake import protocol as p
        from tokencake.clients.client import TokenCakeClient

        self._sock.send(frame)
        with TokenCakeClient(self.endpoint, timeout_s=10.0) as c:
            c.call(p.Ping())

    def internal_errors(self) -> int:
        from tokencake import protocol as p
        from tokencake.clients.client import TokenCakeClient

        with TokenCakeClient(self.endpoint) as c:
            return c.call(p.Stats()).errors.get("internal", 0)

    def close(self) -> None:
        self._sock.close()


def _mismatch(env: p.ReplyEnvelope, expected: CaseResult, frame: bytes, shown: int) -> int:
    """1 when the real daemon's outcome differs from the shadow's or is ``internal``
    (printed while fewer than 5 were shown), else 0."""
    code = env.error.code if env.error else ""
    if (env.ok, code) == (expected.ok, expected.code) and code != "internal":
        return 0
    if shown < 5:
        got = f"{env.op} ok={env.ok} {code} {env.error.message if env.error else ''}"
        print(f"  MISMATCH shadow ok={expected.ok} {expected.code}; real {got}")
        print(f"    frame {frame[:300]!r}")
    return 1


def _phase_real(frames: int, seed: int, tmp: Path) -> tuple[int, int, int, int]:
    """Returns (frames sent, replies, frames cut off at the hard cap, mismatches or internal
    errors)."""
    from bench.common.fuzz_harness import FrameGen, InProcessDaemon, check_case
    from tokencake.clients.launcher import daemon_flags, launch
    from tokencake.daemon.config import DaemonConfig
    from tokencake.daemon.transport import hard_frame_cap

    # The same arena size as the shadow's, so slot numbers mean the same on both sides.
    daemon_env = {"TOKENCAKE_ENGINE_TIMEOUT_S": "3600"}
    d = launch(*daemon_flags(arena="1MiB"), "--lease-s", "3600", workdir=tmp, env=daemon_env)
    shadow = InProcessDaemon(tmp)
    recorded = shadow.seed_recorded()
    hard_cap = hard_frame_cap(DaemonConfig().max_frame_bytes)  # the daemon runs the default
    real = _RealSocket(d.endpoint)
    replies = cut = bad = 0
    try:
        for frame in recorded:
            real.roundtrip(frame)
        gen = FrameGen(random.Random(seed + 1), shadow)
        for _ in range(frames):
            _, frame = gen.frame()
            expected = check_case(shadow, frame, compare_state=False)
            if len(frame) > hard_cap:
                real.past_cap(frame)
                cut += 1
                continue
            env = real.roundtrip(frame)
            if env is None:
                bad += 1
                print(f"  NO REPLY in 10 s to frame {replies + 1} ({len(frame)} bytes; shadow")
                print(f"    said ok={expected.ok} {expected.code}): {frame[:300]!r}")
                break
            replies += 1
            bad += _mismatch(env, expected, frame, bad)
        bad += real.internal_errors()
    finally:
        real.close()
        shadow.close()
        rc = d.stop()
    if rc != 0 or "Traceback" in d.log():
        bad += 1
    return frames, replies, cut, bad


_ATHERIS_CHILD = """
import sys, random, tempfile, atexit
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import atheris
with atheris.instrument_imports(include=["tokencake"]):
    from bench.common.fuzz_harness import FrameGen, InProcessDaemon, check_case
ipd = InProcessDaemon(Path(tempfile.mkdtemp(prefix="tcatheris-")))
ipd.seed()
count = [0]
atexit.register(lambda: print(f"atheris cases checked: {count[0]}", flush=True))

def one(data: bytes) -> None:
    count[0] += 1
    if count[0] % 200 == 0:
        ipd.seed()
    if data[:1] == b"\\x00" and len(data) >= 9:
        # Structure-aware: the input seeds the frame generator.
        frame = FrameGen(random.Random(data[1:9]), ipd).frame()[1]
    else:
        frame = data
    check_case(ipd, frame)

atheris.Setup([sys.argv[0], f"-runs={sys.argv[2]}", "-max_len=4096", "-seed=1"], one)
atheris.Fuzz()
"""


def _phase_atheris(runs: int) -> tuple[str, int]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "atheris not installed: skipped", 0
    proc = subprocess.run(
        [sys.executable, "-c", _ATHERIS_CHILD, str(REPO), str(runs)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    summary = next((line for line in tail if line.startswith("Done ")), "")
    checked = next((line for line in tail if line.startswith("atheris cases checked")), "")
    if proc.returncode != 0:
        print("\n".join(tail[-30:]))
    return f"{summary} {checked}".strip(), proc.returncode


def _print_reach(outcomes: dict[str, int], per_op: dict[str, list[int]]) -> list[str]:
    """The in-process cases by generator, by outcome and by op; returns the ops never
    reached."""
    from tokencake import protocol as p

    by_kind: dict[str, int] = collections.Counter()
    for key, n in outcomes.items():
        by_kind[key.split(":")[0]] += n
    print("  by generator: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_kind.items())))
    codes: dict[str, int] = collections.Counter()
    for key, n in outcomes.items():
        codes[key.split(":")[1]] += n
    print("  by outcome:   " + ", ".join(f"{k} {v:,}" for k, v in sorted(codes.items())))
    reached = f"{len(per_op)} of {len(p.REQUEST_TYPES)}"
    print(f"  ops of the protocol reached (decodable envelope): {reached}")
    for op in sorted(p.REQUEST_TYPES):
        ok_n, failed_n = per_op.get(op, [0, 0])
        print(f"    {op:<22} ok {ok_n:>9,}  rejected, state checked {failed_n:>9,}")
    return sorted(set(p.REQUEST_TYPES) - set(per_op))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--real", type=int, default=5_000)
    ap.add_argument("--atheris-runs", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not 0 < args.cases <= MAX_CASES or not 0 <= args.real <= MAX_CASES:
        ap.error(f"--cases must be within 1..{MAX_CASES} and --real within 0..{MAX_CASES}")
    import logging

    logging.disable(logging.CRITICAL)  # expected internal-path logs would drown the report
    tmp = Path(tempfile.mkdtemp(prefix="tcfuzz-"))
    os.environ.pop("TOKENCAKE_ENDPOINT", None)

    t0 = time.perf_counter()
    cases, crashes, checks, outcomes, per_op = _phase_in_process(args.cases, args.seed, tmp)
    t_in = time.perf_counter() - t0
    print(f"{'in-process cases run':<44}{cases:>12,}  ({cases / t_in:,.0f}/s)")
    print(f"{'  crashes / broken promises (must be 0)':<44}{crashes:>12,}")
    print(f"{'  failed ops, state-unchanged checks passed':<44}{checks:>12,}")
    print(f"{'  succeeded ops, store invariants checked':<44}{cases - checks - crashes:>12,}")
    missing = _print_reach(outcomes, per_op)
    if missing and args.cases >= 10_000:
        print(f"  OPS NEVER REACHED: {', '.join(missing)}")

    real_bad = 0
    if args.real:
        t0 = time.perf_counter()
        sent, replies, cut, real_bad = _phase_real(args.real, args.seed, tmp)
        print(f"{'real-process frames sent / replies':<44}{f'{sent:,} / {replies:,}':>12}")
        print(f"{'  cut off by the hard cap (no reply, by design)':<44}{cut:>12,}")
        label = "  mismatches vs shadow, internal, crashes"
        print(f"{label:<44}{real_bad:>12,}  ({time.perf_counter() - t0:.0f} s)")

    atheris_rc = 0
    if args.atheris_runs:
        t0 = time.perf_counter()
        summary, atheris_rc = _phase_atheris(args.atheris_runs)
        print(f"{'atheris':<44}{summary}  rc={atheris_rc} ({time.perf_counter() - t0:.0f} s)")

    covered = not missing or args.cases < 10_000
    ok = crashes == 0 and real_bad == 0 and atheris_rc == 0 and covered
    print("verdict: " + ("no crash, every failure typed, state unchanged" if ok else "FAILED"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
