"""The server-sent-event parser against the WHATWG EventSource parsing rules: every line
ending, comments, fields, multi-line data, a byte order mark, and any segmentation of the
bytes into reads (a CRLF split between two reads included)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from providers.sse import Event, SSEDecoder


def feed_all(parts: list[bytes]) -> tuple[list[Event], SSEDecoder]:
    decoder = SSEDecoder()
    events: list[Event] = []
    for part in parts:
        events.extend(decoder.feed(part))
    return events, decoder


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


STREAM = (
    b"\xef\xbb\xbf: keep-alive\n"
    b"\n"
    b"retry: 3000\n"
    b"id: 7\n"
    b'data: {"a": 1}\n'
    b"\n"
    b"event: message\n"
    b'data:{"b":\n'
    b"data:  2}\n"
    b"\n"
    b": another comment\n"
    b"id\n"
    b"data\n"
    b"\n"
    b"event: error\n"
    b'data: {"error": {"message": "boom"}}\n'
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)
EXPECTED = [
    b'{"a": 1}',
    b'{"b":\n 2}',  # `event: message` is the default type
    (b"error", b'{"error": {"message": "boom"}}'),
    b"[DONE]",
]


def test_the_standard_fields_with_each_line_ending() -> None:
    for ending in (b"\n", b"\r\n", b"\r"):
        events, decoder = feed_all([STREAM.replace(b"\n", ending)])
        assert events == EXPECTED, ending
        assert decoder.retry_ms == 3000
        assert decoder.last_event_id == b""  # a bare `id` resets it
        assert not decoder.pending


@settings(max_examples=300, deadline=None)
@given(
    ending=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM) * 2), max_size=40),
)
def test_any_segmentation_gives_the_same_events(ending: bytes, cuts: list[int]) -> None:
    data = STREAM.replace(b"\n", ending)
    events, decoder = feed_all(split(data, cuts))
    assert events == EXPECTED
    assert not decoder.pending


def test_a_crlf_split_between_two_reads_is_one_line_end() -> None:
    events, _ = feed_all([b"data: 1\r", b"\n\r", b"\ndata: 2\r\n\r\n"])
    assert events == [b"1", b"2"]


def test_mixed_line_endings_in_one_stream() -> None:
    events, _ = feed_all([b"data: 1\r\n\ndata: 2\n\r\ndata: 3\r\rdata: 4\n\n"])
    assert events == [b"1", b"2", b"3", b"4"]


def test_an_unfinished_event_is_not_dispatched_and_is_reported_pending() -> None:
    events, decoder = feed_all([b'data: {"a": 1}\n\ndata: {"b"'])
    assert events == [b'{"a": 1}']
    assert decoder.pending
    _, decoder = feed_all([b"data: 1\n\n: trailing comment\n\n\n"])
    assert not decoder.pending


def test_events_without_data_are_not_dispatched() -> None:
    events, _ = feed_all([b"event: ping\n\nid: 3\n\n: x\n\ndata:\n\ndata: 1\n\n"])
    assert events == [b"1"]


def test_llama_cpp_error_field_is_an_error_event() -> None:
    events, _ = feed_all([b'error: {"code": 500, "message": "oops"}\n\n'])
    assert events == [(b"error", b'{"code": 500, "message": "oops"}')]


def test_only_a_leading_bom_is_skipped() -> None:
    events, _ = feed_all([b"\xef", b"\xbb", b"\xbfdata: 1\n\n"])
    assert events == [b"1"]
    events, _ = feed_all([b"data: 1\n\n\xef\xbb\xbfdata: 2\n\n"])
    assert events == [b"1"]  # a BOM later is part of a field name: ignored


BLOCKS = [
    b'data: {"a":1}\n\n',
    b"data: \n\n",  # empty data: not dispatched
    b"data: [DONE]\n\n",
    b"\n\n",  # extra blank lines
    b'event: error\ndata: {"error":"x"}\n\n',
    b'data: {\n"a":1}\n\n',  # the second line is a field named `"a"`: the data is `{`
    b"data: one\ndata: two\n\n",
    b": comment\n\n",
    b"data:tight\n\n",
    b"data: data: nested\n\n",
]


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=12))
def test_a_read_of_many_events_parses_as_the_events_one_byte_at_a_time(
    picks: list[bytes],
) -> None:
    """The one-read fast path for plain `data: ` events gives what the line-by-line rules
    give, whatever else is mixed in the read."""
    data = b'data: {"first":0}\n\n' + b"".join(picks)
    whole, _ = feed_all([data])
    bytewise, _ = feed_all([data[i : i + 1] for i in range(len(data))])
    assert whole == bytewise


def test_a_line_end_inside_an_event_is_not_taken_for_one_event() -> None:
    events, _ = feed_all([b'data: {"first":0}\n\ndata: {\n"a":1}\n\nevent: error\ndata: e\n\n'])
    assert events == [b'{"first":0}', b"{", (b"error", b"e")]
