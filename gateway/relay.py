"""The request path of the OpenAI endpoints, top to bottom as the data flows:

authenticate → read and validate the body → route → count the prompt → quote a price →
admit (quotas) → forward (the router) → count the output → price → record → observe →
settle.

`Relay.handle` runs it for `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings`,
and, given a `gateway.dialects.Dialect`, for APIs translated to chat completions
(`/v1/responses`, `/v1/messages`). Each step hands its result to the next as a small frozen
value: `Authenticated` → `Priced` → `Admitted` → the router's `Forwarded` (read as `Served`)
→ `Outcome` → `UsageRecord` (with the upstream's `TokenUsage`, a `Bill`). The one thing that
changes while a request runs is its `Progress`: the output a stream has delivered so far,
written by the step that relays it and read by the crash policy's provisional record.
Every request that got past authentication ends in exactly one `UsageRecord`, written by
`Relay.book` whether it succeeded, was refused, failed upstream or was cut short.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from billing.compute_cost import ComputeCosts
from billing.ids import new_request_id
from billing.ledger import Ledger
from billing.pricing import PriceCatalog, Unpriced
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
from gateway.answers import JSONAnswer, StreamAnswer
from gateway.auth import Directory
from gateway.errors import (
    ApiError,
    body_too_large,
    invalid_request,
    model_not_found,
    server_error,
    service_unavailable,
)
from gateway.metrics import Metrics
from gateway.routing import Deployment, ForwardFailed, ModelConfig, Router, UnknownModel
from gateway.schemas import MAX_JSON_DEPTH, decode_body
from gateway.steps import Admitted, Authenticated, Bill, Outcome, Priced, Routed, Served, Step
from gateway.tokens import TokenCounter
from providers.base import (
    Chunk,
    Chunks,
    ChunkView,
    Endpoint,
    ProviderRequest,
    TokenUsage,
    UpstreamError,
)

if TYPE_CHECKING:
    from gateway.dialects import Dialect

log = logging.getLogger("maas.relay")
_encode = msgspec.json.Encoder().encode
_decode_chunk = msgspec.json.Decoder(dict[str, Any]).decode
_view = msgspec.json.Decoder(ChunkView).decode
_NULL_USAGE = b'"usage":null'  # what OpenAI's chunks say before the usage chunk
_DONE = b"data: [DONE]\n\n"
#: How often (at most) a stream's crash-policy record recounts the output delivered so far.
PROVISIONAL_RECOUNT_S = 1.0
#: At most this many chunks relayed untouched are held before their text is taken out.
PENDING_CHUNKS = 256
_KIND_OF_ENDPOINT = {"chat.completions": "chat", "completions": "chat", "embeddings": "embedding"}


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


_NOT_SERVED = Served()


class Progress:
    """What an admitted request has delivered so far: the output text by choice, the usage
    its upstream reported, and (once written) its record. Written by the step that relays
    the answer; read by the crash policy's provisional record, which keeps its last row
    and checkpoint here.

    Reads relayed untouched are kept as they came (`pending`) and their text taken out
    only when it is needed (a count, or more than `PENDING_CHUNKS` chunks held).
    """

    __slots__ = (
        "checkpoint",
        "pending",
        "pending_chunks",
        "provisional",
        "provisional_at",
        "record",
        "reported",
        "served",
        "texts",
    )

    def __init__(self) -> None:
        self.texts: dict[Any, list[str]] = {}
        self.pending: list[Chunks] = []
        self.pending_chunks = 0
        self.reported: TokenUsage | None = None
        self.served: Served = _NOT_SERVED
        self.record: UsageRecord | None = None
        self.checkpoint: tuple[int, float, int] = (0, 0.0, 0)  # chunks, when, output tokens
        self.provisional: UsageRecord | None = None  # the crash policy's row, as last built
        self.provisional_at = 0.0

    def served_by(self, served: Served) -> None:
        """The upstream has answered: the crash policy's row is rebuilt to name it."""
        self.served = served
        self.provisional = None

    def hold(self, read: Chunks) -> None:
        """A read relayed untouched: its text is taken out later, in order."""
        self.pending.append(read)
        self.pending_chunks += len(read.raw)
        if self.pending_chunks > PENDING_CHUNKS:
            self.collect()

    def collect(self) -> dict[Any, list[str]]:
        """The delivered text by choice, the held reads' included."""
        pending = self.pending
        if pending:
            self.pending = []
            self.pending_chunks = 0
            for read in pending:
                try:
                    views = read.views
                except msgspec.DecodeError:  # JSON, but not a chunk's shape: no text in it
                    views = [v for v in map(_view_or_none, read.raw) if v is not None]
                for view in views:
                    self.add(view)
        return self.texts

    def add(self, view: ChunkView) -> None:
        """A chunk relayed (rewritten or not): its text, after any held before it."""
        if not view.choices:
            return
        if self.pending:
            self.collect()
        texts = self.texts
        for choice in view.choices:
            parts = choice.texts()
            if parts:
                delivered = texts.get(choice.index)
                if delivered is None:
                    texts[choice.index] = parts
                else:
                    delivered += parts

    def size(self) -> int:
        """How many pieces of text (and held chunks) have been delivered."""
        return sum(len(t) for t in self.texts.values()) + self.pending_chunks

    def delivered(self) -> bool:
        return any(self.collect().values())

    def bill(self) -> Bill:
        """The bill, once the record is written."""
        assert self.record is not None
        return Bill(self.record, self.reported)


class _Splicer:
    """Puts the public model name into chunks that name the upstream's, without decoding.

    Most servers (vLLM, SGLang, Ollama, OpenAI) begin every chunk of a stream alike, up to
    and including the model's name (`{"id":"…","object":"…","created":…,"model":"m"`).
    When each chunk of a read starts with the first one's start, the read is spliced by
    cutting that start off each chunk and joining the rest behind the public start: no
    search through the read. Otherwise (llama.cpp names the model after `choices`) the name
    is replaced and the replacements counted: each chunk must name the model once.
    """

    __slots__ = ("grow", "named", "renamed", "upstream")

    def __init__(self, upstream: str, public: str) -> None:
        self.renamed = b'"model":' + _encode(public)
        self.follow(upstream)

    def follow(self, upstream: str) -> None:
        """Splice over `upstream` from now on: the name the upstream's chunks say."""
        self.upstream = upstream
        self.named = b'"model":' + _encode(upstream)
        self.grow = len(self.renamed) - len(self.named)

    def wire(self, head: list[bytes]) -> bytes | None:
        """Plain chunks (one line each, with choices, no usage) as SSE events naming the
        public model; None when one does not name the upstream's model once."""
        named, renamed = self.named, self.renamed
        first = head[0]
        at = first.find(named)
        end = at + len(named)
        if at >= 0 and first.count(b"{", 0, end) == 1:  # the object's own `model`
            start = first[:end]
            if all(map(bytes.startswith, head, repeat(start))):
                if named == renamed:
                    return b"data: " + b"\n\ndata: ".join(head) + b"\n\n"
                public = first[:at] + renamed
                rest = [chunk[end:] for chunk in head]
                return b"data: " + public + (b"\n\ndata: " + public).join(rest) + b"\n\n"
        n = len(head)
        sse = b"data: " + b"\n\ndata: ".join(head) + b"\n\n"
        if named == renamed:
            return sse if sse.count(named) == n else None
        if self.grow:  # the length of the spliced read counts the splices
            spliced = sse.replace(named, renamed)
            return spliced if len(spliced) - len(sse) == self.grow * n else None
        return sse.replace(named, renamed) if sse.count(named) == n else None

    def chunk(self, raw: bytes) -> bytes | None:
        """One chunk naming the upstream's model once, spliced; else None."""
        if self.named == self.renamed:
            return raw
        return raw.replace(self.named, self.renamed) if raw.count(self.named) == 1 else None


def _view_or_none(raw: bytes) -> ChunkView | None:
    try:
        return _view(raw)
    except msgspec.DecodeError:
        return None


def authenticate(
    services: Services,
    credential: str | None,
    endpoint: Endpoint,
    api: str,
    request_id: str | None = None,
) -> Authenticated:
    """Step 1: the key and tenant a credential stands for (raises the refusal `ApiError`)."""
    now = services.clock()
    key, tenant = services.directory.authenticate(credential, now)
    return Authenticated(
        request_id or new_request_id(), key, tenant, endpoint, api, now, time.perf_counter()
    )


def record_usage(
    services: Services, step: Step, outcome: Outcome, served: Served = _NOT_SERVED
) -> UsageRecord:
    """Price, record and observe a request's outcome (synchronously, so nothing is lost)."""
    rec = build_record(services, step, served, outcome)
    services.ledger.record(rec)
    total_s = rec.duration_ms / 1000
    upstream = served.upstream_s
    overhead = total_s - upstream if upstream is not None else total_s
    metrics = services.metrics
    try:  # the request is recorded: observing it must never fail it
        metrics.observe_request(rec, overhead_s=overhead, upstream_s=upstream)
    except Exception as exc:
        metrics.observation_failed(exc)
    return rec


def build_record(services: Services, step: Step, served: Served, outcome: Outcome) -> UsageRecord:
    """The ledger row of a request that got as far as `step` and ended as `outcome`."""
    who = step.who
    priced = step.priced if isinstance(step, Admitted) else step
    model = priced.model if not isinstance(priced, Authenticated) else ""
    quote = priced.quote if isinstance(priced, Priced) else None
    usage = outcome.usage
    deployment = served.deployment
    costs = services.compute_costs
    compute = (
        costs.cost_nanos(deployment.name, usage, who.started)
        if costs is not None and deployment is not None
        else 0
    )
    return UsageRecord(
        request_id=who.request_id,
        started_at=who.started,
        tenant_id=who.tenant.id,
        key_id=who.key.id,
        model=model,
        endpoint=who.api,
        provider=deployment.provider_name if deployment else "",
        deployment=deployment.name if deployment else "",
        usage=usage,
        currency=quote.currency if quote else who.tenant.currency,
        price_version=quote.version if quote else "",
        unit_price_input_nanos=quote.input_nanos if quote else 0,
        unit_price_cached_nanos=quote.cached_nanos if quote else 0,
        unit_price_output_nanos=quote.output_nanos if quote else 0,
        list_unit_price_input_nanos=quote.list_input_nanos if quote else None,
        list_unit_price_cached_nanos=quote.list_cached_nanos if quote else None,
        list_unit_price_output_nanos=quote.list_output_nanos if quote else None,
        cost_nanos=quote.cost(usage) if quote else 0,
        list_cost_nanos=quote.list_cost(usage) if quote else 0,
        compute_cost_nanos=compute,
        status_code=outcome.status_code,
        error_type=outcome.error_type,
        stream=priced.stream if isinstance(priced, Priced) else False,
        stream_cut_by=outcome.cut_by,
        attempts=served.attempts,
        ttft_ms=served.ttft_s * 1000 if served.ttft_s is not None else None,
        duration_ms=(time.perf_counter() - who.t0) * 1000,
    )


def _billed(reported: TokenUsage) -> Usage:
    return Usage(
        reported.uncached_input, reported.cached_input, reported.output, reported.reasoning
    )


class Relay:
    """Runs the request path for the OpenAI endpoints."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._settling: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait for the settles still running in the background (call on shutdown, before
        the quota store closes)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def handle(
        self, endpoint: Endpoint, request: Request[Any, Any, Any], dialect: Dialect | None = None
    ) -> Response[Any]:
        """Serve one request; a `dialect` translates another API to and from `endpoint`."""
        s = self.services
        edge = dialect or _OPENAI
        request_id = new_request_id()
        try:
            who = authenticate(
                s,
                edge.authorization(request),
                endpoint,
                dialect.name if dialect is not None else endpoint,
                request_id,
            )
        except ApiError as refused:
            return edge.error_response(refused, request_id)
        step: Step = who
        served = _NOT_SERVED
        try:
            try:  # awaited here, not in a helper coroutine: one frame less to resume
                raw = await request.body()
            except HTTPException as exc:
                raise _body_error(request, exc) from None
            body, typed = (
                await dialect.decode(raw, who, s.max_json_depth)
                if dialect is not None
                else decode_body(endpoint, raw, s.max_json_depth)
            )
            model = self._route(who, typed.model)
            step = Routed(who, model.name)
            step = priced = self._price(who, model, body, typed)
            limit_field, requested = _output_limit(endpoint, body)
            n = int(body.get("n") or 1)
            wanted = requested if requested is not None else s.default_max_output_tokens
            step = admitted = Admitted(priced, await self._admit(priced, wanted * n, n))
            progress = Progress()
            s.ledger.admit(request_id, lambda: self._provisional(admitted, progress))
            if endpoint != "embeddings":
                granted = admitted.admission.granted_max_tokens // n
                if requested is None or granted < requested:
                    body[limit_field] = max(granted, 1)
                if priced.stream:
                    body["stream_options"] = {"include_usage": True}
            options = getattr(typed, "stream_options", None)
            include_usage = bool(options and options.include_usage)

            def make_request(deployment: Deployment) -> ProviderRequest:
                return ProviderRequest(
                    endpoint,
                    deployment.model,
                    {**body, "model": deployment.model},
                    request_id,
                    connect_timeout_s=deployment.timeouts.connect_s,
                )

            started = time.perf_counter()
            try:
                forwarded = await s.router.forward(model, who.tenant.id, make_request)
            except ForwardFailed as failed:
                served = Served(
                    failed.deployment, failed.attempts, None, time.perf_counter() - started
                )
                if failed.status_code in (401, 403):
                    log.warning("upstream refused the gateway's credentials: %s", failed.message)
                raise upstream_api_error(failed) from None
            served = Served(
                forwarded.deployment,
                forwarded.attempts,
                forwarded.upstream_ttft_s,
                time.perf_counter() - started,
            )
            progress.served_by(served)
        except ApiError as error:
            return await self._refused(edge, step, served, error)
        except Exception:
            log.exception("request %s failed", request_id)
            return await self._refused(edge, step, served, server_error(request_id))
        response = forwarded.response
        headers = {"x-request-id": request_id, **admitted.admission.headers}
        if response.stream is not None:
            relayed = self._relay_stream(admitted, response.stream, include_usage, progress)
            try:
                sse = await _started(relayed)
            except Exception:  # a bug: the stream's own bookkeeping has written its row
                log.exception("request %s failed", request_id)
                return edge.error_response(server_error(request_id), request_id)
            s.ledger.journal_admitted()  # before the caller can see this request's id
            headers["cache-control"] = "no-cache"
            return StreamAnswer(
                dialect.stream(sse, admitted, progress.bill) if dialect else sse, headers=headers
            )
        result = response.body or {}
        reported = response.usage
        if reported is not None:
            usage = _billed(reported)
        else:
            output = self._count_output(priced.model, _message_texts(result))
            usage = Usage(uncached_input=priced.prompt_tokens, output=output)
        rec = progress.record = record_usage(s, admitted, Outcome(usage), served)
        progress.reported = reported
        bill = progress.bill()
        try:
            result["model"] = priced.model
            if isinstance(result.get("usage"), dict):
                result["usage"]["maas"] = bill.cost_object()
            if dialect is not None:
                result = await dialect.answer(result, admitted, bill)
            content = _encode(result)
        except Exception:  # recorded already: answer the error, write no second row
            log.exception("request %s failed", request_id)
            await self._settle(admitted, rec)
            return edge.error_response(server_error(request_id), request_id)
        await self._settle(admitted, rec)  # without waiting for Redis where it can
        headers.update(bill.headers())  # after the admission's, as before: one dict, no copy
        return JSONAnswer(content, media_type="application/json", headers=headers)

    async def _refused(
        self, edge: Any, step: Step, served: Served, error: ApiError
    ) -> Response[Any]:
        """Record a request that ends in an error, release its reservation, answer it.

        A request that was admitted keeps the rate-limit headers of its admission.
        """
        outcome = Outcome(Usage(), error.status_code, error.code or error.type)
        rec = record_usage(self.services, step, outcome, served)
        limits: dict[str, str] = {}
        if isinstance(step, Admitted):
            limits = step.admission.headers
            await self._settle(step, rec)
        return edge.error_response(error, step.who.request_id, limits)  # type: ignore[no-any-return]

    def _route(self, who: Authenticated, requested: str) -> ModelConfig:
        try:
            model = self.services.router.resolve(requested)
        except UnknownModel:
            raise model_not_found(requested) from None
        if not who.key.allows(model.name):
            raise model_not_found(requested)
        if _KIND_OF_ENDPOINT[who.endpoint] != (
            "embedding" if model.kind == "embedding" else "chat"
        ):
            raise invalid_request(
                f"The model `{requested}` does not support this endpoint.", param="model"
            )
        return model

    def _price(
        self, who: Authenticated, model: ModelConfig, body: dict[str, Any], typed: Any
    ) -> Priced:
        prompt_tokens = self._count_prompt(model.name, who.endpoint, typed)
        try:
            quote = self.services.pricing.quote(
                model.name, prompt_tokens, who.started, who.tenant.plan
            )
        except Unpriced as exc:
            raise ApiError(400, str(exc), param="model", code="model_not_priced") from None
        return Priced(who, model.name, bool(body.get("stream")), prompt_tokens, quote)

    def _count_prompt(self, model: str, endpoint: Endpoint, typed: Any) -> int:
        counter = self.services.counter
        if endpoint == "chat.completions":
            messages = [msgspec.structs.asdict(m) for m in typed.messages]
            tools = [msgspec.to_builtins(t) for t in typed.tools] if typed.tools else None
            return counter.count_chat(model, messages, tools)
        if endpoint == "completions":
            return counter.count_prompt(model, typed.prompt)
        return counter.count_input(model, typed.input)

    def _count_output(self, model: str, texts: dict[Any, list[str]]) -> int:
        count = self.services.counter.count_text
        return sum(count(model, "".join(parts)) for parts in texts.values())

    async def _admit(self, priced: Priced, max_tokens: int, n: int) -> Admission:
        who = priced.who
        tenant, key, model = who.tenant, who.key, priced.model
        scopes = [Scope(f"tenant:{tenant.id}", tenant.limits, tenant.timezone)]
        if key.limits is not None:
            scopes.append(Scope(f"key:{key.id}", key.limits, tenant.timezone))
        model_limits = tenant.model_limits.get(model)
        if model_limits is not None:
            scopes.append(Scope(f"tenant:{tenant.id}:model:{model}", model_limits, tenant.timezone))
        embeddings = who.endpoint == "embeddings"
        quote = priced.quote
        request = AdmitRequest(
            request_id=who.request_id,
            scopes=scopes,
            prompt_tokens=priced.prompt_tokens,
            max_tokens=0 if embeddings else max_tokens,
            min_tokens=0 if embeddings else n,  # at least one output token per choice
            input_cost_nanos=quote.input_nanos * priced.prompt_tokens,
            output_price_nanos=quote.output_nanos,
            balance_account=tenant.id if tenant.prepaid else None,
            now=who.started,
        )
        try:
            return await self.services.quotas.admit(request)
        except QuotaExceeded as exc:
            # Counted here, by the limit that refused: an upstream's 429 is no quota refusal.
            metrics = self.services.metrics
            try:
                metrics.observe_refusal(tenant.id, model, exc.reason)
            except Exception as error:
                metrics.observation_failed(error)
            raise quota_error(exc) from None
        except QuotaUnavailable:
            raise service_unavailable(
                "The quota service is unavailable; the request was not admitted. Retry shortly."
            ) from None

    def _provisional(self, admitted: Admitted, progress: Progress) -> UsageRecord:
        """The row the crash policy gives this request if the gateway dies now.

        Output delivered by the last checkpoint is billed (the prompt is not: the gateway
        failed). The row is kept and handed out again until a checkpoint moves or it is a
        second old: the journal asks for every open request's row at each new segment, and
        rebuilding them all each time stalled the event loop (a millisecond at 64 streams).
        """
        now = time.perf_counter()
        kept = progress.provisional
        if kept is not None and now - progress.provisional_at < PROVISIONAL_RECOUNT_S:
            return kept
        if now - progress.checkpoint[1] >= 2 * PROVISIONAL_RECOUNT_S:
            self._checkpoint(admitted, progress, now)  # a stream stalled since its last read
        output = progress.checkpoint[2]
        outcome = Outcome(
            Usage(output=output),
            GATEWAY_DIED_STATUS,
            GATEWAY_DIED,
            "gateway" if admitted.priced.stream and output else None,
        )
        rec = build_record(self.services, admitted, progress.served, outcome)
        progress.provisional, progress.provisional_at = rec, now
        return rec

    def _checkpoint(self, admitted: Admitted, progress: Progress, now: float) -> None:
        """Recount the whole delivered text for the crash policy's row, if it has grown.

        A stream takes one as it relays (after its first read, then at most once a second),
        in its own task: spread over the streams, not all at once when the journal asks.
        """
        if progress.size() == progress.checkpoint[0]:
            return
        output = self._count_output(admitted.priced.model, progress.collect())
        progress.checkpoint = (progress.size(), now, output)
        progress.provisional = None

    def _stream_usage(self, admitted: Admitted, progress: Progress, cut_by: str | None) -> Usage:
        """Upstream usage when it is authoritative, else counted from what was delivered."""
        reported = progress.reported
        if reported is not None and cut_by is None:
            return _billed(reported)
        if cut_by is not None and not progress.delivered():
            return Usage(uncached_input=admitted.prompt_tokens) if cut_by == "client" else Usage()
        output = self._count_output(admitted.priced.model, progress.collect())
        if cut_by == "upstream":
            return Usage(output=output)  # the upstream failed: the prompt is not billed
        return Usage(uncached_input=admitted.prompt_tokens, output=output)

    async def _relay_stream(
        self,
        admitted: Admitted,
        stream: AsyncIterator[Chunks],
        include_usage: bool,
        progress: Progress,
    ) -> AsyncGenerator[bytes, None]:
        """Relay each upstream read in one write as it arrives; record before the last
        bytes go out, settle after.

        A chunk whose model is already the public one, and that carries no usage the caller
        did not ask for, leaves as the upstream wrote it; others are rewritten. Either way
        its text is counted toward what was delivered.
        """
        s = self.services
        public = admitted.priced.model
        served = progress.served
        splicer = _Splicer(
            served.deployment.model if served.deployment is not None else public, public
        )
        named_checked = False  # whether a chunk has said the upstream's name for its model
        usage_chunk: bytes | None = None
        usage_seen: dict[str, Any] | None = None
        carried: list[bytes] = []
        completed = False
        try:
            try:
                async for read in stream:
                    if read.usage is not None:
                        progress.reported = read.usage
                    raws = read.raw
                    if not named_checked and raws:
                        # An upstream may name its model its own way (a dated or tagged
                        # name): the first chunk that names one says which to splice over.
                        first = _view_or_none(raws[0])
                        model = first.model if first is not None else None
                        if isinstance(model, str):
                            named_checked = True
                            if model != splicer.upstream:
                                splicer.follow(model)
                    out: list[bytes] = []
                    # The read leaves as it came (the model's name spliced in) up to a
                    # usage-bearing tail (the usage chunk), when each chunk is one line, has
                    # choices and names the model once: checks at C speed, nothing decoded.
                    # OpenAI, SGLang, TGI and Ark put `"usage":null` in every other chunk:
                    # such chunks pass too (without it when the caller did not ask for usage).
                    n = len(raws)
                    while n and b'"usage"' in raws[n - 1] and _NULL_USAGE not in raws[n - 1]:
                        n -= 1
                    tail: list[bytes] = raws
                    if n:
                        head = raws if n == len(raws) else raws[:n]
                        flat = b"".join(head)
                        nulls = 0
                        if b'"usage"' in flat:
                            nulls = flat.count(_NULL_USAGE)
                            plain = nulls == flat.count(b'"usage"')
                        else:
                            plain = True
                        if (
                            plain
                            and b"\n" not in flat  # a memchr, where a count would scan it all
                            and flat.count(b'"choices":[{') == n
                        ):
                            wire = splicer.wire(head)
                            if wire is not None and nulls and not include_usage:
                                bare = wire.replace(b"," + _NULL_USAGE, b"")
                                dropped = len(wire) - len(bare) == (len(_NULL_USAGE) + 1) * nulls
                                wire = bare if dropped else None
                            if wire is not None:
                                out.append(wire)
                        if out:
                            progress.hold(read if head is raws else Chunks(head))
                            tail = raws[n:]
                    views = read.views if tail is raws else [_view(raw) for raw in tail]
                    for view, raw in zip(views, tail, strict=True):
                        if view.usage:
                            usage_seen = view.usage
                        if not view.choices:
                            if view.usage:
                                usage_chunk = raw
                            continue
                        progress.add(view)
                        if (include_usage or b'"usage"' not in raw) and b"\n" not in raw:
                            if view.model == public:
                                out.append(b"data: " + raw + b"\n\n")
                                continue
                            spliced = splicer.chunk(raw) if view.model == splicer.upstream else None
                            if spliced is not None:
                                out.append(b"data: " + spliced + b"\n\n")
                                continue
                        chunk = _decode_chunk(raw)
                        chunk["model"] = public
                        if not include_usage:
                            chunk.pop("usage", None)
                        out.append(b"data: " + _encode(chunk) + b"\n\n")
                    if out:
                        if read.final:  # the last read goes out with the usage and [DONE]
                            carried = out
                        else:
                            yield b"".join(out)
                            now = time.perf_counter()
                            if now - progress.checkpoint[1] >= PROVISIONAL_RECOUNT_S:
                                self._checkpoint(admitted, progress, now)
            except UpstreamError as exc:
                outcome = Outcome(
                    self._stream_usage(admitted, progress, "upstream"),
                    exc.status_code if exc.status_code >= 400 else 502,
                    exc.type,
                    "upstream",
                )
                progress.record = record_usage(s, admitted, outcome, served)
                carried.append(b"data: " + upstream_api_error(exc).encode() + b"\n\n")
                yield b"".join(carried)
                return
            completed = True
            rec = progress.record = record_usage(
                s, admitted, Outcome(self._stream_usage(admitted, progress, None)), served
            )
            if not include_usage:
                carried.append(_DONE)
                yield b"".join(carried)
                return
            final = (
                _decode_chunk(usage_chunk)
                if usage_chunk is not None
                else _usage_chunk(admitted, public)
            )
            final["model"] = public
            final["usage"] = {**(usage_seen or rec.usage.to_openai())}
            final["usage"]["maas"] = progress.bill().cost_object()
            carried.append(b"data: " + _encode(final) + b"\n\n" + _DONE)
            yield b"".join(carried)
        finally:
            if not completed and progress.record is None:
                outcome = Outcome(
                    self._stream_usage(admitted, progress, "client"),
                    499,
                    "client_disconnected",
                    "client",
                )
                progress.record = record_usage(s, admitted, outcome, served)
            await _close_quietly(stream)
            if progress.record is not None:
                await self._settle_later(admitted, progress.record)

    def _settled_soon(self, admitted: Admitted, rec: UsageRecord) -> bool:
        """Settle without waiting, when the quota store can take it so (`settle_soon`: a
        standalone Redis's pipelined connection, or memory); False: it must be awaited."""
        usage = rec.usage.total
        return self.services.quotas.settle_soon(admitted.admission, usage, rec.cost_nanos)

    async def _settle(self, admitted: Admitted, rec: UsageRecord) -> None:
        """Charge the reservation with the real cost and release the rest, without waiting
        for the quota store where it can take the settle so."""
        if not self._settled_soon(admitted, rec):
            await self._settle_awaited(admitted, rec)

    async def _settle_awaited(self, admitted: Admitted, rec: UsageRecord) -> None:
        try:
            await self.services.quotas.settle(admitted.admission, rec.usage.total, rec.cost_nanos)
        except QuotaUnavailable:
            log.warning("settle of %s deferred: quota store unavailable", admitted.request_id)

    async def _settle_later(self, admitted: Admitted, rec: UsageRecord) -> None:
        """`_settle` for a stream's end: an awaited settle runs shielded, so that when a
        departing client cancels the request, settling goes on (`drain` waits for it on
        shutdown)."""
        if self._settled_soon(admitted, rec):
            return
        task = asyncio.ensure_future(self._settle_awaited(admitted, rec))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)


def _body_error(request: Request[Any, Any, Any], exc: HTTPException) -> ApiError:
    """The 4xx for a body over `server.max_body_bytes` (or unreadable)."""
    if exc.status_code == 413:
        size = request.app.request_max_body_size
        return body_too_large(size if isinstance(size, int) else 0)
    return invalid_request(exc.detail)


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


def _usage_chunk(admitted: Admitted, model: str) -> Chunk:
    who = admitted.who
    chat = who.endpoint == "chat.completions"
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + who.request_id[4:],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(who.started.timestamp()),
        "model": model,
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
    return JSONAnswer(
        error.encode(),
        status_code=error.status_code,
        media_type="application/json",
        headers={"x-request-id": request_id, **(limits or {}), **error.headers},
    )
