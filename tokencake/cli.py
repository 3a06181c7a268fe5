"""What every TokenCake command line shares: bad input is one line on stderr and exit 2.

click prints a usage error as four lines (usage, a hint, a blank line, the error). The
commands here (``tokencaked``, ``tokencake-ctl``, ``tokencake-sim``, the demo) use
:class:`Command` and :class:`Group` instead, which print it as one line that names the
command and points at its ``-h``::

    tokencake-sim run: Invalid value for '--qps': qps must be > 0 (tokencake-sim run -h)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
"""``context_settings`` that make ``-h`` work as ``--help`` (subcommands inherit it)."""


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line: ``<command>: <message> (<command> -h)``."""

    def __init__(self, message: str, path: str, ctx: click.Context | None = None) -> None:
        super().__init__(message, ctx)
        self.path = path

    def show(self, file: IO[Any] | None = None) -> None:
        message = " ".join(self.format_message().split())
        click.echo(f"{self.path}: {message} ({self.path} -h)", file=file, err=file is None)


def _one_line(exc: click.UsageError, path: str) -> OneLineUsageError:
    """``exc`` as one line, naming its command (``path`` when it came before a context)."""
    return OneLineUsageError(
        exc.format_message(), exc.ctx.command_path if exc.ctx else path or "error", exc.ctx
    )


class Command(click.Command):
    """A click command whose usage errors (parsing or raised by the callback) are one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            path = f"{parent.command_path} {info_name}" if parent else info_name or ""
            raise _one_line(exc, path) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _one_line(exc, ctx.command_path) from None


class Group(Command, click.Group):
    """A click group whose usage errors, and its subcommands', are one line."""

    command_class = Command
    group_class = type


class FloatRange(click.FloatRange):
    """click's ``FloatRange`` that also refuses ``nan`` and ``inf``, which compare as in range
    (``nan``) or would turn a timeout or an interval into a crash or a hang."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


POSITIVE = FloatRange(min=0, min_open=True)
"""A finite number > 0 (a rate, a size, a timeout)."""
NON_NEGATIVE = FloatRange(min=0)
"""A finite number >= 0."""


def option(
    decl: str | tuple[str, str], kind: click.ParamType, default: Any, help: str, **extra: Any
) -> Callable[[F], F]:
    """``click.option`` for a typed value, in one line: its default is shown unless None.
    ``decl`` is the option's name, or (name, parameter name)."""
    decls = (decl,) if isinstance(decl, str) else decl
    shown = extra.pop("show_default", default is not None)
    return click.option(*decls, type=kind, default=default, show_default=shown, help=help, **extra)


def is_endpoint(endpoint: str) -> bool:
    """``ipc://PATH`` or ``tcp://HOST:PORT``: what a client can connect to."""
    if endpoint.startswith("ipc://"):
        return len(endpoint) > len("ipc://")
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return endpoint.startswith("tcp://") and bool(host) and port.isdigit() and 0 < int(port) < 65536
