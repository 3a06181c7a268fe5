from __future__ import annotations

import subprocess
import sys

import pytest

from tokencake.daemon.scheduler import (
    Policy,
    PolicyConfig,
    UnknownPolicyError,
    create_policy,
    list_policies,
)
from tokencake.daemon.scheduler.policy import PolicyConfigError

EXPECTED = {
    "tokencake",
    "tokencake-temporal",
    "tokencake-spatial",
    "vllm",
    "lru-offload",
    "infercept",
    "continuum",
    "kvflow",
}


def test_every_policy_is_registered_and_constructs() -> None:
    names = {p.name for p in list_policies()}
    assert names == EXPECTED
    for name in names:
        policy = create_policy(name)
        assert isinstance(policy, Policy)
        assert policy.name == name


def test_unknown_policy_is_a_typed_error() -> None:
    with pytest.raises(UnknownPolicyError, match="registered"):
        create_policy("nope")


def test_listing_imports_no_policy_module() -> None:
    code = (
        "import sys\n"
        "from tokencake.daemon.scheduler import list_policies\n"
        "names = [p.to_dict()['name'] for p in list_policies()]\n"
        "assert 'tokencake.daemon.scheduler.baselines' not in sys.modules\n"
        "assert 'tokencake.daemon.scheduler.agent_aware' not in sys.modules\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(EXPECTED))


@pytest.mark.parametrize(
    "kwargs",
    [{"block_tokens": 0}, {"d2h_bytes_per_s": -1.0}, {"deadline_max_s": 1.0}, {"min_margin_s": -1}],
)
def test_bad_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(PolicyConfigError):
        PolicyConfig(**kwargs)  # type: ignore[arg-type]
