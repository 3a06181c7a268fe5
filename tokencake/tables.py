"""Plain-text tables for the command-line tools, laid out by ``rich``.

Columns are separated by two spaces, with a header row and no borders, so the output reads
well in a terminal and stays easy to cut and grep; nothing wraps (a table wider than the
terminal is left for the terminal to wrap). No colour codes: the text goes through
``click.echo`` and into files as is.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

NO_WRAP_WIDTH = 10_000


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()
) -> str:
    """``rows`` under ``header``; the columns numbered in ``right`` are right-aligned."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="", expand=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    out = io.StringIO()
    console = Console(
        file=out, width=NO_WRAP_WIDTH, color_system=None, force_terminal=False, highlight=False
    )
    console.print(table, markup=False, crop=False)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
