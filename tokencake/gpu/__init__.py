"""What the GPU copy paths share, engine and daemon alike: the shared layer's GPU pieces.

- ``mover``: the copy interface (``BlockMover``, ``CopyHandle``) every copy path implements.
- ``device``: the device operations a copy needs (streams, events, page-locking, CUDA IPC),
  with CUDA through torch (``daemon/gpu/fake.py`` implements them on CPU tensors for tests).
- ``block_mover``: ``DeviceBlockMover``, the side-stream copy path, on either device.
- ``regions``: how an engine's KV tensors are cut into a slot's regions, and their order.

The vLLM worker (``connectors/vllm/``) copies with them in the engine's process; the daemon's
copy worker (``daemon/gpu/``) with them in its own. Nothing here imports torch at module
level except the modules that run on a device, so the daemon itself never loads it.
"""
