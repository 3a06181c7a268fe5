"""``tokencaked`` as a user starts it: bad settings refused by name, a busy socket found first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_daemon
from tokencake import protocol as p
from tokencake.daemon.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("file", "policy: unknown policy 'tokencak'"),
        ("env", "policy: unknown policy 'tokencak'"),
        ("flag", "policy: unknown policy 'tokencak'"),
    ],
)
def test_unknown_policy_is_a_config_error_naming_the_key(
    source: str, match: str, tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('policy = "tokencak"\n')
    with pytest.raises(ConfigError, match=match):
        load_config(
            path if source == "file" else None,
            environ={"TOKENCAKE_POLICY": "tokencak"} if source == "env" else {},
            flags={"policy": "tokencak"} if source == "flag" else {},
        )


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("arena_bytes = 1.5", "arena_bytes: not a size"),
        ("arena_bytes = true", "arena_bytes: not a size"),
        ('arena_bytes = "infGiB"', "arena_bytes: not a size"),
        ("lease_s = nan", "lease_s and engine_timeout_s must be positive and finite"),
        ("engine_timeout_s = inf", "lease_s and engine_timeout_s must be positive and finite"),
    ],
)
def test_sizes_and_durations_from_a_file(toml: str, match: str, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path, environ={})


def test_second_daemon_checks_the_socket_before_the_arena(tmp_path: Path) -> None:
    """The second daemon asks for an arena no filesystem here can hold: had it created the
    arena before looking at the socket, it would fail on the arena instead."""
    first = start_daemon(tmp_path)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokencake.daemon",
                "--endpoint",
                first.endpoint,
                "--instance",
                "second",
                "--arena-bytes",
                "64TiB",
                "--metrics-port",
                "0",
                "--log-text",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert second.returncode == 1, second.stderr
        assert "another daemon is serving" in second.stderr, second.stderr
        assert "arena" not in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        with first.client() as c:
            assert c.call(p.Ping()).uptime_s > 0
    finally:
        first.stop()
