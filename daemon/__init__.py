"""tokencaked: the server loop, the host KV store and the scheduler brain.

Entry point: ``tokencake.daemon.cli:main`` (the ``tokencaked`` script).
"""
