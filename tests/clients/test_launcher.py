"""The package's one launcher: a real tokencaked started, pinged and stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokencake import protocol as p
from tokencake.clients.launcher import LaunchError, daemon_flags, launch, running


def test_running_daemon_answers_and_stops_cleanly(tmp_path: Path) -> None:
    with running(*daemon_flags(arena="16MiB"), workdir=tmp_path) as d:
        with d.client() as c:
            assert c.call(p.Ping()).uptime_s >= 0
        assert d.socket_path.exists()
    assert d.proc.returncode == 0
    assert not d.socket_path.exists()
    assert "tokencaked stopped" in d.log()


def test_daemon_that_cannot_start_is_a_typed_error_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match=r"(?s)exited 2:.*unknown policy 'nope'"):
        launch(*daemon_flags(arena="16MiB", policy="nope"), workdir=tmp_path)


def test_settings_come_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "tokencaked.toml"
    config.write_text('[tokencaked]\npolicy = "vllm"\narena_bytes = "16MiB"\nmetrics_port = 0\n')
    with running("--log-text", workdir=tmp_path, config_file=config) as d, d.client() as c:
        assert c.call(p.GetConfig()).config["policy"] == "vllm"
