"""Input checks of the host store (``host_store.py``): every public method of the store runs
them on all of its input before it changes anything, so a refused call leaves the store
exactly as it was. Each check raises :class:`StoreError` with a wire error code."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokencake.daemon.slot_table import INT32_MAX
from tokencake.protocol import (
    MAX_HASH_BYTES,
    MAX_HASHES_PER_REQUEST,
    MAX_NAME_CHARS,
    ErrorCode,
    ProtocolError,
)


class StoreError(ProtocolError):
    """A refused store operation; ``code`` is one of :class:`tokencake.protocol.ErrorCode`."""


def is_int(value: object) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_owner(owner: int) -> None:
    if not is_int(owner) or not 0 <= owner <= INT32_MAX:
        raise StoreError(ErrorCode.BAD_REQUEST, f"bad owner id {owner!r}")


def check_layout(layout: int, num_layouts: int) -> None:
    if not is_int(layout) or not 0 <= layout < num_layouts:
        raise StoreError(ErrorCode.BAD_REQUEST, f"unknown layout id {layout!r}")


def check_salt(salt: str) -> None:
    if not isinstance(salt, str) or len(salt) > MAX_NAME_CHARS:
        raise StoreError(ErrorCode.BAD_REQUEST, "salt must be a string of <= 256 chars")


def check_hashes(hashes: Sequence[bytes]) -> None:
    if len(hashes) > MAX_HASHES_PER_REQUEST:
        raise StoreError(ErrorCode.BAD_REQUEST, f"more than {MAX_HASHES_PER_REQUEST} hashes")
    for h in hashes:
        if not isinstance(h, bytes) or not 0 < len(h) <= MAX_HASH_BYTES:
            raise StoreError(
                ErrorCode.BAD_REQUEST, f"hashes must be 1..{MAX_HASH_BYTES} bytes each"
            )
    if len(set(hashes)) != len(hashes):
        raise StoreError(ErrorCode.BAD_REQUEST, "duplicate hashes in one request")


def check_slots(slots: Sequence[int], num_slots: int) -> list[int]:
    """The slot ids as ints, each in range and none twice."""
    for s in slots:
        if not is_int(s) or not 0 <= s < num_slots:
            raise StoreError(ErrorCode.BAD_REQUEST, f"bad slot id {s!r}")
    out = [int(s) for s in slots]
    if len(set(out)) != len(out):
        raise StoreError(ErrorCode.BAD_REQUEST, "duplicate slot ids in one request")
    return out
