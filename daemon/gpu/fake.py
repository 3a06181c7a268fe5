"""A FAKE device: the ``Device`` operations on CPU tensors, for tests on machines without a GPU.

It is not a GPU and proves nothing about DMA, streams or CUDA IPC on hardware. It lets the
code above the device run for real: the block mover's gathers, scatters and slot runs are
torch operations on CPU tensors instead of CUDA tensors; "device memory" is a shared-memory
file, so another process (the daemon's copy worker) can open an engine's tensors from their
exported handles and write into them; events complete after a set number of polls, so
callers must poll as they would on a GPU; a fault can be injected into the next event.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import weakref
from typing import Any, Literal

import numpy as np

from tokencake import protocol as p
from tokencake.gpu.device import Device, DeviceEvent, PinRegistry, address
from tokencake.gpu.mover import CopyError

SHM_DIR = "/dev/shm"
PREFIX = "tokencake-fakegpu-"
EVENT_PREFIX = b"fake-event:"


def _unlink(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    paths.clear()


class FakeEvent(DeviceEvent):
    """Done after ``polls`` queries (0: at once); ``fault`` makes it report a failed copy."""

    def __init__(self, polls: int, fault: str = "") -> None:
        self.remaining = polls
        self.fault = fault
        self.number = 0

    def query(self) -> bool:
        if self.fault:
            raise CopyError(f"fake device fault: {self.fault}")
        if self.remaining > 0:
            self.remaining -= 1
            return False
        return True

    def synchronize(self) -> None:
        if self.fault:
            raise CopyError(f"fake device fault: {self.fault}")
        self.remaining = 0


class FakeDevice(Device):
    """See the module docstring. ``polls``: queries before an event completes."""

    kind: Literal["cuda", "fake"] = "fake"
    registrations = 0  # how often host memory was really page-locked (once per mapping)

    def __init__(self, index: int = 0, polls: int = 0) -> None:
        import torch

        self.torch = torch
        self.index = index
        self.polls = polls
        self.pins = PinRegistry()  # per device here (CUDA's is per process): tests stay apart
        self.waited: list[bytes] = []  # IPC event handles copies were ordered after
        self.followed_compute = 0
        self._fault = ""
        self._events = itertools.count(1)
        self._files: dict[int, tuple[str, int]] = {}  # storage address -> (path, bytes)
        self._paths: list[str] = []
        # the files go when the device does, or at exit, whichever comes first
        weakref.finalize(self, _unlink, self._paths)
        self._maps: list[mmap.mmap] = []
        self._recorded: list[FakeEvent] = []
        self._compute = object()
        self.on_compute = 0  # events recorded on the compute stream (a lender's "after")

    # ------------------------------------------------------------------ memory

    def alloc(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zeroed "device" tensor in a shared-memory file that ``export`` can hand out."""
        nbytes = int(np.prod(shape)) * self.torch.empty(0, dtype=dtype).element_size()
        path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{id(self)}-{len(self._files)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._maps.append(mm)
        tensor = self.torch.frombuffer(mm, dtype=self.torch.uint8).view(dtype).view(shape)
        self._files[tensor.untyped_storage().data_ptr()] = (path, nbytes)
        self._paths.append(path)
        return tensor

    def export(self, tensor: Any) -> p.GpuKvTensor:
        found = self._files.get(tensor.untyped_storage().data_ptr())
        if found is None:
            raise CopyError("tensor was not allocated by this fake device (FakeDevice.alloc)")
        path, nbytes = found
        return p.GpuKvTensor(
            kind=self.kind,
            device_uuid=self.uuid(),
            handle=path.encode(),
            storage_bytes=nbytes,
            storage_offset_bytes=0,
            dtype=str(tensor.dtype).removeprefix("torch."),
            shape=list(tensor.shape),
            stride=list(tensor.stride()),
            offset=tensor.storage_offset(),
        )

    def open(self, shared: p.GpuKvTensor) -> Any:
        path = shared.handle.decode(errors="replace")
        if not path.startswith(os.path.join(SHM_DIR, PREFIX)) or "/" in path[len(SHM_DIR) + 1 :]:
            raise CopyError(f"not a fake device handle: {path[:80]!r}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise CopyError(f"cannot open the engine's KV tensor: {exc}") from None
        try:
            if os.fstat(fd).st_size != shared.storage_bytes:
                raise CopyError("the engine's KV tensor changed size")
            mm = mmap.mmap(fd, shared.storage_bytes)
        finally:
            os.close(fd)
        self._maps.append(mm)
        try:
            dtype = getattr(self.torch, shared.dtype)
            flat = self.torch.frombuffer(mm, dtype=self.torch.uint8).view(dtype)
            return flat.as_strided(shared.shape, shared.stride, shared.offset)
        except (AttributeError, RuntimeError, TypeError) as exc:
            raise CopyError(f"cannot open the engine's KV tensor: {exc}") from None

    def free(self) -> None:
        """Unlink the files this device allocated (tensors over them stay valid until unmapped)."""
        _unlink(self._paths)
        self._files.clear()

    # ------------------------------------------------------------------ streams and events

    def stream(self) -> Any:
        return object()

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(stream)

    def compute_stream(self) -> Any:
        return self._compute

    def follow_compute(self, stream: Any) -> None:
        self.followed_compute += 1

    def follow_ipc_event(self, stream: Any, handle: bytes) -> None:
        if not handle.startswith(EVENT_PREFIX):
            raise CopyError(f"not a fake event handle: {handle[:40]!r}")
        self.waited.append(handle)

    def record(self, stream: Any, interprocess: bool = False) -> DeviceEvent:
        event = FakeEvent(self.polls, self._fault)
        event.number = next(self._events)
        self.on_compute += stream is self._compute
        self._fault = ""
        self._recorded = [e for e in self._recorded if e.remaining > 0]
        self._recorded.append(event)
        return event

    def ipc_event_handle(self, event: DeviceEvent) -> bytes:
        assert isinstance(event, FakeEvent)
        return EVENT_PREFIX + str(event.number).encode()

    def inject_fault(self, what: str = "injected") -> None:
        """The next recorded event reports a failed copy."""
        self._fault = what

    def synchronize(self) -> None:
        for event in self._recorded:
            event.remaining = 0
        self._recorded.clear()

    # ------------------------------------------------------------------ host memory

    def pin_host(self, array: np.ndarray) -> None:
        if self.pins.acquire(address(array)):
            FakeDevice.registrations += 1

    def unpin_host(self, array: np.ndarray) -> None:
        self.pins.release(address(array))

    def host_tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(array)

    def upload_ids(self, ids: list[int]) -> Any:
        return self.torch.tensor(ids, dtype=self.torch.long)

    def owns(self, tensor: Any) -> bool:
        return bool(tensor.device.type == "cpu")

    def uuid(self) -> str:
        return f"fake-{self.index}"
