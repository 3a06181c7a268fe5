"""L2 keys and sealed values.

A key names one block exactly as the host store does: the layout fingerprint, the tenant
salt and the block's chain hash, under a namespace that keeps deployments sharing one store
apart. The salt enters as a digest, so tenants' salts never appear in the store's keyspace.

A value is a 40-byte header and the block's bytes::

    magic "TCL2" | version u8 | 3 pad | payload length u64 | checksum u64 | key tag (16 bytes)

The key tag is a digest of the key the value was written under; the checksum is XXH3-64 of
the payload, seeded with the tag. A value cut short (a torn write), damaged, or written under
another key (a foreign value) fails :func:`open_value` and is never served. XXH3 runs at tens
of GB/s, so checking costs a few microseconds per block (CRC32 from zlib cost as much as the
network transfer itself). It guards against accidents, not against a writer with access to
the store: that store must be trusted (Redis ACLs).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

import xxhash

MAGIC: Final = b"TCL2"
VERSION: Final = 1
_HEADER: Final = struct.Struct("<4sB3xQQ16s")
HEADER_BYTES: Final = _HEADER.size
KEY_VERSION: Final = "v1"


class CorruptValue(ValueError):
    """A stored value that must not be served; ``reason`` is torn, foreign or checksum."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def salt_tag(salt: str) -> str:
    """Short digest of a tenant salt: the same salt gives the same key part on every host."""
    return hashlib.blake2b(salt.encode(), digest_size=8, person=b"tokencake-salt").hexdigest()


def key_prefix(namespace: str, fingerprint: str, salt: str) -> bytes:
    """Everything of a block's key but its chain hash; compute once per request."""
    return f"{namespace}:{KEY_VERSION}:{fingerprint}:{salt_tag(salt)}:".encode()


def block_key(prefix: bytes, chain_hash: bytes) -> bytes:
    return prefix + chain_hash.hex().encode()


def _key_tag(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16, person=b"tokencake-l2key").digest()


def _checksum(tag: bytes, payload: bytes | memoryview) -> int:
    # The hasher object, not the one-shot ``xxh3_64_intdigest``: it hashes without holding
    # the GIL (same value), so a worker's checksum never holds up the event loop.
    return xxhash.xxh3_64(payload, seed=int.from_bytes(tag[:8], "little")).intdigest()


def seal(key: bytes, payload: bytes | memoryview) -> bytes:
    """Header + payload, ready to store under ``key``."""
    tag = _key_tag(key)
    return _HEADER.pack(MAGIC, VERSION, len(payload), _checksum(tag, payload), tag) + payload


def seal_into(key: bytes, value: bytearray | memoryview) -> None:
    """Write the header into ``value[:HEADER_BYTES]``; the payload is already behind it.

    Lets a writer copy a block once, straight into the buffer that is sent."""
    tag = _key_tag(key)
    payload = memoryview(value)[HEADER_BYTES:]
    _HEADER.pack_into(value, 0, MAGIC, VERSION, len(payload), _checksum(tag, payload), tag)


def open_value(key: bytes, value: bytes) -> memoryview:
    """The payload of a value read under ``key``; raises :class:`CorruptValue` otherwise."""
    if len(value) < HEADER_BYTES:
        raise CorruptValue("torn", f"{len(value)} bytes is shorter than the header")
    magic, version, length, checksum, tag = _HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        raise CorruptValue("foreign", f"not a TokenCake v{VERSION} value")
    if len(value) - HEADER_BYTES != length:
        raise CorruptValue("torn", f"payload is {len(value) - HEADER_BYTES} bytes, not {length}")
    if tag != _key_tag(key):
        raise CorruptValue("foreign", "value was written under another key")
    payload = memoryview(value)[HEADER_BYTES:]
    if _checksum(tag, payload) != checksum:
        raise CorruptValue("checksum", "checksum mismatch")
    return payload
