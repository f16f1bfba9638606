"""Request ids: `req_` + 32 hex digits, a UUIDv7 underneath, sorting by the time they were made."""

from __future__ import annotations

import re
import time
import uuid

from billing.ids import new_request_id, request_id_at
from gateway.relay import new_request_id as relay_request_id

_FORMAT = re.compile(r"req_[0-9a-f]{32}")


def test_ids_keep_their_format_and_are_uuid7() -> None:
    for request_id in (new_request_id(), relay_request_id()):
        assert _FORMAT.fullmatch(request_id), request_id
        parsed = uuid.UUID(request_id[4:])
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        millis = int(request_id[4:16], 16)
        assert abs(millis - time.time_ns() // 1_000_000) < 60_000


def test_ids_made_later_sort_later_and_never_repeat() -> None:
    start = time.time_ns()
    earlier = [request_id_at(start + i * 1_000_000) for i in range(1000)]  # one per ms
    assert earlier == sorted(earlier)
    same_millisecond = {request_id_at(start) for _ in range(10_000)}
    assert len(same_millisecond) == 10_000
    assert all(request_id_at(start + 1_000_000) > other for other in same_millisecond)
