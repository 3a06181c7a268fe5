"""Every option of every command line, fed a bad value: one line on stderr, exit status 2.

The commands run in-process (click's ``CliRunner``); each bad value is refused before any
daemon is started or contacted. ``test_every_option_is_covered`` keeps the table honest:
an option added to a command without a bad value here fails it.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tokencake.clients import ctl, demo
from tokencake.daemon import cli as daemon_cli
from tokencake.sim import cli as sim_cli

COMMANDS: dict[str, click.Command] = {
    "tokencaked": daemon_cli.main,
    "tokencake-ctl": ctl.main,
    "tokencake-sim": sim_cli.main,
    "demo": demo.main,
}

# (command, subcommand, option, arguments). {tmp} is the test's temporary directory.
# tokencake-sim run needs --out, added to its cases unless the case is about --out.
BAD: list[tuple[str, str, str, list[str]]] = [
    ("tokencaked", "", "--config", ["--config", "{tmp}/missing.toml"]),
    ("tokencaked", "", "--config", ["--config", "{tmp}/bad.toml"]),
    ("tokencaked", "", "--endpoint", ["--endpoint", "http://localhost:1"]),
    ("tokencaked", "", "--arena-bytes", ["--arena-bytes", "12 parsecs"]),
    ("tokencaked", "", "--arena-bytes", ["--arena-bytes", "infGiB"]),
    ("tokencaked", "", "--slot-bytes", ["--slot-bytes", "-1"]),
    ("tokencaked", "", "--instance", ["--instance", "a/b"]),
    ("tokencaked", "", "--policy", ["--policy", "tokencak"]),
    ("tokencaked", "", "--policy", ["--policy", "tokencak", "--print-config"]),
    ("tokencaked", "", "--lease-s", ["--lease-s", "x"]),
    ("tokencaked", "", "--lease-s", ["--lease-s", "nan"]),
    ("tokencaked", "", "--metrics-port", ["--metrics-port", "70000"]),
    ("tokencaked", "", "--log-level", ["--log-level", "LOUD"]),
    ("tokencaked", "", "--log-json", ["--log-json=yes"]),
    ("tokencaked", "", "--print-config", ["--print-config=1"]),
    ("tokencaked", "", "--version", ["--version=1"]),
    ("tokencake-ctl", "", "--endpoint", ["--endpoint", "http://localhost:1", "status"]),
    ("tokencake-ctl", "", "--endpoint", ["--endpoint", "tcp://nohost", "status"]),
    ("tokencake-ctl", "", "--timeout", ["--timeout", "0", "status"]),
    ("tokencake-ctl", "", "--timeout", ["--timeout", "nan", "status"]),
    ("tokencake-ctl", "", "--bogus", ["--bogus", "status"]),
    ("tokencake-ctl", "status", "--json", ["status", "--json=1"]),
    ("tokencake-ctl", "engines", "--json", ["engines", "--json=1"]),
    ("tokencake-ctl", "agents", "--json", ["agents", "--json=1"]),
    ("tokencake-ctl", "apps", "--json", ["apps", "--json=1"]),
    ("tokencake-ctl", "pool", "--json", ["pool", "--json=1"]),
    ("tokencake-ctl", "config", "--json", ["config", "--json=1"]),
    ("tokencake-ctl", "decisions", "--json", ["decisions", "--json=1"]),
    ("tokencake-ctl", "decisions", "--limit", ["decisions", "--limit", "0"]),
    ("tokencake-ctl", "decisions", "--limit", ["decisions", "--limit", "x"]),
    ("tokencake-ctl", "policies", "--json", ["policies", "--json=1"]),
    ("tokencake-ctl", "top", "--interval", ["top", "--interval", "-1"]),
    ("tokencake-ctl", "top", "--interval", ["top", "--interval", "inf"]),
    ("tokencake-ctl", "top", "--iterations", ["top", "--iterations", "-1"]),
    ("tokencake-ctl", "top", "--json", ["top", "--json=1"]),
    ("tokencake-ctl", "gateway", "--url", ["gateway", "--url", "ftp://gateway:8100"]),
    ("tokencake-ctl", "gateway", "--json", ["gateway", "--json=1"]),
    ("tokencake-ctl", "", "COMMAND", ["stauts"]),
    ("tokencake-sim", "", "--verbose", ["--verbose=1", "list"]),
    ("tokencake-sim", "", "COMMAND", ["rnu"]),
    ("tokencake-sim", "list", "--bogus", ["list", "--bogus"]),
    ("tokencake-sim", "run", "--workload", ["run", "--workload", "nope"]),
    ("tokencake-sim", "run", "--workload", ["run", "--workload", "{tmp}/workload.toml"]),
    ("tokencake-sim", "run", "--workload", ["run", "--workload", "{tmp}/array.json"]),
    ("tokencake-sim", "run", "--workload", ["run", "--workload", "{tmp}/missing.json"]),
    ("tokencake-sim", "run", "--qps", ["run", "--qps", "0"]),
    ("tokencake-sim", "run", "--qps", ["run", "--qps", "0.1,x"]),
    ("tokencake-sim", "run", "--qps", ["run", "--qps", "nan"]),
    ("tokencake-sim", "run", "--policies", ["run", "--policies", "nope"]),
    ("tokencake-sim", "run", "--policies", ["run", "--policies", ","]),
    ("tokencake-sim", "run", "--out", ["run", "--out", "{tmp}/workload.toml"]),
    ("tokencake-sim", "run", "--out", ["run"]),
    ("tokencake-sim", "run", "--profile", ["run", "--profile", "a100"]),
    ("tokencake-sim", "run", "--gpu-mem-util", ["run", "--gpu-mem-util", "1.5"]),
    ("tokencake-sim", "run", "--seed", ["run", "--seed", "-1"]),
    ("tokencake-sim", "run", "--apps", ["run", "--apps", "0"]),
    ("tokencake-sim", "run", "--tool-noise", ["run", "--tool-noise", "pink"]),
    ("tokencake-sim", "run", "--noise-scale", ["run", "--noise-scale", "-0.1"]),
    ("tokencake-sim", "run", "--predict-error", ["run", "--predict-error", "inf"]),
    ("tokencake-sim", "run", "--no-hints", ["run", "--no-hints=1"]),
    ("tokencake-sim", "run", "--focus-qps", ["run", "--focus-qps", "0"]),
    ("tokencake-sim", "run", "--no-plots", ["run", "--no-plots=1"]),
    ("tokencake-sim", "run", "--engine-eviction", ["run", "--engine-eviction", "fifo"]),
    ("tokencake-sim", "run", "--live", ["run", "--live", "http://localhost:1"]),
    ("tokencake-sim", "run", "--live", ["run", "--live", "ipc://{tmp}/no-daemon.sock"]),
    ("tokencake-sim", "run", "--live-embedded", ["run", "--live-embedded=1"]),
    ("tokencake-sim", "run", "--live-embedded", ["run", "--live-embedded", "--live", "ipc://x"]),
    ("tokencake-sim", "run", "--time-scale", ["run", "--time-scale", "0"]),
    ("tokencake-sim", "cluster", "--workload", ["cluster", "--workload", "{tmp}/array.json"]),
    ("tokencake-sim", "cluster", "--apps", ["cluster", "--apps", "0"]),
    ("tokencake-sim", "cluster", "--qps", ["cluster", "--qps", "0"]),
    ("tokencake-sim", "cluster", "--hosts", ["cluster", "--hosts", "0"]),
    ("tokencake-sim", "cluster", "--lanes", ["cluster", "--lanes", "x"]),
    ("tokencake-sim", "cluster", "--host-gib", ["cluster", "--host-gib", "nan"]),
    ("tokencake-sim", "cluster", "--l2-gbps", ["cluster", "--l2-gbps", "0"]),
    ("tokencake-sim", "cluster", "--l2-latency-ms", ["cluster", "--l2-latency-ms", "-1"]),
    ("tokencake-sim", "cluster", "--l2-tib", ["cluster", "--l2-tib", "inf"]),
    (
        "tokencake-sim",
        "cluster",
        "--predictive-upload",
        ["cluster", "--predictive-upload=yes"],
    ),
    ("tokencake-sim", "cluster", "--profile", ["cluster", "--profile", "a100"]),
    ("tokencake-sim", "cluster", "--seed", ["cluster", "--seed", "-1"]),
    ("tokencake-sim", "cluster", "--json", ["cluster", "--json", "{tmp}"]),
    ("tokencake-sim", "cluster", "--json", ["cluster", "--json", "{tmp}/no/dir/rows.json"]),
    ("demo", "", "--apps", ["--apps", "0"]),
    ("demo", "", "--gpu-blocks", ["--gpu-blocks", "10"]),
    ("demo", "", "--keep", ["--keep=1"]),
]

# Options with no bad value: any string is a valid app or agent id (one the daemon does not
# know is its unknown_app reply, exit 4: tests/clients/test_ctl.py).
ANY_VALUE = {("tokencake-ctl", "agents", "--app"), ("tokencake-ctl", "decisions", "--agent")}


def _case_id(case: tuple[str, str, str, list[str]]) -> str:
    return " ".join(x for x in (case[0], case[1], *case[3]) if x)


@pytest.mark.parametrize("case", BAD, ids=[_case_id(c) for c in BAD])
def test_bad_value_is_one_line_and_exit_2(
    case: tuple[str, str, str, list[str]], tmp_path: Path
) -> None:
    command, sub, option, args = case
    (tmp_path / "bad.toml").write_text("lease_s = = 3\n")
    (tmp_path / "workload.toml").write_text('[apps]\nname = "x"\n')
    (tmp_path / "array.json").write_text("[1, 2]\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if command == "tokencake-sim" and sub == "run" and option != "--out":
        argv += ["--out", str(tmp_path / "out")]
    # No setting from the environment, and a private runtime dir: nothing here can reach
    # a daemon someone else runs.
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TOKENCAKE_")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    result = CliRunner(env=env).invoke(COMMANDS[command], argv, prog_name=command)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith(command), lines[0]
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize(
    ("command", "args"), [("tokencaked", []), ("tokencake-ctl", ["status"]), ("demo", [])]
)
def test_bad_endpoint_from_the_environment(command: str, args: list[str], tmp_path: Path) -> None:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TOKENCAKE_")}
    env.update(TOKENCAKE_ENDPOINT="http://localhost:1", XDG_RUNTIME_DIR=str(tmp_path))
    result = CliRunner(env=env).invoke(COMMANDS[command], args, prog_name=command)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "http://localhost:1" in lines[0], result.stderr


def _options(command: click.Command, prefix: str = "") -> set[tuple[str, str]]:
    out = {
        (prefix, param.opts[0] if param.opts[0].startswith("--") else param.opts[-1])
        for param in command.params
        if isinstance(param, click.Option) and param.name != "help"
    }
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            out |= _options(sub, name)
    return out


def test_every_option_is_covered() -> None:
    for name, command in COMMANDS.items():
        options = {(sub, opt) for sub, opt in _options(command)}
        covered = {(sub, opt) for cmd, sub, opt, _ in BAD if cmd == name}
        exempt = {(sub, opt) for cmd, sub, opt in ANY_VALUE if cmd == name}
        assert options - covered - exempt == set(), name


def test_every_option_has_help_and_no_cut_off_summary() -> None:
    for name, command in COMMANDS.items():
        commands = [("", command)]
        if isinstance(command, click.Group):
            commands += list(command.commands.items())
        for sub, cmd in commands:
            for param in cmd.params:
                if isinstance(param, click.Option) and not param.hidden:
                    assert param.help, f"{name} {sub} {param.opts[0]} has no help text"
        for args in (["-h"], *([sub, "-h"] for sub, _ in commands[1:])):
            result = CliRunner().invoke(command, args, prog_name=name)
            assert result.exit_code == 0, (name, args, result.output)
            # click cuts a command's summary in the list to fit, ending it with "..."
            cut = [line for line in result.output.splitlines()[1:] if line.endswith("...")]
            assert cut == [], (name, args, cut)
