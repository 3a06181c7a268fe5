"""The KV layout an engine registers, and the fingerprint that keeps layouts apart.

Two engines may share host KV blocks only when every byte of a block means the same thing
to both: same model, same layer count, block size, head geometry, dtype and tensor-parallel
shard. The fingerprint is a hash over exactly those fields, so a block stored by one layout
can never be served to another.
"""

from __future__ import annotations

import hashlib

import msgspec

DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class LayoutError(ValueError):
    """A KV layout that cannot describe real engine blocks."""


class KvLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Geometry of one engine block, as seen by one TP rank.

    ``bytes_per_block`` is what the engine says one block of all layers occupies. It must be
    at least the K and V bytes the geometry implies; engines with padding may report more.
    """

    model_id: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    bytes_per_block: int
    device: str = "cpu"
    tp_rank: int = 0
    tp_size: int = 1

    def validate(self) -> None:
        if not self.model_id or len(self.model_id) > 256:
            raise LayoutError("model_id must be 1..256 characters")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if value <= 0 or value > 1 << 20:
                raise LayoutError(f"{name} must be in 1..{1 << 20}, got {value}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        if self.dtype not in DTYPE_BYTES:
            raise LayoutError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPE_BYTES)}")
        if self.bytes_per_block < self.min_bytes_per_block():
            raise LayoutError(
                f"bytes_per_block {self.bytes_per_block} is below the "
                f"{self.min_bytes_per_block()} bytes that K and V of all layers need"
            )
        if self.bytes_per_block > 1 << 34:
            raise LayoutError("bytes_per_block above 16 GiB")

    def min_bytes_per_block(self) -> int:
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim
        return per_layer * self.num_layers * DTYPE_BYTES[self.dtype]

    def fingerprint(self) -> str:
        """Hex digest over every field that changes the meaning of a block's bytes.

        ``device`` is left out on purpose: the same geometry on CPU and GPU holds the same
        bytes, so a block staged by a CPU engine may feed a GPU engine of the same layout.
        """
        canon = "|".join(
            str(part)
            for part in (
                "tokencake-layout-v1",
                self.model_id,
                self.num_layers,
                self.block_size,
                self.num_kv_heads,
                self.head_dim,
                self.dtype,
                self.bytes_per_block,
                self.tp_rank,
                self.tp_size,
            )
        )
        return hashlib.blake2b(canon.encode(), digest_size=16).hexdigest()
