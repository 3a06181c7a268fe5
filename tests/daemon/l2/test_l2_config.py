"""L2 settings: each bad value is a one-line ConfigError, and exit 2 from tokencaked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokencake.daemon.config import ConfigError, DaemonConfig, load_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"l2_backend": "memcached"}, "l2_backend must be empty or one of"),
        ({"l2_backend": "disk"}, "l2_backend disk needs l2_dir"),
        ({"l2_backend": "redis"}, "needs an l2_url redis://host:port"),
        ({"l2_backend": "redis", "l2_url": "http://x"}, "needs an l2_url"),
        ({"l2_mode": "write-around"}, "l2_mode must be write-back or write-through"),
        ({"l2_namespace": "a b"}, "l2_namespace must be alphanumeric"),
        ({"l2_workers": 0}, "l2_workers must be within 1..64"),
        ({"l2_batch": 5000}, "l2_batch within 1..4096"),
        ({"l2_timeout_s": 0.0}, "l2_timeout_s must be within"),
        ({"l2_retry_s": float("nan")}, "l2_retry_s must be within"),
        ({"l2_ttl_s": -1.0}, "l2_ttl_s must be >= 0"),
        ({"l2_disk_bytes": "lots"}, "l2_disk_bytes: not a size"),
        ({"l2_fetch_bytes_per_s": 0.0}, "l2_fetch_bytes_per_s must be a positive"),
        ({"l2_fetch_bytes_per_s": float("inf")}, "l2_fetch_bytes_per_s must be a positive"),
    ],
)
def test_bad_l2_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(environ={}, flags=overrides)
    assert "\n" not in str(err.value)


def test_good_l2_config_from_the_environment() -> None:
    cfg = load_config(
        environ={
            "TOKENCAKE_L2_BACKEND": "redis-cluster",
            "TOKENCAKE_L2_URL": "redis://10.0.0.1:7000,redis://10.0.0.2:7000",
            "TOKENCAKE_L2_MODE": "write-through",
            "TOKENCAKE_L2_QUEUE_BYTES": "64MiB",
            "TOKENCAKE_L2_FETCH_BYTES_PER_S": "1.25e8",
        }
    )
    assert cfg.l2_backend == "redis-cluster" and cfg.l2_queue_bytes == 64 << 20
    assert cfg.l2_fetch_bytes_per_s == 1.25e8
    assert DaemonConfig().l2_backend == ""  # off by default


def run_daemon(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
    full.update(env)
    return subprocess.run(
        [
            sys.executable, "-m", "tokencake.daemon",
            "--endpoint", f"ipc://{tmp_path}/d.sock",
            "--instance", "l2cfg",
            "--arena-bytes", "1MiB",
            "--metrics-port", "0",
            "--log-text",
        ],
        env=full, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_tokencaked_exits_2_on_a_bad_l2_setting(tmp_path: Path) -> None:
    r = run_daemon(tmp_path, {"TOKENCAKE_L2_BACKEND": "memcached"})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "l2_backend" in r.stderr
    assert "Traceback" not in r.stderr


def test_tokencaked_will_not_start_on_an_unusable_disk_tier(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    r = run_daemon(tmp_path, {"TOKENCAKE_L2_BACKEND": "disk", "TOKENCAKE_L2_DIR": str(blocker)})
    assert r.returncode == 1
    assert "cannot start" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
