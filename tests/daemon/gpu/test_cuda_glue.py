"""``CudaDevice``'s CUDA IPC glue without a GPU: torch's ``reduce_tensor`` and
``rebuild_cuda_tensor`` are replaced by stand-ins that speak their real signature, so the
fields are checked to go out and come back under torch's own parameter names. Whether torch
then opens the handle on a GPU is for ``test_gpu_copy.py`` (not yet run on hardware)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tokencake.daemon.gpu.device import CudaDevice

torch = pytest.importorskip("torch")
reductions = pytest.importorskip("torch.multiprocessing.reductions")

SENT = {
    "tensor_cls": torch.Tensor,
    "tensor_size": torch.Size([4, 8]),
    "tensor_stride": (8, 1),
    "tensor_offset": 16,
    "storage_cls": torch.UntypedStorage,
    "dtype": torch.float16,
    "storage_device": 0,
    "storage_handle": b"mem-handle",
    "storage_size_bytes": 1 << 20,
    "storage_offset_bytes": 4096,
    "requires_grad": False,
    "ref_counter_handle": b"ref-file",
    "ref_counter_offset": 7,
    "event_handle": b"event-handle",
    "event_sync_required": True,
}


def _device(monkeypatch: pytest.MonkeyPatch, index: int) -> CudaDevice:
    dev = object.__new__(CudaDevice)  # no CUDA here: only the fields the glue reads
    dev.torch, dev.index = torch, index
    monkeypatch.setattr(CudaDevice, "uuid", lambda self: "GPU-0a1b")
    return dev


def test_export_then_open_round_trips_every_field_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    params = list(inspect.signature(reductions.rebuild_cuda_tensor).parameters)
    assert sorted(params) == sorted(SENT)  # torch's signature is what the glue relies on
    args = tuple(SENT[name] for name in params)
    monkeypatch.setattr(
        reductions, "reduce_tensor", lambda t: (reductions.rebuild_cuda_tensor, args)
    )
    shared = _device(monkeypatch, 0).export(object())
    assert (shared.kind, shared.device_uuid, shared.dtype) == ("cuda", "GPU-0a1b", "float16")
    assert (shared.shape, shared.stride, shared.offset) == ([4, 8], [8, 1], 16)
    assert (shared.handle, shared.storage_bytes, shared.storage_offset_bytes) == (
        b"mem-handle",
        1 << 20,
        4096,
    )
    assert (shared.ref_counter_handle, shared.ref_counter_offset) == (b"ref-file", 7)
    assert (shared.event_handle, shared.event_sync_required) == (b"event-handle", True)

    seen: dict[str, Any] = {}
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda **kw: seen.update(kw))
    _device(monkeypatch, 3).open(shared)  # the worker's index of the same GPU
    assert seen == {**SENT, "storage_device": 3}
