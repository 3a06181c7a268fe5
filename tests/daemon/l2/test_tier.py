"""The tier's write path: a put copies the block before it returns (the arena slot is
reused at once), and what reaches the store is sealed. Real disk backend, in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokencake.daemon.l2.backends import DiskBackend
from tokencake.daemon.l2.codec import HEADER_BYTES, open_value
from tokencake.daemon.l2.tier import L2Tier


def test_put_copies_at_once_and_seals(tmp_path: Path) -> None:
    backend = DiskBackend(str(tmp_path), capacity_bytes=1 << 30)
    tier = L2Tier(backend, queue_bytes=1 << 20, workers=2, batch=3)
    try:
        rows = np.random.default_rng(3).integers(0, 256, (8, 5000), np.uint8)
        want = rows.copy()
        keys = [f"k{i}".encode() for i in range(9)]
        for i in range(8):
            assert tier.put(keys[i], rows[i, :4096])
            rows[i] = 0  # the slot is reused right away
        assert tier.put(keys[8], b"\x07" * 100)  # bytes as well as arena views
        assert tier.flush(30)
        values = backend.get_many(keys)
        for i, value in enumerate(values[:8]):
            assert value is not None and len(value) == HEADER_BYTES + 4096
            assert bytes(open_value(keys[i], value)) == want[i, :4096].tobytes()
        assert values[8] is not None and bytes(open_value(keys[8], values[8])) == b"\x07" * 100
        # Sent buffers are reused for later writes: a recycled one carries the new block.
        rows[:] = want
        for i in range(8):
            assert tier.put(keys[i], rows[7 - i, :4096])
        assert tier.flush(30)
        for i, value in enumerate(backend.get_many(keys[:8])):
            assert value is not None
            assert bytes(open_value(keys[i], value)) == want[7 - i, :4096].tobytes()
    finally:
        tier.close()
