"""Idempotency records for admin writes (`Idempotency-Key`, with Stripe's semantics).

A record is kept per key: the fingerprint of the first request that used it (method, path
and body) and, once that request has finished, its result. The same key with the same
fingerprint replays the result; with another fingerprint it is a conflict; while the first
request is still running it is a conflict too. Records live in the quota store (the one
truth every gateway replica shares), so a retry reaching another replica is recognised.

Top-ups write their record in the same atomic step as the balance change (the quota
stores' `topup(..., claim=...)`), so a top-up whose answer was lost (a timeout) and is
retried with the same key is never applied twice. Other writes claim the key first
(`begin`), run, then store the result (`finish`) or drop the claim (`abandon`) on failure.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Literal

import msgspec

#: How long a finished request's result is kept (Stripe keeps them 24 hours).
RESULT_KEEP_MS = 24 * 3_600_000
#: How long a claim of a request still running is kept (a process that dies holding one
#: frees the key after this).
PENDING_KEEP_MS = 60_000
#: The longest key accepted (Stripe's limit).
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Claim:
    """An idempotency key and the fingerprint of the request presenting it."""

    key: str
    fingerprint: str


class Stored(msgspec.Struct, omit_defaults=True):
    """A record as stored: `status` 0 while the first request runs."""

    f: str  # fingerprint
    s: int = 0  # HTTP status of the first result
    b: str = ""  # its body (JSON text)
    n: int | None = None  # a top-up's resulting balance (nanos)


ConflictKind = Literal["in_flight", "reused"]


class IdempotencyConflict(Exception):
    """The key is in use by a request still running, or was used with another request."""

    def __init__(self, kind: ConflictKind) -> None:
        self.kind = kind
        super().__init__(
            "A request with this Idempotency-Key is still being processed; retry later."
            if kind == "in_flight"
            else "This Idempotency-Key was already used with a different request."
        )


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and the body's JSON value."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted")
    except msgspec.DecodeError:
        canonical = body
    digest = hashlib.sha256(f"{method.upper()} {path}\n".encode() + canonical)
    return digest.hexdigest()


def check_key(key: str) -> str | None:
    """Why a presented key is unusable, or None."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return f"An Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters."
    if not key.isprintable():
        return "An Idempotency-Key must be printable text."
    return None


_decode = msgspec.json.Decoder(Stored).decode
_encode = msgspec.json.Encoder().encode


def decode_stored(raw: str | bytes) -> Stored:
    return _decode(raw)


def encode_stored(stored: Stored) -> str:
    return _encode(stored).decode()


def resolve(claim: Claim, raw: str | bytes | None) -> Stored | None:
    """The stored result to replay for `claim` (None: nothing stored, go ahead).

    Raises `IdempotencyConflict` for a request still running or another fingerprint.
    """
    if raw is None:
        return None
    stored = decode_stored(raw)
    if stored.f != claim.fingerprint:
        raise IdempotencyConflict("reused")
    if stored.s == 0:
        raise IdempotencyConflict("in_flight")
    return stored


class MemoryIdempotency:
    """Records for one process (the in-memory quota store's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._records: dict[str, tuple[float, str]] = {}  # key -> (expires, stored JSON)

    def get(self, key: str) -> str | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._records[key]
            return None
        return entry[1]

    def put(self, key: str, stored: Stored, keep_ms: int) -> None:
        if len(self._records) > 100_000:  # forget expired records now and then
            now = time.monotonic()
            self._records = {k: v for k, v in self._records.items() if v[0] > now}
        self._records[key] = (time.monotonic() + keep_ms / 1000, encode_stored(stored))

    def drop(self, key: str) -> None:
        self._records.pop(key, None)

    def begin(self, claim: Claim) -> Stored | None:
        with self.lock:
            stored = resolve(claim, self.get(claim.key))
            if stored is None:
                self.put(claim.key, Stored(claim.fingerprint), PENDING_KEEP_MS)
            return stored

    def finish(self, claim: Claim, status: int, body: str) -> None:
        with self.lock:
            self.put(claim.key, Stored(claim.fingerprint, status, body), RESULT_KEEP_MS)

    def abandon(self, claim: Claim) -> None:
        with self.lock:
            raw = self.get(claim.key)
            if raw is not None and decode_stored(raw) == Stored(claim.fingerprint):
                self.drop(claim.key)


#: Claim a key unless a record exists. KEYS: the record. ARGV: pending record, keep ms.
#: Returns the existing record, or false when the claim was made.
BEGIN_LUA = """
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

#: Drop a claim, only if it is still the pending one. KEYS: the record. ARGV: pending record.
ABANDON_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
