"""The daemon's GPU copy worker: copies it runs between engines' KV blocks and its arena.

- ``copy_worker`` / ``service`` / ``handlers``: the daemon's copy worker process per GPU (it
  opens engines' KV tensors through CUDA IPC), the daemon-side bookkeeping that drives it
  over ``wire`` frames, and the ops' handlers.
- ``fake``: the device operations of ``tokencake/gpu/device.py`` on CPU tensors in shared
  memory files, for the tests and ``scripts/gpu-check.sh --dry-run``.

The copy interface, the device operations and the side-stream copy path the worker uses are
shared with the engines' connectors and live in ``tokencake/gpu/``.
"""
