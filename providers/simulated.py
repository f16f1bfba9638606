"""The simulated model backend: OpenAI-shaped answers with a latency, capacity and failure model.

It is the gateway's embedded default and the upstream for load tests (served over HTTP by
`providers.simulate_server`). Every request goes through the same model:

- **Admission.** One uniform draw picks an injected fault (`errors.rate_429`, `rate_500`,
  `rate_timeout`, `rate_cut`; the rest succeed). A 429 or 500 is raised at once; a timeout
  hangs for `errors.timeout_s` and then raises a retryable 504.
- **Capacity.** A request takes one of `capacity` slots (concurrent sequences; a request with
  `n` > 1 still takes one) for its whole prefill and decode. When all are busy it waits in a
  FIFO queue; beyond `max_queue` waiting requests it is refused with a 429. Closing a stream
  (`aclose()`) or cancelling the task frees the slot at once and stops generation. An
  `admission` hook, when set (the economics simulator sets one to apply capacity on its
  simulated clock, `economics.capacity`), is asked first with the provider's name,
  the model and the request's prompt and output tokens; if it says no the request is
  refused with the same 429, not retryable.
- **Latency.** Time to first token, counted from when the slot is granted, is
  `ttft_overhead_ms + prefill_ms_per_token * prompt_tokens`. Every further token takes
  `itl_ms * slowdown`, where `slowdown = 1 + (slowdown_at_capacity - 1) * (running - 1) /
  (capacity - 1)` is read from the number of running sequences as decoding goes on (so a lone
  request runs at `itl_ms` and a full batch at `itl_ms * slowdown_at_capacity`). Each delay is
  multiplied by a jitter factor drawn from a Gaussian of mean 1 and sd `jitter`, clamped to
  [0.5, 2.0], and then by `time_scale` (0 means no sleeping at all).
- **Output.** The length of each choice is drawn from `output` (lognormal and normal take
  `mean`/`sd`; uniform spans `mean +- sqrt(3) * sd`; fixed is `mean`), rounded and clamped to
  [`output.min`, `output.max`], then capped by the request's `max_completion_tokens` or
  `max_tokens` (finish reason "length"; completions default to 16 as OpenAI's do). The text is
  made of words that are single tokens in the given encoding and never merge across a word
  boundary, so it has exactly the token count reported in `usage`; stream chunks carry
  `chunk_tokens` tokens each.
- **Determinism.** With `seed` set (or, without it, a `seed` in the request body), each request
  gets its own random generator seeded from the seed and the request body (less `stream` and
  `stream_options`), so its text, latency draws and injected fault do not depend on other
  requests; a streamed and a whole answer to the same body have the same text. Note that an
  injected fault then repeats for an identical body. Without any seed, draws are random.
- **Embeddings** are unit-norm vectors drawn from a hash of each input alone, so they are the
  same in every process; `dimensions` truncates and renormalises, `encoding_format: "base64"`
  packs little-endian float32.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import random
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import tiktoken
from pydantic import BaseModel, ConfigDict, Field, model_validator

from providers.base import Chunk, Provider, ProviderRequest, ProviderResponse, UpstreamError
from providers.lengths import draw_length

JITTER_CLAMP = (0.5, 2.0)
"""Bounds of the relative jitter factor applied to every delay."""

TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""Upper bounds of the time-to-first-token histogram (vLLM's), in seconds."""

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's legacy completions endpoint stops at 16 tokens unless `max_tokens` says otherwise."""

_TIMER_SLACK_S = 0.0002
"""A wake-up this close to its deadline counts as on time."""

_MAX_UNSLEPT_S = 0.02
"""A whole (non-stream) answer sleeps at least this often, so slowdown follows the load."""

_TEXT_FIELDS_SKIPPED = frozenset(
    {"type", "id", "tool_call_id", "image_url", "input_audio", "file", "refusal"}
)

_WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were had her she there been one all we their has would when if so no will can
more about them some out into time only could new other than first these then may any like now
my its over also after most made did many before must through back years where much your way
well down should because each just those people how too little state good very make world still
own see men work long here get both between life being under never day same another know while
last might great old year off come since against go came right used take three states himself
few house use during without again place around however home small found thought went say part
once general high upon school every does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet system
better set told nothing night end why called eyes find going look asked later point knew next
program city business give group toward young days let room side social given present several
order national possible rather second face per among form important often things looking early
white case become large big need four within felt along children saw best ever least power
development light thing seemed family interest want members others mind country area done
turned although open service certain kind problem began different door thus help sense means
whole matter perhaps itself times law human line above name example action company hands local
show whether five history gave today either act feet across taken past quite anything seen
having week experience body word half really field car words already themselves information
tell together college shall money period held keep sure probably free seems real behind cannot
question air office making brought whose special heard major problems ago became moment study
available known result street economic position reason change south board individual job areas
society west close turn love community true court force full seem policy
""".split()
_SENTENCE_STARTS = (
    "The It This We In A When There Our Each Every Most Many Some One Then After Before While Their"
).split()
_MIN_WORDS = 50
_SELF_CHECK_TOKENS = 3000

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_json_encode = msgspec.json.Encoder(order="sorted").encode


# --- configuration -------------------------------------------------------------------------


class OutputLength(BaseModel):
    """How many tokens a choice would say if `max_tokens` did not stop it."""

    model_config = ConfigDict(extra="forbid")

    distribution: Literal["lognormal", "normal", "uniform", "fixed"] = "lognormal"
    mean: float = Field(default=200, gt=0)
    sd: float = Field(default=100, ge=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> OutputLength:
        if self.min > self.max:
            raise ValueError("output.min must not exceed output.max")
        return self


class ErrorInjection(BaseModel):
    """Rates (0..1, summing to at most 1) of injected faults, each drawn once per request."""

    model_config = ConfigDict(extra="forbid")

    rate_429: float = Field(default=0, ge=0, le=1)
    rate_500: float = Field(default=0, ge=0, le=1)
    rate_timeout: float = Field(default=0, ge=0, le=1)
    rate_cut: float = Field(default=0, ge=0, le=1)
    timeout_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _rates_sum_to_at_most_one(self) -> ErrorInjection:
        if self.rate_429 + self.rate_500 + self.rate_timeout + self.rate_cut > 1 + 1e-9:
            raise ValueError("error rates must sum to at most 1")
        return self


class SimulatedConfig(BaseModel):
    """The latency, capacity, output and failure model of one simulated backend."""

    model_config = ConfigDict(extra="forbid")

    ttft_overhead_ms: float = Field(default=25.0, ge=0)
    prefill_ms_per_token: float = Field(default=0.02, ge=0)
    itl_ms: float = Field(default=15.0, ge=0)
    jitter: float = Field(
        default=0.1, ge=0, description="relative Gaussian sd, factor clamped to [0.5, 2]"
    )
    capacity: int = Field(
        default=64, ge=1, description="max concurrent sequences; beyond it requests queue"
    )
    slowdown_at_capacity: float = Field(
        default=2.0, ge=1, description="ITL multiplier with a full batch"
    )
    max_queue: int = Field(
        default=1024, ge=0, description="waiting requests beyond capacity; more -> 429"
    )
    output: OutputLength = Field(default_factory=OutputLength)
    errors: ErrorInjection = Field(default_factory=ErrorInjection)
    embedding_dimensions: int = Field(default=256, ge=1)
    chunk_tokens: int = Field(default=1, ge=1, description="tokens per stream chunk")
    time_scale: float = Field(
        default=1.0, ge=0, description="multiplies every delay; 0 never sleeps"
    )
    seed: int | None = None


# --- statistics ----------------------------------------------------------------------------

Outcome = Literal[
    "success",
    "rate_limited",
    "queue_full",
    "server_error",
    "timeout",
    "cut",
    "cancelled",
    "invalid",
]


@dataclass(frozen=True, slots=True)
class SimulatorStats:
    """A snapshot of one simulated backend, for vLLM-style metrics.

    `requests_total` counts finished requests by outcome ("success", "rate_limited",
    "queue_full", "server_error", "timeout", "cut", "cancelled", "invalid");
    `finished_total` counts successful ones by finish reason ("stop" or "length", where
    "length" means some choice was capped by `max_tokens`). `ttft_histogram` is cumulative:
    (upper bound in seconds, observations at or below it), ending with +Inf.
    """

    running: int
    waiting: int
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_total: dict[str, int]
    finished_total: dict[str, int]
    ttft_histogram: tuple[tuple[float, int], ...]
    ttft_sum_seconds: float


# --- the word pool -------------------------------------------------------------------------


class _Vocabulary:
    """Text units that are exactly one token each in an encoding, and compose without merging.

    Words carry a leading space (the pre-tokenizers of cl100k_base and o200k_base split before
    a space followed by letters), punctuation never follows punctuation, and the first unit of
    a chat answer has no leading space, so the token count of the text is the unit count.
    """

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        def single(text: str) -> bool:
            return len(encoding.encode_ordinary(text)) == 1

        self.words = [" " + w for w in _WORDS if single(" " + w)]
        self.starts = [" " + w for w in _SENTENCE_STARTS if single(" " + w) and single(w)]
        if len(self.words) < _MIN_WORDS or not self.starts or not (single(".") and single(",")):
            raise ValueError(f"encoding {encoding.name} has too few single-token words")
        self._verify(encoding)

    def _verify(self, encoding: tiktoken.Encoding) -> None:
        sample = random.Random(0)
        for leading_space in (False, True):
            for stop in (False, True):
                units = self.compose(sample, _SELF_CHECK_TOKENS, leading_space, stop)
                if len(encoding.encode_ordinary("".join(units))) != _SELF_CHECK_TOKENS:
                    raise ValueError(
                        f"encoding {encoding.name} merges simulated words across boundaries"
                    )

    def compose(self, rng: random.Random, count: int, leading_space: bool, stop: bool) -> list[str]:
        """`count` one-token units of sentence-like text; ends with "." when `stop`."""
        if count <= 0:
            return []
        units = rng.choices(self.words, k=count)
        start = 0
        while start < count:
            units[start] = rng.choice(self.starts)
            period = start + rng.randint(6, 18) - 1
            if period - start >= 7 and rng.random() < 0.5:
                comma = rng.randint(start + 2, period - 2)
                if comma < count:
                    units[comma] = ","
            if period < count:
                units[period] = "."
            start = period + 1
        if stop and count > 1:
            if units[-2][0] != " ":
                units[-2] = rng.choice(self.words)
            units[-1] = "."
        if not leading_space:
            units[0] = units[0][1:]
        return units


# --- capacity ------------------------------------------------------------------------------


class _Slots:
    """`capacity` slots with a bounded FIFO queue; `acquire` raises `_QueueFull` past it."""

    def __init__(self, capacity: int, max_queue: int) -> None:
        self.capacity = capacity
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise _QueueFull
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1


class _QueueFull(Exception):
    pass


# --- one request ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Choice:
    units: list[str]
    finish_reason: str

    @property
    def length(self) -> int:
        return len(self.units)


@dataclass(slots=True)
class _Job:
    """A generation request planned up front: its prompt, its choices and its draws."""

    request: ProviderRequest
    rng: random.Random
    received_at: float
    prompt_tokens: int
    choices: list[_Choice]
    ttft_s: float
    cut_at: int | None  # tokens (per choice, in lockstep) delivered before an injected cut
    first_token_at: float = 0.0

    @property
    def decode_length(self) -> int:
        longest = max(c.length for c in self.choices)
        return longest if self.cut_at is None else self.cut_at

    @property
    def completion_tokens(self) -> int:
        return sum(c.length for c in self.choices)

    @property
    def finish_reason(self) -> str:
        return "length" if any(c.finish_reason == "length" for c in self.choices) else "stop"


@dataclass(slots=True)
class _Ticket:
    """A held slot; `finish` releases it and records the outcome, once."""

    provider: SimulatedProvider
    done: bool = False

    def finish(self, outcome: Outcome, finish_reason: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.provider._slots.release()
        self.provider._count(outcome, finish_reason)


class _SlotStream:
    """A chunk stream holding a slot; `aclose()` frees it even if iteration never started."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None], ticket: _Ticket) -> None:
        self._chunks = chunks
        self._ticket = ticket

    def __aiter__(self) -> _SlotStream:
        return self

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            self._ticket.finish("cancelled")

    def __del__(self) -> None:
        if not self._ticket.done:
            with contextlib.suppress(RuntimeError):  # the event loop may be gone already
                self._ticket.finish("cancelled")


@dataclass(slots=True)
class _Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    ttft_counts: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS_S) + 1))
    ttft_sum: float = 0.0


# --- the provider --------------------------------------------------------------------------


class SimulatedProvider(Provider):
    """A built-in model backend; see the module docstring for the model it follows.

    One instance serves any model name (the name is echoed back) and is safe for concurrent
    use within one event loop.
    """

    def __init__(self, name: str, config: SimulatedConfig, encoding: tiktoken.Encoding) -> None:
        self.name = name
        self.config = config
        self._encoding = encoding
        self._vocabulary = _Vocabulary(encoding)
        self._slots = _Slots(config.capacity, config.max_queue)
        self._entropy = random.Random()
        self._counters = _Counters()
        digest = hashlib.blake2b(f"{name}:{encoding.name}".encode(), digest_size=5).hexdigest()
        self._fingerprint = f"fp_{digest}"
        self.admission: Callable[[str, str, int, int], bool] | None = None

    def stats(self) -> SimulatorStats:
        """Running and waiting requests, token totals, outcomes and the TTFT histogram."""
        counters = self._counters
        cumulative, histogram = 0, []
        for bound, count in zip((*TTFT_BUCKETS_S, math.inf), counters.ttft_counts, strict=True):
            cumulative += count
            histogram.append((bound, cumulative))
        return SimulatorStats(
            running=self._slots.running,
            waiting=self._slots.waiting,
            prompt_tokens_total=counters.prompt_tokens,
            generation_tokens_total=counters.generation_tokens,
            requests_total=dict(counters.requests),
            finished_total=dict(counters.finished),
            ttft_histogram=tuple(histogram),
            ttft_sum_seconds=counters.ttft_sum,
        )

    async def send(self, request: ProviderRequest) -> ProviderResponse:
        """Answer one request, or raise `UpstreamError` (refused, failed, timed out or cut)."""
        received_at = time.perf_counter()
        rng = self._rng_for(request)
        fault = self._draw_fault(rng)
        try:
            if request.endpoint == "embeddings":
                embedding_plan = self._plan_embeddings(request.body)
            else:
                job = self._plan(request, rng, received_at, fault == "cut")
        except UpstreamError:
            self._count("invalid")
            raise
        await self._inject(fault)
        if request.endpoint == "embeddings":
            return await self._embed(request, rng, received_at, embedding_plan)
        if self.admission is not None and not self.admission(
            self.name, request.model, job.prompt_tokens, job.completion_tokens
        ):
            self._count("queue_full")
            raise UpstreamError(
                429,
                f"{self.name} is overloaded: its queue is longer than the simulation allows.",
                type="requests",
                code="rate_limit_exceeded",
                retry_after=0.0,
            )
        ticket = await self._admit()
        job.first_token_at = time.perf_counter() + job.ttft_s
        if not request.stream:
            try:
                return await self._answer_whole(job, ticket)
            finally:
                ticket.finish("cancelled")
        if request.endpoint == "chat.completions":
            chunks = self._chat_chunks(job, ticket)
        else:
            chunks = self._completion_chunks(job, ticket)
        return ProviderResponse(stream=_SlotStream(chunks, ticket))

    # -- randomness and faults ------------------------------------------------------------

    def _rng_for(self, request: ProviderRequest) -> random.Random:
        seed = self.config.seed
        if seed is None:
            body_seed = request.body.get("seed")
            if not isinstance(body_seed, int) or isinstance(body_seed, bool):
                return random.Random(self._entropy.getrandbits(64))
            seed = body_seed
        body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
        try:
            canonical = _json_encode([seed, request.endpoint, request.model, body])
        except (TypeError, msgspec.EncodeError):
            canonical = repr((seed, request.endpoint, request.model, body)).encode()
        digest = hashlib.blake2b(canonical, digest_size=16).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def _draw_fault(self, rng: random.Random) -> str | None:
        errors = self.config.errors
        draw = rng.random()
        for fault, rate in (
            ("429", errors.rate_429),
            ("500", errors.rate_500),
            ("timeout", errors.rate_timeout),
            ("cut", errors.rate_cut),
        ):
            if draw < rate:
                return fault
            draw -= rate
        return None

    async def _inject(self, fault: str | None) -> None:
        scale = self.config.time_scale
        if fault == "429":
            self._count("rate_limited")
            raise UpstreamError(
                429,
                f"Rate limit reached for requests on {self.name}. Please try again in 1s.",
                type="requests",
                code="rate_limit_exceeded",
                retryable=True,
                retry_after=1.0 * scale,
            )
        if fault == "500":
            self._count("server_error")
            raise UpstreamError(
                500,
                "The server had an error while processing your request. Sorry about that!",
                type="server_error",
                retryable=True,
            )
        if fault == "timeout":
            try:
                await asyncio.sleep(self.config.errors.timeout_s * scale)
            except asyncio.CancelledError:
                self._count("cancelled")
                raise
            self._count("timeout")
            raise UpstreamError(
                504,
                f"The model on {self.name} did not answer within "
                f"{self.config.errors.timeout_s:g}s.",
                type="server_error",
                code="timeout",
                retryable=True,
            )

    async def _admit(self) -> _Ticket:
        try:
            await self._slots.acquire()
        except _QueueFull:
            self._count("queue_full")
            raise UpstreamError(
                429,
                f"{self.name} is overloaded: {self._slots.waiting} requests are already queued.",
                type="requests",
                code="rate_limit_exceeded",
                retryable=True,
                retry_after=1.0 * self.config.time_scale,
            ) from None
        except asyncio.CancelledError:
            self._count("cancelled")
            raise
        return _Ticket(self)

    def _count(self, outcome: Outcome, finish_reason: str | None = None) -> None:
        requests = self._counters.requests
        requests[outcome] = requests.get(outcome, 0) + 1
        if finish_reason is not None:
            finished = self._counters.finished
            finished[finish_reason] = finished.get(finish_reason, 0) + 1

    # -- planning ----------------------------------------------------------------------------

    def _plan(
        self, request: ProviderRequest, rng: random.Random, received_at: float, cut: bool
    ) -> _Job:
        body = request.body
        n = _positive_int(body, "n", 1, upper=128)
        if request.endpoint == "chat.completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _invalid("'messages' must be a non-empty array.", "messages")
            prompt_tokens = self._count_chat_prompt(messages)
            prompts = 1
            limit = body.get("max_completion_tokens")
            key = "max_completion_tokens"
            if limit is None:
                limit, key = body.get("max_tokens"), "max_tokens"
            cap = _optional_positive_int({key: limit}, key)
        else:
            prompt_tokens, prompts = self._count_completion_prompts(body.get("prompt"))
            cap = _positive_int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        leading_space = request.endpoint == "completions"
        choices = []
        for _ in range(prompts * n):
            wanted = self._draw_length(rng)
            length = wanted if cap is None else min(wanted, cap)
            finish_reason = "length" if length < wanted else "stop"
            units = self._vocabulary.compose(rng, length, leading_space, finish_reason == "stop")
            choices.append(_Choice(units, finish_reason))
        config = self.config
        ttft_ms = config.ttft_overhead_ms + config.prefill_ms_per_token * prompt_tokens
        ttft_s = ttft_ms / 1000 * self._jitter(rng) * config.time_scale
        cut_at = rng.randrange(max(c.length for c in choices)) if cut else None
        return _Job(request, rng, received_at, prompt_tokens, choices, ttft_s, cut_at)

    def _draw_length(self, rng: random.Random) -> int:
        output = self.config.output
        return draw_length(rng, output.distribution, output.mean, output.sd, output.min, output.max)

    def _jitter(self, rng: random.Random) -> float:
        if self.config.jitter == 0:
            return 1.0
        low, high = JITTER_CLAMP
        return min(max(rng.gauss(1.0, self.config.jitter), low), high)

    def _itl_s(self, rng: random.Random) -> float:
        config = self.config
        slowdown = 1.0
        if config.capacity > 1:
            busy = min(max(self._slots.running - 1, 0), config.capacity - 1)
            slowdown += (config.slowdown_at_capacity - 1) * busy / (config.capacity - 1)
        return config.itl_ms / 1000 * slowdown * self._jitter(rng) * config.time_scale

    # -- token counting ------------------------------------------------------------------------

    def _tokens(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))

    def _count_chat_prompt(self, messages: list[Any]) -> int:
        """OpenAI's rule: 3 tokens per message, 1 more per name, 3 to prime the reply."""
        total = 3
        for message in messages:
            if not isinstance(message, dict):
                raise _invalid("Each message must be an object.", "messages")
            total += 3
            for key, value in message.items():
                total += sum(self._tokens(text) for text in _texts(value))
                if key == "name":
                    total += 1
        return total

    def _count_completion_prompts(self, prompt: Any) -> tuple[int, int]:
        """(prompt tokens, number of prompts) for a string, strings, tokens or token lists."""
        if isinstance(prompt, str):
            return self._tokens(prompt), 1
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return sum(self._tokens(p) for p in prompt), len(prompt)
            if all(isinstance(t, int) for t in prompt):
                return len(prompt), 1
            if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
                return sum(len(p) for p in prompt), len(prompt)
        raise _invalid("'prompt' must be a string, strings, tokens or token arrays.", "prompt")

    # -- generation -----------------------------------------------------------------------------

    async def _sleep_until(self, deadline: float) -> None:
        """Sleep until `deadline` (a `time.perf_counter()` instant); event loop timers can be
        coarse (uvloop's are whole milliseconds from a cached clock) so check and sleep again."""
        delay = deadline - time.perf_counter()
        while delay > _TIMER_SLACK_S:
            await asyncio.sleep(delay)
            delay = deadline - time.perf_counter()

    async def _prefill(self, received_at: float, first_token_at: float, prompt_tokens: int) -> None:
        """Wait for the first token; count the prompt and the time to first token."""
        if self.config.time_scale:
            await self._sleep_until(first_token_at)
        counters = self._counters
        counters.prompt_tokens += prompt_tokens
        ttft = time.perf_counter() - received_at
        counters.ttft_sum += ttft
        index = 0
        while index < len(TTFT_BUCKETS_S) and ttft > TTFT_BUCKETS_S[index]:
            index += 1
        counters.ttft_counts[index] += 1

    async def _positions(self, job: _Job, every: int) -> AsyncIterator[int]:
        """After the first token: yield token positions every `every` tokens and at the end,
        each once that many tokens are ready (lockstep across choices)."""
        length = job.decode_length
        if not self.config.time_scale:
            for position in range(min(every, length), length, every):
                yield position
            if length:
                yield length
            return
        rng = job.rng
        ready_at = slept_until = job.first_token_at
        for position in range(1, length + 1):
            if position > 1:
                ready_at += self._itl_s(rng)
            if position % every == 0 or position == length:
                await self._sleep_until(ready_at)
                slept_until = ready_at
                yield position
            elif ready_at - slept_until >= _MAX_UNSLEPT_S:
                await self._sleep_until(ready_at)
                slept_until = ready_at

    def _cut_error(self) -> UpstreamError:
        return UpstreamError(
            502,
            f"The stream from {self.name} was cut off mid-way.",
            type="stream_cut",
            retryable=True,
        )

    async def _answer_whole(self, job: _Job, ticket: _Ticket) -> ProviderResponse:
        await self._prefill(job.received_at, job.first_token_at, job.prompt_tokens)
        async for _ in self._positions(job, max(job.decode_length, 1)):
            pass
        if job.cut_at is not None:
            self._counters.generation_tokens += sum(min(c.length, job.cut_at) for c in job.choices)
            ticket.finish("cut")
            raise self._cut_error()
        self._counters.generation_tokens += job.completion_tokens
        ticket.finish("success", job.finish_reason)
        if job.request.endpoint == "chat.completions":
            return ProviderResponse(body=self._chat_body(job))
        return ProviderResponse(body=self._completion_body(job))

    async def _deltas(
        self, job: _Job, ticket: _Ticket
    ) -> AsyncGenerator[list[tuple[int, str, str | None]], None]:
        """Each step's (choice index, text, finish reason) for choices with new tokens."""
        outcome: Outcome = "cancelled"
        try:
            await self._prefill(job.received_at, job.first_token_at, job.prompt_tokens)
            sent = [0] * len(job.choices)
            async for position in self._positions(job, self.config.chunk_tokens):
                step = []
                for index, choice in enumerate(job.choices):
                    end = min(position, choice.length)
                    if end > sent[index]:
                        finish = choice.finish_reason if end == choice.length else None
                        step.append((index, "".join(choice.units[sent[index] : end]), finish))
                        self._counters.generation_tokens += end - sent[index]
                        sent[index] = end
                yield step
            if job.cut_at is not None:
                outcome = "cut"
                raise self._cut_error()
            outcome = "success"
        finally:
            ticket.finish(outcome, job.finish_reason if outcome == "success" else None)

    async def _chat_chunks(self, job: _Job, ticket: _Ticket) -> AsyncGenerator[Chunk, None]:
        base = {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": job.request.model,
            "service_tier": "default",
            "system_fingerprint": self._fingerprint,
        }
        include_usage = _include_usage(job.request.body)
        if include_usage:
            base["usage"] = None
        started = [False] * len(job.choices)
        deltas = self._deltas(job, ticket)
        try:
            async for step in deltas:
                choices = []
                for index, text, finish in step:
                    delta: dict[str, Any] = {"content": text}
                    if not started[index]:
                        started[index] = True
                        delta = {"role": "assistant", "content": text, "refusal": None}
                    choices.append(
                        {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                    )
                yield {**base, "choices": choices}
            if include_usage:
                yield {**base, "choices": [], "usage": self._chat_usage(job)}
        finally:
            await deltas.aclose()

    async def _completion_chunks(self, job: _Job, ticket: _Ticket) -> AsyncGenerator[Chunk, None]:
        base: dict[str, Any] = {
            "id": self._new_id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": job.request.model,
            "system_fingerprint": self._fingerprint,
        }
        include_usage = _include_usage(job.request.body)
        if include_usage:
            base["usage"] = None
        deltas = self._deltas(job, ticket)
        try:
            async for step in deltas:
                choices = [
                    {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
                    for index, text, finish in step
                ]
                yield {**base, "choices": choices}
            if include_usage:
                yield {**base, "choices": [], "usage": self._completion_usage(job)}
        finally:
            await deltas.aclose()

    # -- response bodies --------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return prefix + "".join(self._entropy.choices(_ID_ALPHABET, k=29))

    def _chat_usage(self, job: _Job) -> dict[str, Any]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _completion_usage(self, job: _Job) -> dict[str, Any]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        }

    def _chat_body(self, job: _Job) -> dict[str, Any]:
        return {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.request.model,
            "choices": [
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": "".join(choice.units),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                for index, choice in enumerate(job.choices)
            ],
            "usage": self._chat_usage(job),
            "service_tier": "default",
            "system_fingerprint": self._fingerprint,
        }

    def _completion_body(self, job: _Job) -> dict[str, Any]:
        return {
            "id": self._new_id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": job.request.model,
            "choices": [
                {
                    "text": "".join(choice.units),
                    "index": index,
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                for index, choice in enumerate(job.choices)
            ],
            "usage": self._completion_usage(job),
            "system_fingerprint": self._fingerprint,
        }

    # -- embeddings -----------------------------------------------------------------------------

    def _plan_embeddings(self, body: dict[str, Any]) -> _EmbeddingPlan:
        full = self.config.embedding_dimensions
        dimensions = _positive_int(body, "dimensions", full, upper=full)
        encoding_format = body.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise _invalid("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        value = body.get("input")
        inputs: list[bytes] | None = None
        if isinstance(value, str):
            inputs, tokens = [value.encode()], self._tokens(value)
        elif isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                inputs, tokens = [v.encode() for v in value], sum(self._tokens(v) for v in value)
            elif all(isinstance(t, int) for t in value):
                inputs, tokens = [_json_encode(value)], len(value)
            elif all(
                isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value
            ):
                inputs, tokens = [_json_encode(v) for v in value], sum(len(v) for v in value)
        if inputs is None:
            raise _invalid("'input' must be a string, strings, tokens or token arrays.", "input")
        return _EmbeddingPlan(inputs, tokens, dimensions, encoding_format == "base64")

    async def _embed(
        self,
        request: ProviderRequest,
        rng: random.Random,
        received_at: float,
        plan: _EmbeddingPlan,
    ) -> ProviderResponse:
        config = self.config
        ticket = await self._admit()
        try:
            prefill_ms = config.ttft_overhead_ms + config.prefill_ms_per_token * plan.tokens
            delay = prefill_ms / 1000 * self._jitter(rng) * config.time_scale
            done_at = time.perf_counter() + delay
            await self._prefill(received_at, done_at, plan.tokens)
            data = []
            for index, seed in enumerate(plan.inputs):
                vector = _embedding(seed, config.embedding_dimensions, plan.dimensions)
                embedding: list[float] | str = (
                    base64.b64encode(struct.pack(f"<{plan.dimensions}f", *vector)).decode()
                    if plan.base64
                    else [round(x, 9) for x in vector]
                )
                data.append({"object": "embedding", "index": index, "embedding": embedding})
            ticket.finish("success", "stop")
        finally:
            ticket.finish("cancelled")
        return ProviderResponse(
            body={
                "object": "list",
                "data": data,
                "model": request.model,
                "usage": {"prompt_tokens": plan.tokens, "total_tokens": plan.tokens},
            }
        )


@dataclass(slots=True)
class _EmbeddingPlan:
    inputs: list[bytes]  # each input's canonical bytes: the seed of its vector
    tokens: int
    dimensions: int
    base64: bool


# --- helpers ---------------------------------------------------------------------------------


def _embedding(seed: bytes, full: int, dimensions: int) -> list[float]:
    digest = hashlib.blake2b(b"maas-simulated-embedding:" + seed, digest_size=16).digest()
    draw = random.Random(int.from_bytes(digest, "big"))
    vector = [draw.gauss(0.0, 1.0) for _ in range(full)][:dimensions]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _texts(value: Any) -> Iterator[str]:
    """The strings a message field contributes to the prompt (text parts, tool call names and
    arguments), skipping ids, types and media."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _TEXT_FIELDS_SKIPPED:
                yield from _texts(item)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _invalid(message: str, param: str) -> UpstreamError:
    return UpstreamError(400, message, type="invalid_request_error", code=f"invalid_{param}")


def _positive_int(body: dict[str, Any], key: str, default: int, upper: int | None = None) -> int:
    value = _optional_positive_int(body, key, upper)
    return default if value is None else value


def _optional_positive_int(body: dict[str, Any], key: str, upper: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _invalid(f"'{key}' must be a positive integer.", key)
    if upper is not None and value > upper:
        raise _invalid(f"'{key}' must be at most {upper}.", key)
    return value
