"""The device operations a block copy needs, behind one small interface.

``CudaDevice`` implements them with torch's CUDA API. ``FakeDevice`` (``fake.py``) implements
the same operations on CPU tensors so the copy logic, the ownership protocol and the copy
worker can be tested on machines without a GPU. Only the operations are swapped; the copy
code that calls them (``block_mover.py``) is the same on both.

CUDA specifics, as torch exposes them:

- page-locking: ``cudaHostRegister`` through ``torch.cuda.cudart()``, once per mapping per
  process (registering one range twice is a CUDA error), undone before the unmap;
- IPC: ``torch.multiprocessing.reductions.reduce_tensor`` gives the fields of
  ``cudaIpcGetMemHandle`` plus torch's producer-side reference counter, and
  ``rebuild_cuda_tensor`` opens them in another process;
- events: ``torch.cuda.Event(interprocess=True)`` and ``Event.from_ipc_handle`` let a copy
  in another process wait for the engine's compute stream without the engine waiting.

UNTESTED ON HARDWARE: ``CudaDevice`` has never run on a GPU (see docs/vllm.md).
"""

from __future__ import annotations

import contextlib
import inspect
import mmap
import threading
from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np

from tokencake import protocol as p
from tokencake.gpu.mover import CopyError

# cudaHostRegisterPortable: the pinning is visible to every CUDA context of the process.
HOST_REGISTER_PORTABLE = 1


class DeviceEvent(ABC):
    @abstractmethod
    def query(self) -> bool:
        """True once the work recorded before it has finished."""

    @abstractmethod
    def synchronize(self) -> None: ...


class Device(ABC):
    """One accelerator as the copy code uses it. ``kind`` is ``"cuda"`` or ``"fake"``."""

    kind: Literal["cuda", "fake"]
    index: int

    @abstractmethod
    def stream(self) -> Any:
        """A side stream for copies, at the lowest priority, so compute kernels go first."""

    @abstractmethod
    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Work issued inside runs on ``stream``."""

    @abstractmethod
    def compute_stream(self) -> Any:
        """This process's compute stream (the one the engine's forward runs on)."""

    @abstractmethod
    def follow_compute(self, stream: Any) -> None:
        """``stream`` waits for the work issued on this process's compute stream so far."""

    @abstractmethod
    def follow_ipc_event(self, stream: Any, handle: bytes) -> None:
        """``stream`` waits for an event another process recorded (its IPC handle)."""

    @abstractmethod
    def record(self, stream: Any, interprocess: bool = False) -> DeviceEvent: ...

    @abstractmethod
    def ipc_event_handle(self, event: DeviceEvent) -> bytes:
        """The handle of an ``interprocess`` event, for ``follow_ipc_event`` elsewhere."""

    @abstractmethod
    def pin_host(self, array: np.ndarray) -> None:
        """Page-lock ``array`` for DMA, once per process however often it is asked."""

    @abstractmethod
    def unpin_host(self, array: np.ndarray) -> None: ...

    @abstractmethod
    def host_tensor(self, array: np.ndarray) -> Any:
        """A torch view of host memory (no copy)."""

    @abstractmethod
    def upload_ids(self, ids: list[int]) -> Any:
        """``ids`` as a long tensor on the device, copied on the current stream without
        making the host wait for it (a copy from pageable memory would)."""

    @abstractmethod
    def owns(self, tensor: Any) -> bool:
        """True when ``tensor`` lives on this device."""

    @abstractmethod
    def export(self, tensor: Any) -> p.GpuKvTensor:
        """The IPC description of ``tensor`` another process can open."""

    @abstractmethod
    def open(self, shared: p.GpuKvTensor) -> Any:
        """Open a tensor another process exported; raises ``CopyError`` when it cannot."""

    @abstractmethod
    def uuid(self) -> str:
        """A name of the device that is the same in every process (indexes are not)."""

    @abstractmethod
    def synchronize(self) -> None: ...


class PinRegistry:
    """Host ranges this process page-locked, with how many users each has."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}

    def acquire(self, address: int) -> bool:
        """Count one more user; True when this is the first (the caller registers it)."""
        with self._lock:
            n = self._users.get(address, 0)
            self._users[address] = n + 1
            return n == 0

    def release(self, address: int) -> bool:
        """Count one user less; True when it was the last (the caller unregisters it)."""
        with self._lock:
            n = self._users.get(address, 0)
            if n <= 1:
                self._users.pop(address, None)
                return n == 1
            self._users[address] = n - 1
            return False

    def __contains__(self, address: int) -> bool:
        return address in self._users


def address(array: np.ndarray) -> int:
    value: int = array.__array_interface__["data"][0]
    return value


def page_span(array: np.ndarray) -> tuple[int, int]:
    """(first byte, length) of the whole pages ``array`` lies on."""
    start = address(array) & ~(mmap.PAGESIZE - 1)
    end = -(-(address(array) + array.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    return start, end - start


class _CudaEvent(DeviceEvent):
    def __init__(self, event: Any) -> None:
        self.event = event

    def query(self) -> bool:
        try:
            return bool(self.event.query())
        except RuntimeError as exc:  # a device fault surfaces here
            raise CopyError(f"CUDA reported a failed copy: {exc}") from exc

    def synchronize(self) -> None:
        try:
            self.event.synchronize()
        except RuntimeError as exc:
            raise CopyError(f"CUDA reported a failed copy: {exc}") from exc


class CudaDevice(Device):
    """A CUDA GPU through torch. UNTESTED ON HARDWARE."""

    kind: Literal["cuda", "fake"] = "cuda"
    pins = PinRegistry()

    def __init__(self, index: int = 0) -> None:
        import torch

        if not torch.cuda.is_available():
            raise CopyError("torch.cuda.is_available() is False")
        self.torch = torch
        self.index = index
        self.device = torch.device("cuda", index)

    def stream(self) -> Any:
        low, _high = self.torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
        return self.torch.cuda.Stream(device=self.device, priority=low)

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return self.torch.cuda.stream(stream)

    def compute_stream(self) -> Any:
        return self.torch.cuda.current_stream(self.device)

    def follow_compute(self, stream: Any) -> None:
        stream.wait_stream(self.compute_stream())

    def follow_ipc_event(self, stream: Any, handle: bytes) -> None:
        event = self.torch.cuda.Event.from_ipc_handle(self.device, handle)
        stream.wait_event(event)

    def record(self, stream: Any, interprocess: bool = False) -> DeviceEvent:
        event = self.torch.cuda.Event(interprocess=interprocess)
        event.record(stream)
        return _CudaEvent(event)

    def ipc_event_handle(self, event: DeviceEvent) -> bytes:
        assert isinstance(event, _CudaEvent)
        handle: bytes = event.event.ipc_handle()
        return handle

    def pin_host(self, array: np.ndarray) -> None:
        if not self.pins.acquire(address(array)):
            return
        start, nbytes = page_span(array)  # the arena's slots start half a page in
        err = self.torch.cuda.cudart().cudaHostRegister(start, nbytes, HOST_REGISTER_PORTABLE)
        if int(getattr(err, "value", err)) != 0:
            self.pins.release(address(array))
            raise CopyError(f"cudaHostRegister failed: {err}")

    def unpin_host(self, array: np.ndarray) -> None:
        if self.pins.release(address(array)):
            self.torch.cuda.cudart().cudaHostUnregister(page_span(array)[0])

    def host_tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(array)

    def upload_ids(self, ids: list[int]) -> Any:
        # pinned: cudaMemcpyAsync from pageable memory first synchronizes the stream; torch's
        # host allocator keeps the pinned buffer until the copy has run
        host = self.torch.tensor(ids, dtype=self.torch.long, pin_memory=True)
        return host.to(self.device, non_blocking=True)

    def owns(self, tensor: Any) -> bool:
        return bool(tensor.device == self.device)

    def export(self, tensor: Any) -> p.GpuKvTensor:
        from torch.multiprocessing import reductions

        rebuild, args = reductions.reduce_tensor(tensor)
        # named as torch's own rebuild_cuda_tensor names them, not by position
        f = dict(zip(inspect.signature(rebuild).parameters, args, strict=True))
        return p.GpuKvTensor(
            kind=self.kind,
            device_uuid=self.uuid(),
            handle=f["storage_handle"],
            storage_bytes=f["storage_size_bytes"],
            storage_offset_bytes=f["storage_offset_bytes"],
            ref_counter_handle=f["ref_counter_handle"],
            ref_counter_offset=f["ref_counter_offset"],
            event_handle=f["event_handle"] or b"",
            event_sync_required=bool(f["event_sync_required"]),
            dtype=str(f["dtype"]).removeprefix("torch."),
            shape=list(f["tensor_size"]),
            stride=list(f["tensor_stride"]),
            offset=f["tensor_offset"],
        )

    def open(self, shared: p.GpuKvTensor) -> Any:
        from torch.multiprocessing import reductions

        try:
            return reductions.rebuild_cuda_tensor(
                tensor_cls=self.torch.Tensor,
                tensor_size=self.torch.Size(shared.shape),
                tensor_stride=tuple(shared.stride),
                tensor_offset=shared.offset,
                storage_cls=self.torch.UntypedStorage,
                dtype=getattr(self.torch, shared.dtype),
                storage_device=self.index,  # this process's index of the device
                storage_handle=shared.handle,
                storage_size_bytes=shared.storage_bytes,
                storage_offset_bytes=shared.storage_offset_bytes,
                requires_grad=False,
                ref_counter_handle=shared.ref_counter_handle,
                ref_counter_offset=shared.ref_counter_offset,
                event_handle=shared.event_handle or None,
                event_sync_required=shared.event_sync_required,
            )
        except (RuntimeError, AttributeError, TypeError) as exc:
            raise CopyError(f"cannot open the engine's KV tensor: {exc}") from exc

    def uuid(self) -> str:
        return str(self.torch.cuda.get_device_properties(self.device).uuid)

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)


def cuda_index_of(uuid: str) -> int:
    """This process's index of the GPU named ``uuid`` (CUDA_VISIBLE_DEVICES may renumber)."""
    import torch

    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise CopyError(f"no visible GPU has uuid {uuid}")
