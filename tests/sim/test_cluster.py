"""The N-host cluster model: token accounting, determinism, and what L2 and affinity change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tokencake.sim.cli import main
from tokencake.sim.cluster import ClusterConfig, ClusterResult, simulate
from tokencake.sim.profiles import DEFAULT_PROFILE, get_profile

PROFILE = get_profile(DEFAULT_PROFILE)
GIB = 2**30


def run(**kw: Any) -> ClusterResult:
    return simulate("code-writer", PROFILE, ClusterConfig(**kw), apps=30, qps=0.5, seed=3)


def test_every_prompt_token_is_accounted_once() -> None:
    r = run(hosts=4, host_bytes=2 * GIB)
    assert r.calls > 0 and r.apps == 30
    parts = r.host_hit_tokens + r.l2_hit_tokens + r.prefill_tokens
    assert parts == r.prompt_tokens


def test_same_seed_same_result() -> None:
    assert run(hosts=4, routing="random") == run(hosts=4, routing="random")


def test_one_big_host_needs_no_l2() -> None:
    r = run(hosts=1, host_bytes=1024 * GIB)
    assert r.l2_hit_tokens == 0 and r.l2_written_bytes == 0
    assert r.host_hit_tokens > 0  # agents' later calls reuse their earlier KV


def test_a_shared_l2_turns_prefill_into_fetches_when_hosts_are_small() -> None:
    without = run(hosts=4, host_bytes=1 * GIB, l2=False, routing="random")
    with_l2 = run(hosts=4, host_bytes=1 * GIB, l2=True, routing="random")
    assert with_l2.l2_hit_tokens > 0
    assert with_l2.prefill_tokens < without.prefill_tokens
    assert with_l2.prompt_tokens == without.prompt_tokens


def test_affinity_keeps_kv_on_its_host() -> None:
    rnd = run(hosts=8, host_bytes=64 * GIB, l2=False, routing="random")
    aff = run(hosts=8, host_bytes=64 * GIB, l2=False, routing="affinity")
    assert aff.host_hit_tokens > rnd.host_hit_tokens


@pytest.mark.parametrize(
    "bad", [{"hosts": 0}, {"lanes": 0}, {"l2_bytes_per_s": 0.0}, {"routing": "nearest"}]
)
def test_bad_config(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ClusterConfig(**bad).validate()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["cluster", "--apps", "12", "--hosts", "2", "--host-gib", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["routing"], r["l2"]) for r in rows] == [
        ("random", False),
        ("random", True),
        ("affinity", False),
        ("affinity", True),
    ]
    bad = CliRunner().invoke(main, ["cluster", "--hosts", "0"])
    assert bad.exit_code == 2
