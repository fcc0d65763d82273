"""Sketch: a bounded, mergeable membership filter of category values (a Bloom filter).

A reference keeps its most frequent categories with their counts; the rest are only
"seen in training". To tell such a known-but-rare value from a value training never
saw, every training category is added to a Bloom filter stored with the reference.
Lookups answer "never seen" without error and "seen" with a false-positive rate
fixed at build time (`TARGET_FPR`, 0.1%, while the filter holds at most `MAX_BITS`
bits: 1 MiB, enough for 580,000 categories at that rate; past that the rate grows and
`false_positive_rate` reports it). Two filters of the same size merge by OR-ing their
bits, so baselines built in pieces combine exactly.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

TARGET_FPR = 1e-3
MAX_BITS = 1 << 23
_MIN_BITS = 1024


def _positions(key: str, m: int, k: int) -> list[int]:
    # Stable across processes (unlike hash()): two 64-bit halves of one BLAKE2b digest,
    # combined by double hashing (Kirsch & Mitzenmacher) into k bit positions.
    d = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little") | 1
    return [(h1 + i * h2) % m for i in range(k)]


class BloomFilter:
    """``m`` bits, ``k`` hash positions per key; ``items`` keys were added."""

    def __init__(self, m: int, k: int, bits: np.ndarray | None = None, items: int = 0):
        if m < 1 or k < 1:
            raise ValueError("a Bloom filter needs m >= 1 bits and k >= 1 hashes")
        self.m, self.k, self.items = int(m), int(k), int(items)
        self.bits = np.zeros(m, dtype=bool) if bits is None else np.asarray(bits, dtype=bool)
        if self.bits.size != self.m:
            raise ValueError(f"expected {self.m} bits, got {self.bits.size}")
        self._packed: bytes | None = None      # lookup copy, rebuilt after a change

    @classmethod
    def for_capacity(cls, n: int, fpr: float = TARGET_FPR, max_bits: int = MAX_BITS
                     ) -> BloomFilter:
        """Sized for ``n`` keys at false-positive rate ``fpr`` (capped at ``max_bits``)."""
        n = max(int(n), 1)
        need = math.ceil(-n * math.log(fpr) / math.log(2) ** 2)
        # a power of two: with an odd second hash, the k positions of a key are distinct
        m = min(max(1 << (need - 1).bit_length(), _MIN_BITS), max_bits)
        k = max(1, round(need / n * math.log(2)))
        return cls(m, min(k, 30))

    @classmethod
    def of(cls, keys: Iterable[str], fpr: float = TARGET_FPR) -> BloomFilter:
        keys = list(keys)
        bf = cls.for_capacity(len(keys), fpr)
        bf.update(keys)
        return bf

    def update(self, keys: Iterable[str]) -> None:
        positions = []
        n = 0
        for key in keys:
            positions += _positions(key, self.m, self.k)
            n += 1
        if positions:
            self.bits[np.asarray(positions, dtype=np.int64)] = True
            self._packed = None
        self.items += n

    def __contains__(self, key: Any) -> bool:
        # plain-Python bit tests on a packed copy: numpy scalar indexing costs ~10x more
        packed = self._packed
        if packed is None:
            packed = self._packed = np.packbits(self.bits, bitorder="little").tobytes()
        d = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        h1 = int.from_bytes(d[:8], "little")
        h2 = int.from_bytes(d[8:], "little") | 1
        m = self.m
        for i in range(self.k):
            p = (h1 + i * h2) % m
            if not packed[p >> 3] >> (p & 7) & 1:
                return False
        return True

    def contains_many(self, keys: list[str]) -> np.ndarray:
        """`key in self` for every key, the bit tests of all keys in a few numpy passes
        (one BLAKE2b per key stays; for a power-of-two `m`, as `for_capacity` makes, the
        positions modulo 2**64 give the same bits as Python's exact arithmetic)."""
        m = self.m
        if not keys or m & (m - 1):
            return np.fromiter((key in self for key in keys), bool, len(keys))
        blake = hashlib.blake2b
        d = np.frombuffer(b"".join(
            [blake(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
             for key in keys]), dtype="<u8").reshape(-1, 2)
        step = np.arange(self.k, dtype=np.uint64)
        pos = (d[:, :1] + step * (d[:, 1:] | np.uint64(1))) & np.uint64(m - 1)  # wraps
        return self.bits[pos.astype(np.intp)].all(axis=1)

    def merge(self, other: BloomFilter) -> BloomFilter:
        """The filter of both key sets (``items`` becomes an upper bound)."""
        if (self.m, self.k) != (other.m, other.k):
            raise ValueError("only Bloom filters of the same size and hash count merge")
        return BloomFilter(self.m, self.k, self.bits | other.bits, self.items + other.items)

    @property
    def false_positive_rate(self) -> float:
        """Chance that a key never added tests positive: (share of bits set) ** k."""
        return float(self.bits.mean()) ** self.k

    def to_json(self) -> dict[str, Any]:
        data = base64.b64encode(np.packbits(self.bits).tobytes()).decode("ascii")
        return {"bits": self.m, "hashes": self.k, "items": self.items,
                "false_positive_rate": self.false_positive_rate, "data": data}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BloomFilter:
        m, k = int(d["bits"]), int(d["hashes"])
        raw = np.frombuffer(base64.b64decode(d["data"], validate=True), dtype=np.uint8)
        if raw.size != (m + 7) // 8:
            raise ValueError(f"membership filter: {raw.size} bytes for {m} bits")
        return cls(m, k, np.unpackbits(raw)[:m].astype(bool), int(d.get("items", 0)))
