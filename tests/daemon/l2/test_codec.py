"""Keys and sealed values: a torn, damaged or foreign value never opens."""

from __future__ import annotations

import pytest

from tokencake.daemon.l2.codec import (
    HEADER_BYTES,
    CorruptValue,
    block_key,
    key_prefix,
    open_value,
    seal,
)

PAYLOAD = bytes(range(256)) * 64
KEY = block_key(key_prefix("ns", "fp1", "salt"), b"\x01" * 32)


def test_round_trip() -> None:
    assert bytes(open_value(KEY, seal(KEY, PAYLOAD))) == PAYLOAD
    assert bytes(open_value(KEY, seal(KEY, b""))) == b""


def test_keys_follow_the_host_store_identity() -> None:
    h = b"\x01" * 32
    base = block_key(key_prefix("ns", "fp1", "salt"), h)
    others = [
        block_key(key_prefix("ns2", "fp1", "salt"), h),
        block_key(key_prefix("ns", "fp2", "salt"), h),
        block_key(key_prefix("ns", "fp1", "salt2"), h),
        block_key(key_prefix("ns", "fp1", "salt"), b"\x02" * 32),
    ]
    assert len({base, *others}) == 5
    assert b"salt" not in key_prefix("ns", "fp1", "salt")  # a digest, not the salt itself
    assert base == block_key(key_prefix("ns", "fp1", "salt"), h)  # same on every host


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda v: v[: len(v) - 1], "torn"),
        (lambda v: v[:HEADER_BYTES], "torn"),
        (lambda v: v[:10], "torn"),
        (lambda v: v + b"x", "torn"),
        (lambda v: v[:-1] + bytes([v[-1] ^ 1]), "checksum"),
        (
            lambda v: v[:HEADER_BYTES] + bytes([v[HEADER_BYTES] ^ 0x80]) + v[HEADER_BYTES + 1 :],
            "checksum",
        ),
        (lambda v: b"XXXX" + v[4:], "foreign"),
        (lambda v: b"plain redis string value, not ours at all....", "foreign"),
    ],
)
def test_damaged_values_do_not_open(damage: object, reason: str) -> None:
    value = seal(KEY, PAYLOAD)
    with pytest.raises(CorruptValue) as err:
        open_value(KEY, damage(value))  # type: ignore[operator]
    assert err.value.reason == reason


def test_a_value_under_another_key_is_foreign() -> None:
    other = block_key(key_prefix("ns", "fp1", "salt"), b"\x02" * 32)
    with pytest.raises(CorruptValue) as err:
        open_value(other, seal(KEY, PAYLOAD))
    assert err.value.reason == "foreign"
