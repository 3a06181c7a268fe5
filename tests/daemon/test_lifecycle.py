"""Process-level behaviour of tokencaked: signals, systemd notify, metrics, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
import urllib.request
from pathlib import Path

from tests.conftest import start_daemon
from tokencake import protocol as p
from tokencake.layout import KvLayout

LAYOUT = KvLayout("m", 1, 32, 1, 32, "float16", 4096)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_socket_and_arena_are_private_and_removed_on_sigterm(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    with d.client() as c:
        arena = Path("/dev/shm") / c.call(p.RegisterEngine("e", LAYOUT)).arena_name
    assert stat.S_IMODE(d.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(arena.stat().st_mode) == 0o600
    assert arena.stat().st_uid == os.getuid()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert not d.socket_path.exists()
    assert not arena.exists()
    assert "tokencaked stopped" in d.log()


def test_sighup_reloads_safe_keys_only(tmp_path: Path) -> None:
    config = tmp_path / "tc.toml"
    config.write_text('[tokencaked]\nlease_s = 30.0\narena_bytes = "16MiB"\n')
    d = start_daemon(tmp_path, "--config", str(config))
    try:
        config.write_text('[tokencaked]\nlease_s = 7.5\narena_bytes = "32MiB"\n')
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        with d.client() as c:
            while c.call(p.GetConfig()).config["lease_s"] != 7.5:
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.05)
            # The arena cannot change size under mapped engines: it needs a restart.
            assert c.call(p.GetConfig()).config["arena_bytes"] == 16 << 20
        assert "arena_bytes" in d.log()  # reported as ignored until restart
    finally:
        assert d.stop() == 0


def test_systemd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(10)
    try:
        d = start_daemon(
            tmp_path, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
        )
        seen: list[str] = []
        while not any("WATCHDOG=1" in m for m in seen):
            seen.append(listener.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in seen)
        d.proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in seen):
            seen.append(listener.recv(4096).decode())
        assert d.proc.wait(10) == 0
    finally:
        listener.close()


def test_prometheus_metrics_on_loopback(tmp_path: Path) -> None:
    port = _free_port()
    d = start_daemon(tmp_path, "--metrics-port", str(port))
    try:
        with d.client() as c:
            eid = c.call(p.RegisterEngine("e", LAYOUT)).engine_id
            slots = c.call(p.Reserve(eid, [b"a"])).slots
            c.call(p.Commit(eid, slots))
            c.call(p.Lookup(eid, [b"a", b"b"]))
            c.call(p.Stats())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'tokencake_events_total{op="commit"} 1.0' in text
        assert 'tokencake_bytes_total{direction="offload"} 4096.0' in text
        assert 'tokencake_lookup_blocks_total{result="hit"} 1.0' in text
        assert 'tokencake_lookup_blocks_total{result="miss"} 1.0' in text
        assert "tokencake_transfer_seconds_bucket" in text
    finally:
        d.stop()


def test_second_daemon_on_same_socket_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    d = start_daemon(tmp_path)
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokencake.daemon",
                "--endpoint",
                d.endpoint,
                "--instance",
                "second",
                "--arena-bytes",
                "2MiB",
                "--metrics-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "another daemon" in second.stderr
        with d.client() as c:  # the first one is untouched
            assert c.call(p.Ping()).uptime_s > 0
        assert not any(
            p.name.startswith("tokencake-") and "-second-" in p.name
            for p in Path("/dev/shm").iterdir()
        )
    finally:
        d.stop()


def test_print_config_merges_file_env_and_flags(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "tc.toml"
    config.write_text('lease_s = 9.0\npolicy = "vllm"\narena_bytes = "2GiB"\n')
    env = dict(os.environ, TOKENCAKE_POLICY="kvflow", TOKENCAKE_LEASE_S="11")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokencake.daemon",
            "--config",
            str(config),
            "--lease-s",
            "12",
            "--print-config",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    merged = json.loads(out.stdout)
    assert merged["arena_bytes"] == 2 << 30  # file
    assert merged["policy"] == "kvflow"  # env over file
    assert merged["lease_s"] == 12.0  # flag over env
    bad = subprocess.run(
        [sys.executable, "-m", "tokencake.daemon", "--print-config"],
        env=dict(os.environ, TOKENCAKE_LEASE_S="soon"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "lease_s" in bad.stderr
