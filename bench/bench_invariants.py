"""The long random sweep of the scheduler's invariant property (moved out of the tests).

``tests/daemon/scheduler/test_properties.py`` runs a fixed, derandomized set of cases (and
every failure found so far, pinned as an ``@example``) so CI is deterministic. This script
draws many more cases from a seed and checks each with the same function
(``engine_model.check_random_workload``): every policy on the toy engine over random DAGs,
tool timings, GPU and host sizes. A failing case prints its arguments, ready to paste into
the test as an ``@example``.

    python bench/bench_invariants.py [--cases 2000] [--seed 0] [--workers 2] [--policy NAME]

Exit status: 0 when every case held, 1 when any failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

Case = tuple[str, int, int, int, int]


def draw_cases(n: int, seed: int, policies: list[str]) -> list[Case]:
    """The test's strategy ranges: seed, 1-12 apps, 60-300 GPU blocks, 0-400 host blocks."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for _ in range(n):
        args = (rng.randrange(2**32), rng.randint(1, 12), rng.randint(60, 300), rng.randint(0, 400))
        cases.extend((name, *args) for name in policies)
    return cases


def check(case: Case) -> str:
    """'' when the case held, else the failure in one line."""
    from bench.common.engine_model import check_random_workload

    try:
        check_random_workload(*case)
    except AssertionError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def main(argv: list[str] | None = None) -> int:
    from tokencake.daemon.scheduler import list_policies

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000, help="workloads drawn (x every policy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--policy", action="append", help="only this policy (repeatable)")
    args = ap.parse_args(argv)
    names = [p.name for p in list_policies()]
    policies = args.policy or names
    unknown = sorted(set(policies) - set(names))
    if unknown or args.cases < 1 or args.workers < 1:
        print(
            f"error: unknown policy {unknown}" if unknown else "error: --cases/--workers >= 1",
            file=sys.stderr,
        )
        return 2
    cases = draw_cases(args.cases, args.seed, policies)
    t0 = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for case, err in zip(cases, pool.map(check, cases, chunksize=16), strict=True):
            if err:
                failed += 1
                name, seed, n_apps, gpu, host = case
                print(
                    f"FAIL {name}: @example(seed={seed}, n_apps={n_apps}, gpu={gpu}, "
                    f"host={host})  {err}"
                )
    dt = time.perf_counter() - t0
    print(
        f"{len(cases)} cases ({args.cases} workloads x {len(policies)} policies), "
        f"{failed} failed, {dt:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
