"""What the load-test users send and how they read the answers, free of locust and gevent.

A `Plan` (written by `loadtest.run` as JSON) lists the apps: each app is one API key of one
tenant with its own mix of endpoints and models, prompt and output length distributions, a
share of streamed requests and a think time. `build_request` turns a draw into the real
OpenAI request shape; `SseReader` parses a server-sent-event stream incrementally;
`classify` names the outcome of an error answer; `ClientRecord` is one line of the per-run
JSONL file that the reconciliation compares with the ledger.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from providers.lengths import Distribution, draw_length

Endpoint = Literal["chat", "completions", "embeddings"]

ENDPOINT_PATHS: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}

QUOTA_CODES = frozenset({"insufficient_quota", "rate_limit_exceeded"})
"""Error codes of the gateway's own refusals (budgets, balance, rpm, tpm, concurrency)."""

_WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book
eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education
""".split()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Length(Strict):
    """A length distribution in tokens: lognormal, normal, uniform or fixed, clamped."""

    distribution: Distribution = "lognormal"
    mean: float = Field(default=100, gt=0)
    sd: float = Field(default=50, ge=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Length:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def draw(self, rng: random.Random) -> int:
        return draw_length(rng, self.distribution, self.mean, self.sd, self.min, self.max)


class RequestMix(Strict):
    """One kind of request an app makes, with its relative weight."""

    endpoint: Endpoint = "chat"
    model: str
    weight: float = Field(default=1, gt=0)


class AppProfile(Strict):
    """One app: a tenant's API key and how that app uses it."""

    name: str
    tenant: str
    key_id: str
    api_key: str = Field(default="", description="Filled in by the runner")
    weight: float = Field(default=1, gt=0, description="Share of the simulated users")
    mix: list[RequestMix] = Field(min_length=1)
    prompt_tokens: Length = Field(default_factory=Length)
    max_tokens: Length = Field(default_factory=lambda: Length(mean=128, sd=64, max=1024))
    stream_share: float = Field(default=0.5, ge=0, le=1)
    use_max_completion_tokens: float = Field(
        default=0.5, ge=0, le=1, description="Share of chat requests using the newer field"
    )
    embedding_inputs: int = Field(default=4, ge=1, description="Texts per embeddings request")
    think_time_s: tuple[float, float] = (0.1, 0.5)
    timeout_s: float = Field(default=30, gt=0)


class Plan(Strict):
    """Everything the locust users need; written by the runner, read by the locustfile."""

    scenario: str
    records_path: str
    apps: list[AppProfile] = Field(min_length=1)
    seed: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2), encoding="utf-8")


class AppAssigner:
    """Hands apps to users in proportion to their weights (smooth weighted round robin)."""

    def __init__(self, apps: list[AppProfile]) -> None:
        self._apps = apps
        self._current = [0.0] * len(apps)
        self._total = sum(app.weight for app in apps)

    def next(self) -> AppProfile:
        for index, app in enumerate(self._apps):
            self._current[index] += app.weight
        best = max(range(len(self._apps)), key=self._current.__getitem__)
        self._current[best] -= self._total
        return self._apps[best]


@dataclass(slots=True)
class PlannedRequest:
    """One request about to be sent, in OpenAI's request shape."""

    app: str
    tenant: str
    key_id: str
    endpoint: Endpoint
    model: str
    path: str
    body: dict[str, Any]
    stream: bool


def build_request(app: AppProfile, rng: random.Random) -> PlannedRequest:
    """Draw one request of `app` (endpoint, model, lengths, streaming) as a JSON body."""
    choice = rng.choices(app.mix, weights=[m.weight for m in app.mix])[0]
    prompt = _text(rng, app.prompt_tokens.draw(rng))
    body: dict[str, Any] = {"model": choice.model}
    stream = False
    if choice.endpoint == "embeddings":
        count = rng.randint(1, app.embedding_inputs)
        body["input"] = (
            prompt
            if count == 1
            else [_text(rng, len(prompt.split()) // count + 1) for _ in range(count)]
        )
    else:
        stream = rng.random() < app.stream_share
        limit = app.max_tokens.draw(rng)
        if choice.endpoint == "chat":
            body["messages"] = [
                {"role": "system", "content": f"You are the assistant of {app.name}."},
                {"role": "user", "content": prompt},
            ]
            field_name = (
                "max_completion_tokens"
                if rng.random() < app.use_max_completion_tokens
                else "max_tokens"
            )
            body[field_name] = limit
        else:
            body["prompt"] = prompt
            body["max_tokens"] = limit
        body["temperature"] = round(rng.uniform(0, 1.2), 2)
        body["user"] = f"{app.name}-user-{rng.randint(1, 50)}"
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
    return PlannedRequest(
        app=app.name,
        tenant=app.tenant,
        key_id=app.key_id,
        endpoint=choice.endpoint,
        model=choice.model,
        path=ENDPOINT_PATHS[choice.endpoint],
        body=body,
        stream=stream,
    )


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))


class SseReader:
    """Splits a server-sent-event byte stream into the JSON payloads of its `data:` lines.

    Feed it bytes as they arrive; it yields each decoded payload, or the string ``"[DONE]"``.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[dict[str, Any] | str]:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            payload = b"\n".join(
                line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if not payload:
                continue
            if payload == b"[DONE]":
                yield "[DONE]"
            else:
                yield json.loads(payload)

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete event."""
        return self._buffer


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text a stream chunk carries (chat deltas or completion text)."""
    parts: list[str] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta is None:
            parts.append(choice.get("text") or "")
        else:
            parts.append(delta.get("content") or "")
    return "".join(parts)


Outcome = Literal["ok", "refused", "failed", "cut", "lost"]
"""ok; refused by a quota; failed with an error answer; a stream cut mid-way; or lost: no
complete answer reached the client (a transport error or timeout)."""


def classify(status: int, error: dict[str, Any] | None) -> tuple[Outcome, str]:
    """Outcome and label of an answer: quota refusals are not failures.

    The gateway's own refusals are 429s with code ``insufficient_quota`` or
    ``rate_limit_exceeded`` (type ``requests`` or ``tokens``); an upstream's 429 relayed
    as ``rate_limit_error`` is a failure of the backend, not a quota refusal.
    """
    if status < 400 and error is None:
        return "ok", "ok"
    code = (error or {}).get("code")
    kind = (error or {}).get("type")
    if status == 429 and code in QUOTA_CODES and kind != "rate_limit_error":
        return "refused", str(code)
    label = f"{status} {code or kind or 'error'}"
    return "failed", label


@dataclass(slots=True)
class ClientRecord:
    """What one client saw of one request: a line of the per-run JSONL file."""

    app: str
    tenant: str
    key_id: str
    endpoint: str
    model: str
    stream: bool
    outcome: str
    label: str
    status: int | None
    request_id: str | None
    started_at: float
    duration_ms: float
    response_model: str | None = None
    usage: dict[str, Any] | None = None
    cost: str | None = None
    cost_header: str | None = None
    ttft_ms: float | None = None
    content_chunks: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> ClientRecord:
        return cls(**json.loads(line))


def read_records(path: str | Path) -> list[ClientRecord]:
    """Every record of a JSONL file (a torn last line, from a killed writer, is skipped)."""
    records: list[ClientRecord] = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(ClientRecord.from_json(line))
            except (json.JSONDecodeError, TypeError):
                continue
    return records
