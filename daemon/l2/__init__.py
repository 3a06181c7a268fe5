"""The L2 tier: KV blocks beyond the host arena, in a store shared by many daemons.

``codec`` names blocks and seals their values, ``backends`` talks to a store (Redis, Redis
Cluster, Valkey, a local directory), ``tier`` moves values on worker threads behind bounded
queues, and ``bridge`` connects it all to the host store and the arena on the event loop.
"""
