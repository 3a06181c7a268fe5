"""Named plug-ins, found through entry points.

Each registry is an entry-point group: the built-ins are declared in the package's
``pyproject.toml`` (``[project.entry-points."tokencake.policies"]`` and friends), and a
third-party package adds its own the same way, with no fork and no import until the name is
used. ``register`` adds a name at run time (tests, notebooks); it wins over an entry point of
the same name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points


class Registry:
    """name -> ``"module:attribute"`` for one entry-point group; imports only on ``load``."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._declared: dict[str, str] | None = None
        self._registered: dict[str, str] = {}

    def _targets(self) -> dict[str, str]:
        if self._declared is None:
            declared: dict[str, str] = {}
            for ep in entry_points(group=self.group):
                declared.setdefault(ep.name, ep.value)
            self._declared = declared
        return {**self._declared, **self._registered}

    def register(self, name: str, target: str) -> None:
        """Add (or replace) ``name`` as ``"package.module:Attribute"``."""
        module, sep, attr = target.partition(":")
        if not (name and module and sep and attr):
            raise ValueError(f"{self.group}: give a name and 'module:Attribute', got {target!r}")
        self._registered[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets())

    def target(self, name: str) -> str | None:
        return self._targets().get(name)

    def load(self, name: str) -> object:
        """Import and return what ``name`` points at. ``KeyError`` for an unknown name."""
        target = self.target(name)
        if target is None:
            raise KeyError(name)
        module, _, attr = target.partition(":")
        obj: object = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
