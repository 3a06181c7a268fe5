"""Client side of tokencaked: the Python client library, the agent session helper,
the engine-side arena helper and ``tokencake-ctl``."""
