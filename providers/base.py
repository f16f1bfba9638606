"""The provider seam: one async method between the gateway and a model backend.

A provider takes an OpenAI-shaped request for one upstream model and returns an
OpenAI-shaped response: a whole JSON body, or a stream of `Chunks` (the chunk events of
one upstream read each, as the upstream wrote them plus a typed view). Either way the
answer ends with a typed `TokenUsage` when the upstream reported one (the body's `usage`,
the `usage` of the read that carried it), read once, here, at the seam: the relay, the
ledger record and the metrics read that value and never dig in chunks for it (as Envoy AI
Gateway's translators return token usage beside the body they translate). The gateway
owns everything around the call (keys, quotas, pricing, the ledger); a provider only
talks to its backend, the way an httpx transport only moves bytes.

Example::

    class Echo(Provider):
        async def send(self, request: ProviderRequest) -> ProviderResponse:
            text = request.body["messages"][-1]["content"]
            if request.stream:
                return ProviderResponse(stream=self._stream(request.model, text))
            return ProviderResponse(
                body={
                    "id": "chatcmpl-echo", "object": "chat.completion", "created": 0,
                    "model": request.model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                },
                usage=TokenUsage(uncached_input=1, output=1),
            )

        async def _stream(self, model: str, text: str) -> AsyncIterator[Chunks]:
            yield Chunks.of([{"id": "chatcmpl-echo", "object": "chat.completion.chunk",
                              "created": 0, "model": model, "choices": [{"index": 0,
                              "delta": {"content": text}, "finish_reason": "stop"}]}])

A stream that never reports usage is counted by the gateway from the text it relayed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

Endpoint = Literal["chat.completions", "completions", "embeddings"]

Chunk = dict[str, Any]
"""One decoded stream chunk, shaped like OpenAI's (`chat.completion.chunk` or `text_completion`)."""

_decode_dict = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


class TokenUsage(msgspec.Struct, frozen=True, gc=False):
    """The tokens of one answer as its upstream reported them, or as the gateway counted
    them (`source`). `uncached_input + cached_input` is the whole prompt; `reasoning` is
    the part of `output` spent on hidden reasoning; `cache_written` is the part of
    `uncached_input` the upstream says it wrote to its prompt cache."""

    uncached_input: int = 0
    cached_input: int = 0
    output: int = 0
    reasoning: int = 0
    cache_written: int = 0
    source: Literal["upstream", "counted"] = "upstream"

    @classmethod
    def from_openai(cls, usage: dict[str, Any]) -> TokenUsage:
        """Read an OpenAI `usage` object (chat, completions or embeddings), in any of the
        dialects upstreams speak: cached input in `prompt_tokens_details.cached_tokens`
        (OpenAI, vLLM, SGLang, llama.cpp, Ark) or `prompt_cache_hit_tokens` (DeepSeek, whose
        `prompt_cache_hit_tokens + prompt_cache_miss_tokens` is the prompt), reasoning in
        `completion_tokens_details.reasoning_tokens` (part of the output), cache writes in
        `cache_creation_input_tokens` or `prompt_tokens_details.cache_creation_tokens` /
        `cache_write_tokens`."""
        hit = int(usage.get("prompt_cache_hit_tokens") or 0)
        prompt = int(
            usage.get("prompt_tokens")
            or usage.get("input_tokens")
            or hit + int(usage.get("prompt_cache_miss_tokens") or 0)
        )
        output = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        cached = min(cached or hit, prompt)  # DeepSeek reports cache hits at the top level
        out_details = (
            usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        )
        reasoning = (
            int(out_details.get("reasoning_tokens") or 0) if isinstance(out_details, dict) else 0
        )
        written: Any = usage.get("cache_creation_input_tokens")
        if written is None and isinstance(details, dict):
            written = details.get("cache_creation_tokens") or details.get("cache_write_tokens")
        written = written if isinstance(written, int) and written > 0 else 0
        return cls(prompt - cached, cached, output, min(reasoning, output), written)


class ToolCallView(msgspec.Struct, gc=False):
    function: Any = None


class DeltaView(msgspec.Struct, gc=False):
    content: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    tool_calls: list[ToolCallView] | None = None


class ChoiceView(msgspec.Struct, gc=False):
    """What metering reads of a chunk's choice: its index and the text it adds."""

    index: Any = 0
    delta: DeltaView | None = None
    text: Any = None  # /v1/completions chunks carry text directly
    finish_reason: Any = None

    def texts(self) -> list[str]:
        """The output text this choice adds (reasoning, content, tool-call names and
        arguments), in the order the gateway counts it."""
        delta = self.delta
        if delta is None:
            text = self.text
            return [text] if isinstance(text, str) and text else []
        parts: list[str] = []
        reasoning = delta.reasoning_content or delta.reasoning  # DeepSeek, Ollama...
        if isinstance(reasoning, str) and reasoning:
            parts.append(reasoning)
        content = delta.content
        if isinstance(content, str) and content:
            parts.append(content)
        for call in delta.tool_calls or ():
            function = call.function if isinstance(call.function, dict) else {}
            parts.append((function.get("name") or "") + (function.get("arguments") or ""))
        return parts


class ChunkView(msgspec.Struct, gc=False):
    """The typed view of one stream chunk: only what metering and the relay read."""

    model: Any = None
    choices: list[ChoiceView] | None = None
    usage: dict[str, Any] | None = None
    error: Any = msgspec.UNSET


_decode_view = msgspec.json.Decoder(ChunkView).decode


class Chunks:
    """The chunk events of one upstream read, in order: each chunk's JSON as the upstream
    sent it (`raw`); `usage` is the upstream's usage when one of them reported it; `final`
    says the stream ends with this read. Their
    typed views (`views`) and full objects (`objects()`) are decoded on demand, so a read
    the gateway passes through untouched is never decoded chunk by chunk."""

    __slots__ = ("_views", "final", "raw", "usage")

    def __init__(
        self,
        raw: list[bytes],
        usage: TokenUsage | None = None,
        views: list[ChunkView] | None = None,
        final: bool = False,
    ) -> None:
        self.raw = raw
        self.usage = usage
        self._views = views
        self.final = final
        """The stream ends with this read (it held the upstream's `[DONE]`): the gateway
        may send it together with what it writes last."""

    @classmethod
    def of(cls, chunks: list[Chunk]) -> Chunks:
        """Chunks a provider built as objects (encoded once, here)."""
        usage = None
        for chunk in chunks:
            reported = chunk.get("usage")
            if reported:
                usage = TokenUsage.from_openai(reported)
        return cls([_encode(chunk) for chunk in chunks], usage)

    @property
    def views(self) -> list[ChunkView]:
        """The typed view of each chunk (raises `msgspec.DecodeError` on a bad one)."""
        views = self._views
        if views is None:
            views = self._views = [_decode_view(data) for data in self.raw]
        return views

    def objects(self) -> list[Chunk]:
        """The chunks decoded in full."""
        return [_decode_dict(data) for data in self.raw]


def view_chunk(data: bytes) -> ChunkView:
    """The typed view of one chunk's JSON (raises `msgspec.DecodeError`)."""
    return _decode_view(data)


@dataclass(slots=True)
class ProviderRequest:
    """What the gateway asks of a provider.

    `body` is the validated OpenAI request body with `model` already set to the
    upstream model name. For streams the gateway has set
    `stream_options.include_usage` so that the last chunk carries usage.
    `connect_timeout_s`, when set, bounds the time to open a connection to the backend
    (the deployment's own limit); otherwise the provider's default applies.
    """

    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    request_id: str = ""
    connect_timeout_s: float | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(slots=True)
class ProviderResponse:
    """A provider's answer: exactly one of `body` (JSON) or `stream` (chunks) is set.

    A stream yields `Chunks` as the backend produces them, one upstream read at a time
    (the gateway writes each to its caller in one write), and may raise `UpstreamError`
    part-way; closing it (`aclose()`) must cancel the upstream work. `usage` is the
    body's usage as the upstream reported it (a stream reports it in its `Chunks`).
    `headers` carries upstream headers worth passing on (none are required).
    """

    body: dict[str, Any] | None = None
    stream: AsyncIterator[Chunks] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    usage: TokenUsage | None = None


class UpstreamError(Exception):
    """A backend failed or refused; carries an OpenAI-shaped error for the caller.

    `retryable` tells routing whether another attempt (or another deployment)
    may succeed; `retry_after` is the backend's hint in seconds, if it gave one.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "upstream_error",
        code: str | None = None,
        param: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retryable = retryable
        self.retry_after = retry_after


class Provider(ABC):
    """A model backend behind one method, `send`.

    Contract:
    - `send` returns a `ProviderResponse` or raises `UpstreamError`; it never
      raises anything else for a backend failure (timeouts and connection
      errors become `UpstreamError` with `retryable=True`).
    - A non-streaming answer's `usage`, and the `Chunks` of a stream that carried it,
      hold the backend's `TokenUsage` when it reports one; the gateway counts locally
      when it is absent. A body or chunk keeps its OpenAI `usage` object too: callers
      who asked for usage see the upstream's own.
    - Providers are shared by all requests and must be safe for concurrent use.
    """

    name: str = "provider"

    @abstractmethod
    async def send(self, request: ProviderRequest) -> ProviderResponse:
        """Send one request to the backend."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background tasks."""
