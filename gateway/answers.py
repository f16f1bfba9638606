"""A JSON answer that reaches the wire with less work than Litestar's general `Response`.

The relay's answers carry a dozen headers (the request id, the rate-limit and cost
headers). Litestar's `ASGIResponse` adds each one through a case-insensitive mapping and
then scans them all twice for `content-type` and `content-length`; `JSONAnswer` encodes
them once into the same list, in the same order, with the same two headers after them,
so the bytes a client receives are the same. Anything unusual (cookies, a background
task, route-level headers, a HEAD request, a status without a body) takes Litestar's own
path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Response
from litestar.datastructures import MutableScopeHeaders
from litestar.response.base import ASGIResponse

if TYPE_CHECKING:
    from litestar import Request
    from litestar.background_tasks import BackgroundTask, BackgroundTasks

__all__ = ["JSONAnswer"]

_JSON = b"application/json"
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
