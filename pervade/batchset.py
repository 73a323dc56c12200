"""An order-free digest of a set of batch ids, kept by the producer and the broker alike.

A producer counts what the broker accepted; the broker counts what it holds. Equal counts are not equal
sets (a job id reused for another sweep, state that lost some batches and gained others), so both also
keep this digest: the XOR of the first 128 bits of each id's sha256. It is updated in O(1) per batch,
needs no memory per batch, does not depend on arrival order, and two different sets collide with
probability 2^-128.
"""

from __future__ import annotations

import hashlib

#: Hex digits of a digest (the protocol's ``SetDigest``).
DIGEST_HEX = 32


def id_hash(batch_id: str) -> int:
    """What one id adds to (XORs into) a digest."""
    return int.from_bytes(hashlib.sha256(batch_id.encode()).digest()[: DIGEST_HEX // 2], "big")


class BatchSet:
    """Count and digest of a set of distinct batch ids and their pairs. Adding an id twice is the
    caller's mistake: each caller adds an id once, when it first accepts or stores it."""

    def __init__(self, batches: int = 0, pairs: int = 0, digest: str = "", digest_value: int = 0) -> None:
        """A set of ``batches`` ids with ``pairs`` pairs, digested as ``digest`` (hex), or as ``digest_value``
        (the number it stands for)."""
        self.batches = batches
        self.pairs = pairs
        self._value = int(digest, 16) if digest else digest_value

    def add(self, batch_id: str, pairs: int) -> None:
        self.batches += 1
        self.pairs += pairs
        self._value ^= id_hash(batch_id)

    @property
    def digest(self) -> str:
        return f"{self._value:0{DIGEST_HEX}x}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchSet):
            return NotImplemented
        return (self.batches, self.pairs, self._value) == (other.batches, other.pairs, other._value)

    def __repr__(self) -> str:
        return f"BatchSet(batches={self.batches}, pairs={self.pairs}, digest={self.digest!r})"
