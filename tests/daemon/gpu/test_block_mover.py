"""``DeviceBlockMover`` on the FAKE device: the CUDA path's copy logic (staging rows, slot
runs, chunks, K/V-first regions, pinning once, events, faults) on CPU tensors. What the fake
cannot show (DMA, stream overlap, real events) is untested until run on a GPU."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from tests.daemon.gpu.conftest import BLOCKS, NUM_SLOTS, SLOT, block_bytes, fake_kv
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.daemon.arena import Arena
from tokencake.daemon.gpu.fake import FakeDevice
from tokencake.gpu.block_mover import DeviceBlockMover, slot_runs
from tokencake.gpu.mover import CopyError
from tokencake.gpu.regions import block_regions

torch = pytest.importorskip("torch")


def _mover(device: FakeDevice, layers: list[Any], rows: int = 4, **kw: Any) -> DeviceBlockMover:
    return DeviceBlockMover(device, block_regions(layers, BLOCKS), stage_bytes=rows * SLOT, **kw)


@pytest.mark.parametrize("kv_first", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_round_trip_random_ids(
    mapping: ArenaMapping, device: FakeDevice, kv_first: bool, rows: int
) -> None:
    """Random blocks into random slots (runs and gaps) and back into other blocks."""
    rng = random.Random(rows * 2 + kv_first)
    layers = fake_kv(device, kv_first)
    mover = _mover(device, layers, rows)
    n = 20
    blocks = rng.sample(range(BLOCKS), n)
    slots = [*sorted(rng.sample(range(mapping.num_slots), n - 6)), 30, 31, 32, 33, 34, 35]
    slots = list(dict.fromkeys(slots))[:n]
    blocks = blocks[: len(slots)]
    want = {b: block_bytes(layers, b, kv_first) for b in blocks}
    mover.store(mapping, blocks, slots).wait()
    view = mapping.slots_view()
    for b, s in zip(blocks, slots, strict=True):
        assert bytes(view[s, : mover.bytes_per_block]) == want[b]
    free = [b for b in range(BLOCKS) if b not in blocks]
    targets = rng.sample(free, len(slots))
    handle = mover.load(mapping, slots, targets)
    handle.wait()
    assert handle.poll() and handle.copy_s is not None
    for b, t in zip(blocks, targets, strict=True):
        assert block_bytes(layers, t, kv_first) == want[b]
    mover.close()


def test_handle_done_only_after_the_event(mapping: ArenaMapping) -> None:
    """A copy is in flight until its event completes; the lender must keep polling."""
    device = FakeDevice(polls=3)
    mover = _mover(device, fake_kv(device))
    handle = mover.store(mapping, [1, 2], [5, 6])
    assert [handle.poll() for _ in range(4)] == [False, False, False, True]
    assert device.followed_compute == 1  # ordered after the engine's forward
    mover.close()
    device.free()


def test_after_event_orders_the_copy(mapping: ArenaMapping, device: FakeDevice) -> None:
    """The copy worker's mover follows the engine's IPC event, not a compute stream."""
    mover = _mover(device, fake_kv(device), follow_compute=False)
    event = device.record(mover.stream, interprocess=True)
    handle = device.ipc_event_handle(event)
    mover.store(mapping, [3], [4], after=handle).wait()
    assert device.waited == [handle] and device.followed_compute == 0
    with pytest.raises(CopyError):
        mover.store(mapping, [5], [6], after=b"not an event")
    mover.close()


def test_device_fault_is_a_failed_copy(mapping: ArenaMapping, device: FakeDevice) -> None:
    mover = _mover(device, fake_kv(device))
    device.inject_fault("dma error")
    handle = mover.store(mapping, [1], [1])
    with pytest.raises(CopyError, match="dma error"):
        handle.poll()
    mover.store(mapping, [1], [1]).wait()  # the next copy is a new event
    mover.close()


def test_bad_ids_refused_before_anything_moves(mapping: ArenaMapping, device: FakeDevice) -> None:
    mover = _mover(device, fake_kv(device))
    before = bytes(mapping.slots_view())
    for blocks, slots in [
        ([1, 2], [3]),
        ([BLOCKS], [0]),
        ([-1], [0]),
        ([1], [mapping.num_slots]),
        ([1, 2], [4, 4]),
        ([2, 2], [4, 5]),
    ]:
        with pytest.raises(CopyError):
            mover.store(mapping, blocks, slots)
        with pytest.raises(CopyError):
            mover.load(mapping, slots, blocks)
    assert bytes(mapping.slots_view()) == before


def test_arena_pinned_once_per_mapping(arena: Arena, device: FakeDevice) -> None:
    """Page-locked on first use, not again per copy or per mover; a new mapping of the same
    arena (the daemon restarted under the same name) is pinned afresh, the old one let go."""
    layers = fake_kv(device)
    first = ArenaMapping.open(arena.name, SLOT)
    a, b = _mover(device, layers), _mover(device, layers)
    before = FakeDevice.registrations
    for _ in range(3):
        a.store(first, [1], [2]).wait()
        b.store(first, [3], [4]).wait()
    assert FakeDevice.registrations == before + 1
    address = first.slots_view().__array_interface__["data"][0]
    for mover in (a, b):
        mover.release(first)
    assert address not in device.pins
    first.close()
    second = ArenaMapping.open(arena.name, SLOT)
    a.store(second, [1], [2]).wait()
    assert FakeDevice.registrations == before + 2
    a.close()
    b.close()
    second.close()


def test_tensors_off_the_device_are_refused(device: FakeDevice) -> None:
    meta = [torch.empty((BLOCKS, 8), dtype=torch.uint8, device="meta")]
    with pytest.raises(CopyError):
        DeviceBlockMover(device, meta)
    with pytest.raises(CopyError):
        block_regions([torch.zeros(BLOCKS, 4).t()])  # not contiguous


def test_slot_runs() -> None:
    assert slot_runs([]) == []
    assert slot_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]
    sizes = np.array([c for _s, c in slot_runs(list(range(NUM_SLOTS)))])
    assert sizes.tolist() == [NUM_SLOTS]
