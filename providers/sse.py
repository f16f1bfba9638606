"""Server-sent events, parsed by the WHATWG EventSource rules, incrementally and fast.

`SSEDecoder.feed` takes the bytes of one upstream read and returns the events that read
completed: the data of each `message` event, `(event_type, data)` for another type.
Bytes of an event not finished yet are kept for the next read. What it follows, from the
HTML standard's "Parsing an event stream":

- lines end with CRLF, LF or a lone CR, and a CRLF split between two reads is one line end;
- a leading UTF-8 byte order mark is skipped;
- a blank line dispatches the event; lines starting with `:` are comments (keep-alives);
- `field: value` (one space after the colon dropped), or a bare `field` with an empty value;
  `data` lines are joined with LF, `event` sets the type, `id` (without NUL) the last event
  id and `retry` (ASCII digits only) the reconnection time; other fields are ignored,
  except `error`, which llama.cpp's server uses for a mid-stream error and which is read as
  an event of type `error`;
- an event with no `data` line is not dispatched (as the standard says), nor is one whose
  data is empty (an OpenAI-style stream carries nothing in it);
- an event not terminated by a blank line when the stream ends is not dispatched:
  `pending` tells whether such bytes (other than blank lines and comments) are left, which
  is how a caller tells a stream that was cut mid-event.

Most upstreams send `data: {json}\\n\\n` events; those take one `bytes.find` and one slice.
"""

from __future__ import annotations

from typing import cast

__all__ = ["Event", "SSEDecoder"]

_BOM = b"\xef\xbb\xbf"
_MESSAGE = b""  # the default event type ("message")
_BETWEEN = b"\n\ndata: "  # the end of one plain event and the start of the next


Event = bytes | tuple[bytes, bytes]
"""A dispatched event: its data (type `message`), or `(event_type, data)` for another type."""

_NOTHING: list[Event] = []


class SSEDecoder:
    """An incremental event-stream parser for one response."""

    __slots__ = ("_buffer", "_cr", "_lead", "_started", "last_event_id", "retry_ms", "typed")

    def __init__(self) -> None:
        self._buffer = b""
        self._lead = True  # the start of this read needs a look (stream start, or a CR before)
        self._cr = False  # the last read ended with CR: a LF starting the next one is its pair
        self._started = False  # past the optional byte order mark
        self.last_event_id = b""
        self.retry_ms: int | None = None
        self.typed = False
        """Set when an event of a type other than `message` was dispatched (the caller
        clears it): until then every event returned is plain data."""

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by `data`, in order (do not modify the list returned).

        An event of the default type (`message`) is its data; another is a pair
        `(event_type, data)`.
        """
        if self._lead:
            if self._cr:
                self._cr = False
                if data[:1] == b"\n":
                    data = data[1:]
            if not self._started:
                buffer = self._buffer + data
                if len(buffer) < 3 and _BOM.startswith(buffer):
                    self._buffer = buffer
                    return _NOTHING
                self._started = True
                self._buffer = b""
                data = buffer[3:] if buffer.startswith(_BOM) else buffer
            self._lead = False
        if b"\r" in data:
            if data[-1:] == b"\r":
                self._cr = self._lead = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self._buffer
        buffer = pending + data if pending else data
        end = buffer.find(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return _NOTHING
        if end + 2 == len(buffer) and buffer.find(b"\n") == end and buffer.startswith(b"data: "):
            self._buffer = b""  # one plain event, the most common read of a live stream
            return [buffer[6:end]] if end > 6 else _NOTHING
        # A read of plain one-line `data: ` events (the common case) is split at C speed:
        # when every line end in it belongs to a `\n\ndata: ` between two events, a split
        # at those is the events' data.
        last = buffer.rfind(b"\n\n")
        head = buffer[:last]
        if head.startswith(b"data: "):
            datas = cast(list[Event], head[6:].split(_BETWEEN))
            if head.count(b"\n") == 2 * len(datas) - 2:
                self._buffer = buffer[last + 2 :]
                return [data for data in datas if data] if b"" in datas else datas
        blocks = head.split(b"\n\n")
        datas = [b[6:] for b in blocks if b[:6] == b"data: " and b"\n" not in b]
        if len(datas) == len(blocks):
            self._buffer = buffer[last + 2 :]
            return [data for data in datas if data]
        events: list[Event] = []
        start = 0
        while end >= 0:
            block = buffer[start:end]
            start = end + 2
            if block.startswith(b"data: ") and b"\n" not in block:
                if len(block) > 6:
                    events.append(block[6:])
            else:
                event = self._parse(block)
                if event is not None:
                    events.append(event)
            end = buffer.find(b"\n\n", start)
        self._buffer = buffer[start:]
        return events

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event (not just blank lines or comments) are held."""
        for line in self._buffer.split(b"\n"):
            if line and line[:1] != b":":
                return True
        return False

    def _parse(self, block: bytes) -> Event | None:
        """One event's lines (no blank line among them but perhaps a leading one)."""
        data: list[bytes] = []
        kind = _MESSAGE
        for line in block.split(b"\n"):
            if not line or line[:1] == b":":
                continue
            colon = line.find(b":")
            if colon < 0:
                name, value = line, b""
            else:
                name, value = line[:colon], line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value
            elif name == b"id":
                if b"\0" not in value:
                    self.last_event_id = value
            elif name == b"retry":
                if value.isdigit():
                    self.retry_ms = int(value)
            elif name == b"error":  # llama.cpp's server: `error: {json}`
                kind = b"error"
                data.append(value)
        if not data:
            return None
        payload = b"\n".join(data)
        if not payload:
            return None
        if kind == _MESSAGE or kind == b"message":
            return payload
        self.typed = True
        return (kind, payload)
