"""Answers that reach the wire with less work than Litestar's general responses.

The relay's answers carry a dozen headers (the request id, the rate-limit and cost
headers). Litestar's `ASGIResponse` adds each one through a case-insensitive mapping and
then scans them all twice for `content-type` and `content-length`; `JSONAnswer` encodes
them once into the same list, in the same order, with the same two headers after them,
so the bytes a client receives are the same. Anything unusual (cookies, a background
task, route-level headers, a HEAD request, a status without a body) takes Litestar's own
path.

`StreamAnswer` does the same for a server-sent event stream, and sends it without
Litestar's task group: Litestar's `Stream` runs the body in an anyio task group beside a
task that listens for the client leaving, which costs more than the rest of a short
stream's sending. `StreamAnswer` sends the body in the request's own task and watches for
the client leaving with one plain task; when the client leaves, the body's iterator is
cancelled where it waits, and closed, exactly as Litestar's `Stream` would have it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from litestar import Response
from litestar.datastructures import MutableScopeHeaders
from litestar.response.base import ASGIResponse

if TYPE_CHECKING:
    from litestar import Request
    from litestar.background_tasks import BackgroundTask, BackgroundTasks

__all__ = ["JSONAnswer", "StreamAnswer"]

_JSON = b"application/json"
_EVENT_STREAM = b"text/event-stream; charset=utf-8"
#: Header names as they go on the wire (lower case, latin-1), kept for the few the gateway
#: sends (the request id, the rate-limit and cost headers); at most `_MAX_NAMES`.
_NAMES: dict[str, bytes] = {}
_MAX_NAMES = 256


def _encoded_name(name: str) -> bytes:
    encoded = name.lower().encode("latin-1")
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[name] = encoded
    return encoded


class JSONAnswer(Response[bytes]):
    """An `application/json` `Response` of encoded bytes, with string headers."""

    __slots__ = ()

    def __init__(
        self,
        content: bytes,
        *,
        status_code: int | None = None,
        media_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        # What `Response.__init__` sets, for the one shape used here (no cookies, no
        # background task, no type encoders): the headers dict is taken, not copied.
        self.content = content
        self.background = None
        self.cookies = []
        self.encoding = "utf-8"
        self.headers = headers if headers is not None else {}
        self.media_type = media_type
        self.status_code = status_code
        self.response_type_encoders = {}

    def to_asgi_response(  # type: ignore[override]
        self,
        app: Any,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Any = None,
        encoded_headers: Any = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: Any = None,
        status_code: int | None = None,
        type_encoders: Any = None,
    ) -> ASGIResponse:
        status = self.status_code or status_code or 200
        body = self.content
        if (
            headers
            or cookies
            or self.cookies
            or encoded_headers
            or background is not None
            or self.background is not None
            or is_head_response
            or self.media_type != "application/json"
            or not isinstance(body, bytes)
            or status < 200
            or status in (204, 304)
            or "content-type" in self.headers
            or "content-length" in self.headers
        ):
            return super().to_asgi_response(
                app,
                request,
                background=background,
                cookies=cookies,
                encoded_headers=encoded_headers,
                headers=headers,
                is_head_response=is_head_response,
                media_type=media_type,
                status_code=status_code,
                type_encoders=type_encoders,
            )
        names = _NAMES
        raw = [
            (names.get(name) or _encoded_name(name), value.encode("latin-1"))
            for name, value in self.headers.items()
        ]
        raw.append((b"content-type", _JSON))
        raw.append((b"content-length", str(len(body)).encode("latin-1")))
        return _Encoded(body, raw, status, self.encoding)


class _Encoded(ASGIResponse):
    """An `ASGIResponse` built from headers already encoded (as Litestar would encode them)."""

    def __init__(  # no super().__init__(): it is the work being skipped
        self, body: bytes, raw_headers: list[tuple[bytes, bytes]], status: int, encoding: str
    ) -> None:
        self.headers = MutableScopeHeaders()
        self.headers.headers = raw_headers
        self.background = None
        self.body = body
        self.content_length = len(body)
        self._encoded_cookies = ()
        self.encoding = encoding
        self.is_head_response = False
        self.status_code = status


class StreamAnswer(Response[bytes]):
    """A `text/event-stream` response of the byte chunks of an async iterator, with string
    headers; the client gets the bytes Litestar's `Stream` would send it. Route-level
    headers, cookies and background tasks are not applied (the relay's routes have none)."""

    __slots__ = ("iterator",)

    def __init__(self, iterator: AsyncIterator[bytes], *, headers: dict[str, str]) -> None:
        self.iterator = iterator
        self.content = b""
        self.background = None
        self.cookies = []
        self.encoding = "utf-8"
        self.headers = headers
        self.media_type = "text/event-stream"
        self.status_code = 200
        self.response_type_encoders = {}

    def to_asgi_response(  # type: ignore[override]
        self, app: Any, request: Request[Any, Any, Any], **_: Any
    ) -> _EventStream:
        names = _NAMES
        raw = [
            (names.get(name) or _encoded_name(name), value.encode("latin-1"))
            for name, value in self.headers.items()
        ]
        raw.append((b"content-type", _EVENT_STREAM))
        return _EventStream(self.iterator, raw)


class _EventStream:
    """The ASGI side of a `StreamAnswer`."""

    __slots__ = ("_ended", "_headers", "_iterator", "_left")

    def __init__(self, iterator: AsyncIterator[bytes], raw_headers: list[tuple[bytes, bytes]]):
        self._iterator = iterator
        self._headers = raw_headers
        self._ended = False  # the last body message is sent: the client may go now
        self._left = False  # the client left before the end, and this task was cancelled

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch(receive, task))
        iterator = self._iterator
        finished = False
        try:
            async for chunk in iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
            self._ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._left:
                raise
            task.uncancel()  # the client's leaving ends the answer; nobody else asked
        finally:
            self._ended = True
            watcher.cancel()
            if not finished:
                closing = getattr(iterator, "aclose", None)
                if closing is not None:
                    await closing()

    async def _watch(self, receive: Any, task: asyncio.Task[Any]) -> None:
        """Cancel the answering task when the client leaves before the end."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._ended:
                    self._left = True
                    task.cancel()
                return
