"""The GPU data plane: copies between an engine's KV blocks and the daemon's arena.

- ``mover``: the copy interface (``BlockMover``, ``CopyHandle``) every copy path implements.
- ``device``: the device operations a copy needs (streams, events, page-locking, CUDA IPC),
  with CUDA through torch; ``fake`` implements the same operations on CPU tensors for tests.
- ``block_mover``: ``DeviceBlockMover``, the side-stream copy path, on either device.
- ``copy_worker`` / ``service`` / ``handlers``: the daemon's copy worker process per GPU (it
  opens engines' KV tensors through CUDA IPC), the daemon-side bookkeeping that drives it
  over ``wire`` frames, and the ops' handlers.

Engines use ``mover``, ``device`` and ``block_mover`` too; nothing here imports torch at
module level except the modules that run on a device, so the daemon itself never loads it.
"""
