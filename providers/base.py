"""The provider seam: one async method between the gateway and a model backend.

A provider takes an OpenAI-shaped request for one upstream model and returns an
OpenAI-shaped response, either a whole JSON body or a stream of chunk objects.
The gateway owns everything around it (keys, quotas, pricing, the ledger); a
provider only talks to its backend.

Example::

    class Echo(Provider):
        async def send(self, request: ProviderRequest) -> ProviderResponse:
            text = request.body["messages"][-1]["content"]
            return ProviderResponse(body={
                "id": "chatcmpl-echo", "object": "chat.completion", "created": 0,
                "model": request.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
            })
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat.completions", "completions", "embeddings"]

Chunk = dict[str, Any]
"""One decoded stream chunk, shaped like OpenAI's (`chat.completion.chunk` or `text_completion`)."""


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

    A stream yields chunk objects as the backend produces them and may raise
    `UpstreamError` part-way; closing it (`aclose()`) must cancel the upstream work.
    A stream may also offer a boolean attribute `ready`, true when its next chunk is
    already at hand; the gateway then sends such chunks together in one write.
    `headers` carries upstream headers worth passing on (none are required).
    """

    body: dict[str, Any] | None = None
    stream: AsyncIterator[Chunk] | None = None
    headers: dict[str, str] = field(default_factory=dict)


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
    - A non-streaming body and the last chunk of a stream carry OpenAI `usage`
      when the backend knows it; the gateway counts locally when it is absent.
    - Providers are shared by all requests and must be safe for concurrent use.
    """

    name: str = "provider"

    @abstractmethod
    async def send(self, request: ProviderRequest) -> ProviderResponse:
        """Send one request to the backend."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background tasks."""
