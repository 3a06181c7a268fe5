"""``tokencaked``: start the daemon (embedded default with no arguments)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from tokencake import __version__
from tokencake.cli import HELP_OPTIONS, Command
from tokencake.daemon.config import ConfigError, load_config

logger = logging.getLogger(__name__)


@click.command(cls=Command, context_settings=HELP_OPTIONS)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file (keys at top level or under [tokencaked]).",
)
@click.option("--endpoint", default=None, help="ZMQ endpoint, ipc://PATH or tcp://HOST:PORT.")
@click.option("--arena-bytes", default=None, help="Arena size, e.g. 1GiB.")
@click.option("--slot-bytes", default=None, help="Bytes per slot; 0 = first engine's block size.")
@click.option("--instance", default=None, help="Instance name (arena and metrics).")
@click.option("--policy", default=None, help="Scheduler policy (tokencake-ctl policies).")
@click.option("--lease-s", type=float, default=None, help="Slot lease in seconds.")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port on 127.0.0.1; 0=off.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--log-json/--log-text", default=None, help="JSON lines (default) or plain text.")
@click.option("--print-config", is_flag=True, help="Print the merged configuration and exit.")
@click.version_option(__version__)
def main(config_path: Path | None, print_config: bool, **flags: Any) -> None:
    """Run tokencaked, the agent-aware KV-cache sidecar.

    Settings come from the built-in defaults, then --config, then TOKENCAKE_* environment
    variables, then these flags.
    """
    try:
        config = load_config(config_path, flags=flags)
    except ConfigError as exc:
        click.echo(f"tokencaked: bad configuration: {exc}", err=True)
        sys.exit(2)
    if print_config:
        click.echo(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return

    from tokencake.daemon.logs import setup_logging
    from tokencake.daemon.server import Daemon, DaemonError

    setup_logging(config.log_level, config.log_json)
    daemon = Daemon(
        config,
        config_path=config_path,
        flag_overrides={k: v for k, v in flags.items() if v is not None},
    )
    try:
        daemon.start()
    except DaemonError as exc:
        logger.error("tokencaked cannot start: %s", exc)
        sys.exit(1)
    daemon.run()


if __name__ == "__main__":
    main()
