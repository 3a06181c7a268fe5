"""Where tokencaked listens by default: the one place the daemon and its clients agree on it."""

from __future__ import annotations

import os
from pathlib import Path


def default_runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/tokencake``, else ``/run/tokencake`` for root, else a per-user /tmp."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "tokencake"
    if os.geteuid() == 0:
        return Path("/run/tokencake")
    return Path(f"/tmp/tokencake-{os.geteuid()}")


def default_endpoint() -> str:
    return f"ipc://{default_runtime_dir() / 'tokencaked.sock'}"
