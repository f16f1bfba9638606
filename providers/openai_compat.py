"""A provider for any OpenAI-compatible upstream: vLLM, Ollama, DeepSeek, Ark, OpenAI...

Requests go over one shared, pooled httpx client per provider. By default its transport
is aiohttp's (`httpx-aiohttp`), which holds its throughput under concurrency where
httpx's default transport does not (see docs/benchmarks.md); `transport: httpx` picks
the default one. Each request is built as the client would build it and handed to the
transport itself, and a body is read straight from aiohttp's stream where it can be: the
client's layers (authentication flows, redirects, cookies, event hooks, a generator per
read) are ones this provider does not use. A stream is handed over one upstream read at a
time: the events of each read as `Chunks` (their JSON as sent, a typed view, the usage when
one reported it).
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, cast

import aiohttp
import httpx
import msgspec
from httpx_aiohttp.transport import AiohttpResponseStream
from pydantic import BaseModel, Field

from providers.base import (
    Chunks,
    ChunkView,
    Provider,
    ProviderRequest,
    ProviderResponse,
    TokenUsage,
    UpstreamError,
)
from providers.sse import Event, SSEDecoder

_PATHS = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
_decode_views = msgspec.json.Decoder(list[ChunkView]).decode
_view = msgspec.json.Decoder(ChunkView).decode


class OpenAICompatConfig(BaseModel):
    """Where the upstream is and how to reach it."""

    base_url: str = Field(description="The upstream's API root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the upstream API key"
    )
    headers: dict[str, str] = Field(default_factory=dict)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    max_connections: int = 512
    transport: Literal["aiohttp", "httpx"] = "aiohttp"


class _NoCookies(httpx.Cookies):
    """A cookie jar that never keeps anything: one tenant's upstream answer must not set
    cookies sent with another tenant's request (and extracting them costs CPU per call)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class CookielessAsyncClient(httpx.AsyncClient):
    """`httpx.AsyncClient` that neither stores nor sends cookies."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        return None


class OpenAICompatProvider(Provider):
    """Relays requests to an OpenAI-compatible HTTP API."""

    def __init__(self, name: str, config: OpenAICompatConfig) -> None:
        self.name = name
        self.config = config
        headers = {"content-type": "application/json", **config.headers}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
        )
        timeout = httpx.Timeout(
            config.read_timeout_s, connect=config.connect_timeout_s, pool=config.connect_timeout_s
        )
        transport: httpx.AsyncBaseTransport
        if config.transport == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits)
        base_url = config.base_url.rstrip("/")
        self._transport = transport
        self._client = CookielessAsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )
        # The absolute URLs, merged with the base URL once: httpx then neither parses nor
        # merges one per request.
        self._urls = {
            endpoint: self._client.build_request("POST", path).url
            for endpoint, path in _PATHS.items()
        }
        # What the client would put on each request: its headers (the provider's and
        # httpx's defaults) and the timeouts, by connect timeout (None: the client's).
        self._headers = httpx.Headers(self._client.headers)
        self._extensions: dict[float | None, dict[str, Any]] = {
            None: {"timeout": timeout.as_dict()}
        }

    async def send(self, request: ProviderRequest) -> ProviderResponse:
        http_request = self.http_request(request)
        try:
            # The request is the one the client would build (its URL, headers and timeouts)
            # and goes to the transport itself, past the client's layers this provider does
            # not use (authentication flows, redirects, cookies, event hooks). The body comes
            # as a stream either way: a JSON one is read straight from aiohttp (`_read_body`).
            response = await self._transport.handle_async_request(http_request)
            response.request = http_request
            body_bytes = None if request.stream else await _read_body(response)
        except (httpx.TimeoutException, TimeoutError) as exc:
            if not isinstance(exc, httpx.TimeoutException) or _timed_out(exc):
                raise UpstreamError(
                    504, f"Upstream {self.name} timed out: {exc}", type="timeout", retryable=True
                ) from None
            raise UpstreamError(
                502,
                f"Upstream {self.name} closed the connection: {exc}",
                type="upstream_unreachable",
                retryable=True,
            ) from None
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(
                502,
                f"Upstream {self.name} could not be reached: {exc.__class__.__name__}",
                type="upstream_unreachable",
                retryable=True,
            ) from None
        if response.status_code != 200:
            body = await response.aread() if body_bytes is None else body_bytes
            await response.aclose()
            raise _upstream_error(self.name, response.status_code, body, response.headers)
        if body_bytes is None:
            return ProviderResponse(stream=self._events(response))
        try:
            body = _json_decode(body_bytes)
        except msgspec.DecodeError:
            raise UpstreamError(
                502, f"Upstream {self.name} sent a body that is not JSON.", retryable=True
            ) from None
        usage = body.get("usage") if isinstance(body, dict) else None
        return ProviderResponse(
            body=body, usage=TokenUsage.from_openai(usage) if isinstance(usage, dict) else None
        )

    def http_request(self, request: ProviderRequest) -> httpx.Request:
        """The HTTP request for `request`: what the client's `build_request` would make
        (URL, headers, timeouts), without merging them again for every request."""
        return httpx.Request(
            "POST",
            self._urls[request.endpoint],
            headers=self._headers,
            content=_json_encode(request.body),
            extensions=self._extensions_for(request.connect_timeout_s),
        )

    def _extensions_for(self, connect_s: float | None) -> dict[str, Any]:
        """A request's extensions: its timeouts, with the deployment's connect timeout."""
        extensions = self._extensions.get(connect_s)
        if extensions is None:
            read_s = self.config.read_timeout_s
            timeout = httpx.Timeout(read_s, connect=connect_s, pool=connect_s)
            extensions = self._extensions[connect_s] = {"timeout": timeout.as_dict()}
        return extensions

    async def _events(self, response: httpx.Response) -> AsyncIterator[Chunks]:
        """Server-sent events as `Chunks`, one upstream read at a time, until `[DONE]`;
        a cut stream raises.

        A stream that ends without `[DONE]` is complete when its body ended cleanly, no
        event was left unfinished, and its last chunk carried usage or a `finish_reason`
        for every choice in it; otherwise it was cut. An `error` event, or a data event
        holding only an `error` object, ends the stream with that error (see
        `stream_error`), after the chunks of its read before it.
        """
        decoder = SSEDecoder()
        last: bytes | None = None
        reads = _body_reads(response)
        try:
            async for data in reads:
                events = decoder.feed(data)
                if not events:
                    continue
                failed: bytes | None = None
                if decoder.typed:  # an `error` event (or another type) among them
                    decoder.typed = False
                    raw, done, failed = _payloads(events)
                else:
                    plain = cast(list[bytes], events)  # no typed event: all are data
                    done = b"[DONE]" in plain  # no exception raised for the reads without it
                    raw = plain[: plain.index(b"[DONE]")] if done else plain
                if raw:
                    # One pass over the whole read checks that every chunk is a JSON object
                    # and finds the chunks that name usage or an error; only those are
                    # decoded (a chunk that is not an object cuts the stream, as one that
                    # is not JSON does).
                    joined = b"[" + b",".join(raw) + b"]"
                    facts = _facts_of(joined)
                    views: list[ChunkView] | None = None
                    if any(map(_error_of, facts)):  # in C: an unset error is falsy
                        views = _decode_views(joined)
                        for at, view in enumerate(views):
                            if view.error is not _UNSET and view.choices is None:
                                failed = raw[at]
                                raw, views = raw[:at], views[:at]
                                break
                    if raw:
                        usage = _usage_of(raw, facts)
                        last = raw[-1]
                        yield Chunks(raw, usage, views, done and failed is None)
                if failed is not None:
                    raise stream_error(self.name, _json_decode(failed))
                if done:
                    return
            if decoder.pending or not _finished(_view(last) if last is not None else None):
                raise UpstreamError(
                    502, f"Upstream {self.name} ended the stream early.", type="stream_cut"
                )
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(
                502,
                f"Upstream {self.name} cut the stream: {exc.__class__.__name__}",
                type="stream_cut",
            ) from None
        except msgspec.DecodeError:
            raise UpstreamError(
                502, f"Upstream {self.name} sent an event that is not JSON.", type="stream_cut"
            ) from None
        finally:
            # Closed here, not left to the garbage collector's finalizer hook, which would
            # cost a task and a wake-up of the event loop for every stream that ends at
            # `[DONE]` (the loop over the reads is left before they run out).
            if isinstance(reads, AsyncGenerator):
                await reads.aclose()
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


def _body_reads(response: httpx.Response) -> AsyncIterator[bytes]:
    """A streamed body's bytes as each read brings them.

    Over httpx-aiohttp they come straight from aiohttp's stream: httpx's `aiter_raw` would
    pass each read through three async generators, two of which it cannot close, so that
    each stream left at `[DONE]` would cost two tasks of the garbage collector's finalizer
    hook. `response.aclose()` still closes the response the httpx way. Any other transport:
    `aiter_raw`.
    """
    inner = _aiohttp_stream(response)
    if inner is not None:
        return inner._aiohttp_response.content.iter_any()
    return response.aiter_raw()


def _aiohttp_stream(response: httpx.Response) -> AiohttpResponseStream | None:
    """httpx-aiohttp's body stream of a response from its transport; None under another."""
    stream = response.stream
    return stream if isinstance(stream, AiohttpResponseStream) else None


async def _read_body(response: httpx.Response) -> bytes:
    """A whole body, read and the response closed: straight from aiohttp under httpx-aiohttp
    when it is not content-encoded (httpx decodes, aiohttp is asked not to), else httpx's
    `aread`."""
    inner = _aiohttp_stream(response)
    try:
        if inner is not None and "content-encoding" not in response.headers:
            return await inner._aiohttp_response.read()
        return await response.aread()
    finally:
        await response.aclose()


def _timed_out(exc: httpx.TimeoutException) -> bool:
    """Whether a "timeout" was one: httpx-aiohttp reports every aiohttp connection error,
    a connection reset or closed by the upstream (a killed server) included, as
    `ConnectTimeout`; only a cause that is itself a timeout makes it one."""
    cause = exc.__cause__
    return cause is None or isinstance(cause, TimeoutError)


def _payloads(events: list[Event]) -> tuple[list[bytes], bool, bytes | None]:
    """The chunk payloads of a read with typed events: those before `[DONE]` or an `error`
    event, whether `[DONE]` came, and the error event's data if one did."""
    raw: list[bytes] = []
    for event in events:
        if isinstance(event, tuple):
            kind, payload = event
            if kind == b"error":
                return raw, False, payload
        else:
            payload = event
        if payload == b"[DONE]":
            return raw, True, None
        raw.append(payload)
    return raw, False, None


class _Facts(msgspec.Struct, gc=False):
    """What one pass over a read takes of each chunk: its `usage` and `error`, undecoded."""

    usage: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    error: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_decode_facts = msgspec.json.Decoder(list[_Facts]).decode
_error_of = operator.attrgetter("error")
_decode_usage = msgspec.json.Decoder(dict[str, Any] | None).decode
_UNSET: Any = msgspec.UNSET


def _facts_of(joined: bytes) -> list[_Facts]:
    """The facts of each chunk of a read (`joined`, a JSON array of them). Raises
    `msgspec.DecodeError` when one is not JSON, or not an object."""
    return _decode_facts(joined)


def _usage_of(raw: list[bytes], facts: list[_Facts]) -> TokenUsage | None:
    """The usage the last chunk reporting one says (of the first `len(raw)` chunks)."""
    for at in range(len(raw) - 1, -1, -1):
        reported = facts[at].usage
        if isinstance(reported, msgspec.Raw):
            usage = _decode_usage(reported)
            if usage:
                return TokenUsage.from_openai(usage)
    return None


def _finished(last: ChunkView | None) -> bool:
    """Whether a stream whose last chunk was `last` had said all it had to say."""
    if last is None:
        return False
    if last.usage:
        return True
    choices = last.choices
    if not choices:
        return False
    return all(c.finish_reason for c in choices)


def stream_error(name: str, chunk: Any) -> UpstreamError:
    """The error an upstream reported mid-stream, in whichever shape it used.

    `{"error": {"message", "type", "code"}}` (OpenAI, vLLM, SGLang, Ollama),
    `{"error": "text", "error_type": ...}` (TGI), or the error object itself in an
    `event: error` (or llama.cpp's `error:`) event. The caller gets a 502 with the
    upstream's message; the upstream's type or code is kept as the error's `code`.
    """
    error: Any = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
    message, type_, code = f"Upstream {name} failed mid-stream.", "upstream_error", None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        type_ = str(error.get("type") or type_)
        code = error.get("code")
    elif isinstance(error, str) and error:
        message = error
        if isinstance(chunk, dict) and chunk.get("error_type"):
            type_ = str(chunk["error_type"])
    return UpstreamError(
        502,
        message,
        type=type_,
        code=str(code) if isinstance(code, str) else type_,
    )


def _upstream_error(name: str, status: int, body: bytes, headers: httpx.Headers) -> UpstreamError:
    message, type_, code = f"Upstream {name} answered HTTP {status}.", "upstream_error", None
    param = None
    try:
        error: Any = _json_decode(body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            type_ = str(error.get("type") or type_)
            code = error.get("code")
            param = error.get("param")
        elif isinstance(error, str):
            message = error
    except (msgspec.DecodeError, AttributeError):
        pass
    retry_after = _retry_after(headers)
    return UpstreamError(
        status,
        message,
        type=type_,
        code=str(code) if code is not None else None,
        param=str(param) if param is not None else None,
        # 401/403: the upstream refused this deployment's credential; another may serve.
        retryable=status in (401, 403, 408, 409, 429) or status >= 500,
        retry_after=retry_after,
    )


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from `retry-after-ms`, else `retry-after` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return float(value) / 1000
    value = headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
