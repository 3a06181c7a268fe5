"""``CudaDevice``'s CUDA IPC glue without a GPU: torch's ``reduce_tensor`` and
``rebuild_cuda_tensor`` are replaced by stand-ins that speak their real signature, so the
fields are checked to go out and come back under torch's own parameter names. Whether torch
then opens the handle on a GPU is for ``test_gpu_copy.py`` (not yet run on hardware)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tokencake.gpu.device import CudaDevice

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


class _Cudart:
    """Records ``cudaHostRegister``/``cudaHostUnregister`` instead of calling CUDA."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def cudaHostRegister(self, start: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", start, nbytes))
        return 0

    def cudaHostUnregister(self, start: int) -> int:
        self.calls.append(("unregister", start, 0))
        return 0


def test_pinning_covers_the_slots_pages_and_stays_inside_the_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The arena's slots start 2 KiB into the segment: the range page-locked is the whole
    pages they lie on, never past the mapping's end (the old ``register_pinned`` registered
    the mapping's size from 2 KiB in), and the same start is unregistered."""
    import mmap

    from tokencake.clients.kv_arena import ArenaMapping
    from tokencake.daemon.arena import Arena
    from tokencake.segment import SLOT_BASE_OFFSET

    cudart = _Cudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    dev = _device(monkeypatch, 0)
    monkeypatch.setattr(CudaDevice, "pins", type(CudaDevice.pins)())
    slot = 3 * mmap.PAGESIZE + 100  # slots that end mid-page
    arena = Arena.create(SLOT_BASE_OFFSET + 7 * slot, instance="pinspan")
    mapping = ArenaMapping.open(arena.name, slot)
    try:
        slots = mapping.slots_view()
        base = slots.__array_interface__["data"][0] - SLOT_BASE_OFFSET  # the mapping's start
        dev.pin_host(slots)
        dev.pin_host(slots)  # once per mapping per process
        ((what, start, nbytes),) = cudart.calls
        assert what == "register" and start == base  # the page the slots start on
        end = SLOT_BASE_OFFSET + 7 * slot
        assert nbytes == -(-end // mmap.PAGESIZE) * mmap.PAGESIZE  # the last slot's page, no more
        assert start + nbytes <= base + -(-mapping.size // mmap.PAGESIZE) * mmap.PAGESIZE
        dev.unpin_host(slots)
        assert len(cudart.calls) == 1  # another user still holds it
        dev.unpin_host(slots)
        assert cudart.calls[1] == ("unregister", start, 0)
        del slots
    finally:
        mapping.close()
        arena.close()
