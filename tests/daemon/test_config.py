from __future__ import annotations

from pathlib import Path

import pytest

from tokencake.daemon.config import ConfigError, DaemonConfig, load_config


def test_embedded_default_needs_no_file() -> None:
    cfg = load_config(environ={"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert cfg.arena_bytes == 1 << 30
    assert cfg.endpoint.startswith("ipc://") and cfg.endpoint.endswith("tokencaked.sock")


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[tokencaked]\narena_bytes = "256MiB"\nlease_s = 5\nlog_json = false\n')
    cfg = load_config(path, environ={"TOKENCAKE_LEASE_S": "6"}, flags={"policy": "vllm"})
    assert (cfg.arena_bytes, cfg.lease_s, cfg.policy, cfg.log_json) == (
        256 << 20,
        6.0,
        "vllm",
        False,
    )


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TOKENCAKE_ARENA_BYTES": "12 parsecs"}, "not a size"),
        ({"TOKENCAKE_LOG_JSON": "maybe"}, "log_json"),
        ({"TOKENCAKE_ENDPOINT": "tcp://127.0.0.1:5555"}, "curve"),
        ({"TOKENCAKE_ENDPOINT": "http://x"}, "ipc:// or tcp://"),
        ({"TOKENCAKE_ARENA_BYTES": "1KiB"}, "at least 1 MiB"),
        ({"TOKENCAKE_INSTANCE": "a/b"}, "instance"),
    ],
)
def test_bad_values_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(environ=env)


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("lease_s = = 3")
    with pytest.raises(ConfigError):
        load_config(path, environ={})


def test_with_overrides_validates() -> None:
    with pytest.raises(ConfigError):
        DaemonConfig().with_overrides({"lease_s": -1})


def test_unknown_env_names_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(environ={"TOKENCAKE_VENV": "/x", "TOKENCAKE_LEASE_S": "4"})
    assert cfg.lease_s == 4.0
    assert "TOKENCAKE_VENV" in caplog.text
    path = tmp_path / "c.toml"
    path.write_text("venv = 1\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "value"), [("yes", True), ("Off", False), (" 1 ", True), ("FALSE", False)]
)
def test_bool_words_from_the_environment(text: str, value: bool) -> None:
    assert load_config(environ={"TOKENCAKE_LOG_JSON": text}).log_json is value


def test_numbers_from_text_are_converted_and_trimmed() -> None:
    cfg = load_config(
        environ={"TOKENCAKE_LEASE_S": " 7.5 ", "TOKENCAKE_DECISION_HISTORY": "12"},
        flags={"metrics_port": "0"},
    )
    assert (cfg.lease_s, cfg.decision_history, cfg.metrics_port) == (7.5, 12, 0)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('lease_s = "soon"', "lease_s: expected float, got 'soon'"),
        ("decision_history = 2.5", "decision_history: expected int, got 2.5"),
        ("policy = 3", "policy: expected str, got 3"),
        ("log_json = 2", "log_json: expected bool, got 2"),
    ],
)
def test_wrong_types_name_the_key_and_value(toml: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == message


def test_unknown_flag_key_and_overrides_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'lease'"):
        load_config(environ={}, flags={"lease": 3})
    cfg = DaemonConfig().with_overrides({"lease_s": "9", "arena_bytes": "2GiB"})
    assert (cfg.lease_s, cfg.arena_bytes) == (9.0, 2 << 30)
