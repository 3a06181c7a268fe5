"""``python -m tokencake.daemon`` is ``tokencaked``."""

from tokencake.daemon.cli import main

main()
