"""Request ids: `req_` + 32 hex digits laid out as a UUIDv7 (RFC 9562), so they sort by time.

The ledger is keyed by request id. A random id (UUIDv4) lands anywhere in that index, so
every batch touches pages all over it and the cost of a write grows with the table; an id
that starts with its millisecond timestamp is appended at the index's right edge, whatever
the table's size. The remaining 74 bits come from `os.urandom`, so ids stay unique across
processes (forked workers included) and are not guessable.
"""

from __future__ import annotations

import os
import time

_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)
_RAND_A_SHIFT = 64  # 12 bits of randomness above the variant
_RAND_B_MASK = (1 << 62) - 1


def uuid7_int(now_ns: int | None = None) -> int:
    """A UUIDv7 as a 128-bit integer: 48-bit Unix milliseconds, version, variant, 74 random bits."""
    millis = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10))  # 80 bits; 74 are used
    return (
        (millis & 0xFFFF_FFFF_FFFF) << 80
        | _VERSION_AND_VARIANT
        | ((rand >> 62) & 0xFFF) << _RAND_A_SHIFT
        | (rand & _RAND_B_MASK)
    )


def new_request_id() -> str:
    """A new request id: `req_` + 32 lowercase hex digits, increasing with time (ms)."""
    return f"req_{uuid7_int():032x}"


def request_id_at(moment_ns: int) -> str:
    """A request id as if made at `moment_ns` (Unix nanoseconds): for back-filled data."""
    return f"req_{uuid7_int(moment_ns):032x}"
