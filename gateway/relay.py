"""The request path of the OpenAI endpoints, top to bottom as the data flows:

authenticate → validate → route → count → price → admit → forward → count output →
settle → record → observe.

`Relay.handle` runs it for `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings`,
and, given a `gateway.dialects.Dialect`, for APIs translated to chat completions
(`/v1/responses`, `/v1/messages`).
Every request that got past authentication ends in exactly one `UsageRecord`, written by
`Metering.finish` whether it succeeded, was refused, failed upstream or was cut short.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Stream

from billing.compute_cost import ComputeCosts
from billing.ids import new_request_id as _time_ordered_request_id
from billing.ledger import Ledger
from billing.money import format_amount
from billing.pricing import PriceCatalog, Quote, Unpriced
from billing.quota import (
    Admission,
    AdmitRequest,
    QuotaExceeded,
    QuotaStore,
    QuotaUnavailable,
    Scope,
)
from billing.record import GATEWAY_DIED, GATEWAY_DIED_STATUS, UsageRecord
from billing.usage import Usage
from gateway.auth import ApiKey, Directory, Tenant
from gateway.errors import (
    ApiError,
    body_too_large,
    invalid_request,
    model_not_found,
    server_error,
    service_unavailable,
)
from gateway.metrics import Metrics
from gateway.routing import Deployment, Forwarded, ModelConfig, Router, UnknownModel
from gateway.schemas import MAX_JSON_DEPTH, decode_body
from gateway.tokens import TokenCounter
from providers.base import Chunk, Endpoint, ProviderRequest, UpstreamError

if TYPE_CHECKING:
    from gateway.dialects import Dialect

log = logging.getLogger("maas.relay")
_encode = msgspec.json.Encoder().encode
_DONE = b"data: [DONE]\n\n"
#: How often (at most) a stream's crash-policy record recounts the output delivered so far.
PROVISIONAL_RECOUNT_S = 1.0
_KIND_OF_ENDPOINT = {"chat.completions": "chat", "completions": "chat", "embeddings": "embedding"}


def new_request_id() -> str:
    return _time_ordered_request_id()


@dataclass(slots=True)
class Services:
    """Everything the request path calls, built once by the app factory."""

    directory: Directory
    router: Router
    counter: TokenCounter
    pricing: PriceCatalog
    quotas: QuotaStore
    ledger: Ledger
    metrics: Metrics
    default_max_output_tokens: int = 4096
    max_json_depth: int = MAX_JSON_DEPTH
    """Deepest nesting of arrays and objects a request body may have (`server.max_json_depth`)."""
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    """Wall-clock time of a request's start; the economics simulator runs a compressed one."""
    compute_costs: ComputeCosts | None = None
    """What serving tokens costs the operator, per deployment (`billing.compute_cost`)."""


class Metering:
    """One request's meter: collects what happened and writes it down exactly once."""

    __slots__ = (
        "admission",
        "attempts",
        "checkpoint",
        "cut_by",
        "delivered",
        "deployment",
        "dialect",
        "endpoint",
        "error_type",
        "finished",
        "key",
        "model",
        "prompt_tokens",
        "quote",
        "record",
        "request_id",
        "services",
        "started",
        "status_code",
        "stream",
        "t0",
        "tenant",
        "ttft_s",
        "upstream_s",
        "upstream_usage",
    )

    def __init__(
        self,
        services: Services,
        request_id: str,
        key: ApiKey,
        tenant: Tenant,
        endpoint: Endpoint,
        dialect: Dialect | None = None,
    ) -> None:
        self.services = services
        self.dialect = dialect
        self.request_id = request_id
        self.key = key
        self.tenant = tenant
        self.endpoint = endpoint
        self.t0 = time.perf_counter()
        self.started = services.clock()
        self.model = ""
        self.prompt_tokens = 0
        self.quote: Quote | None = None
        self.admission: Admission | None = None
        self.deployment: Deployment | None = None
        self.attempts = 0
        self.stream = False
        self.status_code = 200
        self.error_type: str | None = None
        self.cut_by: str | None = None
        self.upstream_usage: dict[str, Any] | None = None
        self.delivered: dict[int, list[str]] = {}
        self.ttft_s: float | None = None
        self.upstream_s: float | None = None
        self.finished = False
        self.record: UsageRecord | None = None
        self.checkpoint: tuple[int, float, int] = (0, 0.0, 0)  # parts, when, output tokens

    def fail(self, error: ApiError) -> None:
        self.status_code = error.status_code
        self.error_type = error.code or error.type

    def usage(self) -> Usage:
        """Upstream usage when it is authoritative, else counted from what was delivered."""
        if self.status_code >= 400 and self.cut_by is None and not any(self.delivered.values()):
            return Usage()  # refused, or failed before any output: error text is never billed
        if self.upstream_usage is not None and self.cut_by is None:
            return Usage.from_openai(self.upstream_usage)
        count = self.services.counter.count_text
        output = sum(count(self.model, "".join(parts)) for parts in self.delivered.values())
        if self.cut_by == "upstream":
            return Usage(output=output)  # the upstream failed: the prompt is not billed
        return Usage(uncached_input=self.prompt_tokens, output=output)

    def provisional(self) -> UsageRecord:
        """The row the crash policy gives this request if the gateway dies now.

        Output delivered by the last checkpoint is billed (the prompt is not: the gateway
        failed); checkpoints recount the whole delivered text at most once a second.
        """
        parts = sum(len(texts) for texts in self.delivered.values())
        seen, when, output = self.checkpoint
        now = time.perf_counter()
        if parts != seen and now - when >= PROVISIONAL_RECOUNT_S:
            count = self.services.counter.count_text
            output = sum(count(self.model, "".join(texts)) for texts in self.delivered.values())
            self.checkpoint = (parts, now, output)
        return self._build(
            Usage(output=output),
            GATEWAY_DIED_STATUS,
            GATEWAY_DIED,
            "gateway" if self.stream and output else None,
        )

    def finish(self) -> UsageRecord:
        """Price, record and observe (synchronously, so nothing is lost); returns the record."""
        if self.record is not None:
            return self.record
        rec = self._build(self.usage(), self.status_code, self.error_type, self.cut_by)
        self.record = rec
        self.services.ledger.record(rec)
        total_s = rec.duration_ms / 1000
        upstream = self.upstream_s
        overhead = total_s - upstream if upstream is not None else total_s
        metrics = self.services.metrics
        try:  # the request is recorded: observing it must never fail it
            metrics.observe_request(rec, overhead_s=overhead, upstream_s=upstream)
        except Exception as exc:
            metrics.observation_failed(exc)
        return rec

    def _build(
        self, usage: Usage, status_code: int, error_type: str | None, cut_by: str | None
    ) -> UsageRecord:
        quote = self.quote
        cost = quote.cost(usage) if quote else 0
        deployment = self.deployment
        costs = self.services.compute_costs
        compute = (
            costs.cost_nanos(deployment.name, usage, self.started)
            if costs is not None and deployment is not None
            else 0
        )
        return UsageRecord(
            request_id=self.request_id,
            started_at=self.started,
            tenant_id=self.tenant.id,
            key_id=self.key.id,
            model=self.model,
            endpoint=self.dialect.name if self.dialect is not None else self.endpoint,
            provider=deployment.provider_name if deployment else "",
            deployment=deployment.name if deployment else "",
            usage=usage,
            currency=quote.currency if quote else self.tenant.currency,
            price_version=quote.version if quote else "",
            unit_price_input_nanos=quote.input_nanos if quote else 0,
            unit_price_cached_nanos=quote.cached_nanos if quote else 0,
            unit_price_output_nanos=quote.output_nanos if quote else 0,
            list_unit_price_input_nanos=quote.list_input_nanos if quote else None,
            list_unit_price_cached_nanos=quote.list_cached_nanos if quote else None,
            list_unit_price_output_nanos=quote.list_output_nanos if quote else None,
            cost_nanos=cost,
            list_cost_nanos=quote.list_cost(usage) if quote else 0,
            compute_cost_nanos=compute,
            status_code=status_code,
            error_type=error_type,
            stream=self.stream,
            stream_cut_by=cut_by,
            attempts=self.attempts,
            ttft_ms=self.ttft_s * 1000 if self.ttft_s is not None else None,
            duration_ms=(time.perf_counter() - self.t0) * 1000,
        )

    async def settle(self) -> None:
        """Charge the reservation with the real cost and release the rest (once)."""
        admission, self.admission = self.admission, None
        if admission is None or self.record is None:
            return
        rec = self.record
        try:
            await self.services.quotas.settle(admission, rec.usage.total, rec.cost_nanos)
        except QuotaUnavailable:
            log.warning("settle of %s deferred: quota store unavailable", self.request_id)

    def cost_headers(self) -> dict[str, str]:
        rec = self.record
        if rec is None:
            return {}
        return {
            "x-maas-cost": format_amount(rec.cost_nanos),
            "x-maas-currency": rec.currency,
            "x-maas-prompt-tokens": str(rec.usage.input),
            "x-maas-cached-tokens": str(rec.usage.cached_input),
            "x-maas-completion-tokens": str(rec.usage.output),
            "x-maas-price-version": rec.price_version,
        }

    def cost_object(self) -> dict[str, str]:
        rec = self.record
        assert rec is not None
        return {
            "cost": format_amount(rec.cost_nanos),
            "currency": rec.currency,
            "price_version": rec.price_version,
        }


class Relay:
    """Runs the request path for the OpenAI endpoints."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def handle(
        self, endpoint: Endpoint, request: Request[Any, Any, Any], dialect: Dialect | None = None
    ) -> Response[Any]:
        """Serve one request; a `dialect` translates another API to and from `endpoint`."""
        request_id = new_request_id()
        s = self.services
        credential = (dialect or _OPENAI).authorization(request)
        try:
            key, tenant = s.directory.authenticate(credential, s.clock())
        except ApiError as refused:
            return (dialect or _OPENAI).error_response(refused, request_id)
        meter = Metering(s, request_id, key, tenant, endpoint, dialect)
        try:
            raw = await request.body()
        except HTTPException as exc:  # the body is over server.max_body_bytes
            size = request.app.request_max_body_size
            limit = size if isinstance(size, int) else 0
            too_big = exc.status_code == 413
            return await self._refused(
                meter, body_too_large(limit) if too_big else invalid_request(exc.detail)
            )
        try:
            return await self._admitted(meter, raw)
        except ApiError as error:
            return await self._refused(meter, error)
        except Exception:
            log.exception("request %s failed", request_id)
            return await self._refused(meter, server_error(request_id))

    async def _refused(self, meter: Metering, error: ApiError) -> Response[Any]:
        """Record a request that ends in an error, release its reservation, answer it.

        A request that was admitted keeps the rate-limit headers of its admission.
        """
        meter.fail(error)
        meter.finish()
        limits = meter.admission.headers if meter.admission is not None else {}
        await meter.settle()
        return (meter.dialect or _OPENAI).error_response(error, meter.request_id, limits)

    async def _admitted(self, meter: Metering, raw: bytes) -> Response[Any]:
        s = self.services
        endpoint = meter.endpoint
        dialect = meter.dialect
        body, typed = (
            await dialect.decode(raw, meter)
            if dialect
            else decode_body(endpoint, raw, s.max_json_depth)
        )
        model = self._route(meter, typed.model)
        meter.model = model.name
        meter.stream = bool(body.get("stream"))
        meter.prompt_tokens = prompt_tokens = self._count_prompt(model.name, endpoint, typed)
        try:
            quote = s.pricing.quote(model.name, prompt_tokens, meter.started, meter.tenant.plan)
        except Unpriced as exc:
            raise ApiError(400, str(exc), param="model", code="model_not_priced") from None
        meter.quote = quote
        limit_field, requested = _output_limit(endpoint, body)
        n = int(body.get("n") or 1)
        wanted = requested if requested is not None else s.default_max_output_tokens
        meter.admission = await self._admit(meter, prompt_tokens, wanted * n, quote, n)
        s.ledger.admit(meter.request_id, meter.provisional)  # a crash from here on: a row
        if endpoint != "embeddings":
            granted = meter.admission.granted_max_tokens // n
            if requested is None or granted < requested:
                body[limit_field] = max(granted, 1)
            if meter.stream:
                body["stream_options"] = {"include_usage": True}
        options = getattr(typed, "stream_options", None)
        include_usage = bool(options and options.include_usage)

        def make_request(deployment: Deployment) -> ProviderRequest:
            meter.deployment = deployment  # the last one tried names a failed request's row
            meter.attempts += 1
            return ProviderRequest(
                endpoint,
                deployment.model,
                {**body, "model": deployment.model},
                meter.request_id,
                connect_timeout_s=deployment.timeouts.connect_s,
            )

        forwarded = await self._forward(meter, model, make_request)
        headers = {"x-request-id": meter.request_id, **meter.admission.headers}
        response = forwarded.response
        if response.stream is not None:
            sse = await _started(self._relay_stream(meter, forwarded, include_usage))
            s.ledger.journal_admitted()  # before the caller can see this request's id
            return Stream(
                dialect.stream(sse, meter) if dialect else sse,
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        result = response.body or {}
        meter.upstream_usage = result.get("usage") if isinstance(result, dict) else None
        if meter.upstream_usage is None:
            meter.delivered = _message_texts(result)
        result["model"] = model.name
        meter.finish()
        if isinstance(result.get("usage"), dict):
            result["usage"]["maas"] = meter.cost_object()
        if dialect is not None:
            result = await dialect.answer(result, meter)
        await meter.settle()
        return Response(
            _encode(result),
            media_type="application/json",
            headers={**headers, **meter.cost_headers()},
        )

    def _route(self, meter: Metering, requested: str) -> ModelConfig:
        try:
            model = self.services.router.resolve(requested)
        except UnknownModel:
            raise model_not_found(requested) from None
        if not meter.key.allows(model.name):
            raise model_not_found(requested)
        if _KIND_OF_ENDPOINT[meter.endpoint] != (
            "embedding" if model.kind == "embedding" else "chat"
        ):
            raise invalid_request(
                f"The model `{requested}` does not support this endpoint.", param="model"
            )
        return model

    def _count_prompt(self, model: str, endpoint: Endpoint, typed: Any) -> int:
        counter = self.services.counter
        if endpoint == "chat.completions":
            messages = [msgspec.structs.asdict(m) for m in typed.messages]
            tools = [msgspec.to_builtins(t) for t in typed.tools] if typed.tools else None
            return counter.count_chat(model, messages, tools)
        if endpoint == "completions":
            return counter.count_prompt(model, typed.prompt)
        return counter.count_input(model, typed.input)

    async def _admit(
        self, meter: Metering, prompt_tokens: int, max_tokens: int, quote: Quote, n: int
    ) -> Admission:
        tenant, key = meter.tenant, meter.key
        scopes = [Scope(f"tenant:{tenant.id}", tenant.limits, tenant.timezone)]
        if key.limits is not None:
            scopes.append(Scope(f"key:{key.id}", key.limits, tenant.timezone))
        model_limits = tenant.model_limits.get(meter.model)
        if model_limits is not None:
            scopes.append(
                Scope(f"tenant:{tenant.id}:model:{meter.model}", model_limits, tenant.timezone)
            )
        embeddings = meter.endpoint == "embeddings"
        request = AdmitRequest(
            request_id=meter.request_id,
            scopes=scopes,
            prompt_tokens=prompt_tokens,
            max_tokens=0 if embeddings else max_tokens,
            min_tokens=0 if embeddings else n,  # at least one output token per choice
            input_cost_nanos=quote.input_nanos * prompt_tokens,
            output_price_nanos=quote.output_nanos,
            balance_account=tenant.id if tenant.prepaid else None,
            now=meter.started,
        )
        try:
            return await self.services.quotas.admit(request)
        except QuotaExceeded as exc:
            # Counted here, by the limit that refused: an upstream's 429 is no quota refusal.
            metrics = self.services.metrics
            try:
                metrics.observe_refusal(tenant.id, meter.model, exc.reason)
            except Exception as error:
                metrics.observation_failed(error)
            raise quota_error(exc) from None
        except QuotaUnavailable:
            raise service_unavailable(
                "The quota service is unavailable; the request was not admitted. Retry shortly."
            ) from None

    async def _forward(self, meter: Metering, model: ModelConfig, make_request: Any) -> Forwarded:
        started = time.perf_counter()
        try:
            forwarded = await self.services.router.forward(model, meter.tenant.id, make_request)
        except UpstreamError as exc:
            if exc.status_code in (401, 403):
                log.warning("upstream refused the gateway's credentials: %s", exc.message)
            raise upstream_api_error(exc) from None
        finally:
            meter.upstream_s = time.perf_counter() - started
        meter.deployment = forwarded.deployment
        meter.attempts = forwarded.attempts
        meter.ttft_s = forwarded.upstream_ttft_s
        return forwarded

    async def _relay_stream(
        self, meter: Metering, forwarded: Forwarded, include_usage: bool
    ) -> AsyncGenerator[bytes, None]:
        """Relay chunks as they arrive; settle and record before the last bytes go out."""
        stream = forwarded.response.stream
        assert stream is not None
        public_model = meter.model
        delivered = meter.delivered
        usage_chunk: Chunk | None = None
        completed = False
        # Chunks that came in one upstream read leave in one write (`ready` says whether
        # the next chunk is already at hand); nothing is held across a wait.
        out: list[bytes] = []
        try:
            try:
                async for chunk in stream:
                    usage = chunk.get("usage")
                    if usage:
                        meter.upstream_usage = usage
                    choices = chunk.get("choices")
                    if not choices:
                        if usage:
                            usage_chunk = chunk
                    else:
                        for choice in choices:
                            _collect_delta(choice, delivered.setdefault(choice.get("index", 0), []))
                        chunk["model"] = public_model
                        if not include_usage:
                            chunk.pop("usage", None)
                        out.append(b"data: " + _encode(chunk) + b"\n\n")
                    if out and not getattr(stream, "ready", False):
                        yield b"".join(out)
                        out.clear()
            except UpstreamError as exc:
                meter.cut_by = "upstream"
                meter.status_code = exc.status_code if exc.status_code >= 400 else 502
                meter.error_type = exc.type
                meter.finish()
                out.append(b"data: " + upstream_api_error(exc).encode() + b"\n\n")
                yield b"".join(out)
                return
            completed = True
            meter.finish()
            if include_usage:
                final = usage_chunk or _usage_chunk(meter)
                final["model"] = public_model
                final["usage"] = {**(meter.upstream_usage or meter.record.usage.to_openai())}  # type: ignore[union-attr]
                final["usage"]["maas"] = meter.cost_object()
                out.append(b"data: " + _encode(final) + b"\n\n")
            out.append(_DONE)
            yield b"".join(out)
        finally:
            if not completed and meter.record is None:
                meter.cut_by = "client"
                meter.status_code = 499
                meter.error_type = "client_disconnected"
                meter.finish()
            await _close_quietly(stream)
            await _settle_later(meter)


async def _started(stream: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """The relay's stream, run to its first bytes before the response is handed over.

    The first chunk is already at hand (the router waited for it), so this costs no wait.
    A stream that has started ends in its own bookkeeping whatever happens next: a client
    that leaves before the server reads it once still gets its row (cut by the client) at
    once, when the abandoned stream is closed; a never-started generator would run nothing.
    """
    first = await anext(stream)
    return _Primed(first, stream)


class _Primed:
    """A started stream: its first bytes, then the rest."""

    __slots__ = ("_first", "_rest")

    def __init__(self, first: bytes, rest: AsyncGenerator[bytes, None]) -> None:
        self._first: bytes | None = first
        self._rest = rest

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self) -> bytes:
        first = self._first
        if first is not None:
            self._first = None
            return first
        return await anext(self._rest)

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


async def _close_quietly(stream: Any) -> None:
    try:
        await stream.aclose()
    except Exception:  # the upstream is being abandoned; its errors are no longer ours
        log.debug("closing an upstream stream failed", exc_info=True)


_background: set[asyncio.Task[None]] = set()


async def _settle_later(meter: Metering) -> None:
    """Settle, shielded: when a departing client cancels the request, settling goes on."""
    task = asyncio.ensure_future(meter.settle())
    _background.add(task)
    task.add_done_callback(_background.discard)
    await asyncio.shield(task)


def _collect_delta(choice: dict[str, Any], delivered: list[str]) -> None:
    delta = choice.get("delta")
    if delta is None:  # /v1/completions chunks carry text directly
        text = choice.get("text")
        if text:
            delivered.append(text)
        return
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")  # DeepSeek, Ollama...
    if reasoning:
        delivered.append(reasoning)
    content = delta.get("content")
    if content:
        delivered.append(content)
    for call in delta.get("tool_calls") or ():
        function = call.get("function") or {}
        delivered.append((function.get("name") or "") + (function.get("arguments") or ""))


def _message_texts(body: dict[str, Any]) -> dict[int, list[str]]:
    """The output texts of a JSON answer, by choice."""
    texts: dict[int, list[str]] = {}
    for number, choice in enumerate(body.get("choices") or ()):
        parts = texts.setdefault(choice.get("index", number), [])
        message = choice.get("message")
        if message is None:
            parts.append(choice.get("text") or "")
            continue
        parts.append(message.get("reasoning_content") or message.get("reasoning") or "")
        parts.append(message.get("content") or "")
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            parts.append((function.get("name") or "") + (function.get("arguments") or ""))
    return texts


def _usage_chunk(meter: Metering) -> Chunk:
    chat = meter.endpoint == "chat.completions"
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + meter.request_id[4:],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(meter.started.timestamp()),
        "model": meter.model,
        "choices": [],
    }


def _output_limit(endpoint: Endpoint, body: dict[str, Any]) -> tuple[str, int | None]:
    """The body field that caps output, and the cap the caller asked for (if any)."""
    if endpoint == "chat.completions" and body.get("max_completion_tokens") is not None:
        return "max_completion_tokens", int(body["max_completion_tokens"])
    value = body.get("max_tokens")
    return "max_tokens", int(value) if value is not None else None


def quota_error(exc: QuotaExceeded) -> ApiError:
    if exc.kind == "insufficient_quota":
        return ApiError(
            429,
            exc.message,
            type="insufficient_quota",
            code="insufficient_quota",
            headers={**exc.headers, "x-should-retry": "false"},
        )
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(1, int(exc.retry_after_s + 0.999)))
        headers["retry-after-ms"] = str(int(exc.retry_after_s * 1000))
    return ApiError(
        429,
        exc.message,
        type="tokens" if exc.reason == "tpm" else "requests",
        code="rate_limit_exceeded",
        headers=headers,
    )


def upstream_api_error(exc: UpstreamError) -> ApiError:
    """An upstream failure as the caller sees it: the upstream's own 4xx, else a gateway 5xx."""
    status = exc.status_code
    if status == 429:
        headers = {"retry-after": str(max(1, int((exc.retry_after or 1) + 0.999)))}
        return ApiError(429, exc.message, type="rate_limit_error", code=exc.code, headers=headers)
    if status in (401, 403):  # the upstream refused the gateway's credential, not the caller's
        return ApiError(
            502,
            f"The upstream refused the gateway's credentials (HTTP {status}): a gateway "
            "configuration problem, not one of your API key.",
            type="upstream_error",
            code="upstream_auth_failed",
        )
    if 400 <= status < 500:
        return ApiError(
            status,
            exc.message,
            type=exc.type or "invalid_request_error",
            param=exc.param,
            code=exc.code,
        )
    status = status if status in (502, 503, 504) else 502
    return ApiError(status, exc.message, type="upstream_error", code=exc.code or exc.type)


class _OpenAIDialect:
    """The OpenAI endpoints' own credential and error shape."""

    @staticmethod
    def authorization(request: Request[Any, Any, Any]) -> str | None:
        return request.headers.get("authorization")

    @staticmethod
    def error_response(
        error: ApiError, request_id: str, limits: dict[str, str] | None = None
    ) -> Response[Any]:
        return error_response(error, request_id, limits)


_OPENAI = _OpenAIDialect()


def error_response(
    error: ApiError, request_id: str, limits: dict[str, str] | None = None
) -> Response[Any]:
    """An OpenAI-shaped error answer; `limits` are rate-limit headers to carry along."""
    return Response(
        error.encode(),
        status_code=error.status_code,
        media_type="application/json",
        headers={"x-request-id": request_id, **(limits or {}), **error.headers},
    )
