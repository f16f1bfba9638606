"""The simulated backend over HTTP (`maas-gateway simulate`): an OpenAI-compatible upstream.

A small raw ASGI application (msgspec for JSON) serving, for each configured model name:

- `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: answers from a
  `SimulatedProvider`; streams are server-sent events as OpenAI sends them (`data: {json}`
  per chunk, then `data: [DONE]`). A stream cut mid-way ends with one `data: {"error": ...}`
  event and no `[DONE]`. Errors are `{"error": {"message", "type", "param", "code"}}` with
  their status; a 429 carries `retry-after` (seconds) and `retry-after-ms`. A client that
  disconnects cancels its request, which frees its capacity slot at once.
- `GET /v1/models`, `GET /v1/models/{name}`, `GET /health`.
- `GET /metrics`: vLLM-style Prometheus text, labelled `model_name`:
  `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:prompt_tokens_total`,
  `vllm:generation_tokens_total`, `vllm:request_success_total` (also by `finished_reason`),
  `vllm:time_to_first_token_seconds` (histogram), and `maas_simulator_requests_total` by
  `outcome`. Each app has its own registry.

Configuration file (`load_simulator_config`): a YAML mapping of model name to the fields of
`providers.simulated.SimulatedConfig`, all optional::

    sim-small:
      ttft_overhead_ms: 20
      prefill_ms_per_token: 0.02
      itl_ms: 10
      capacity: 64
      output: {distribution: lognormal, mean: 120, sd: 60, max: 1024}
      errors: {rate_429: 0.01, rate_cut: 0.005}
      seed: 42
    sim-embed: {}
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from os import PathLike
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from pydantic import ValidationError

from providers import vllm_metrics as vllm
from providers.base import Endpoint, ProviderRequest, UpstreamError
from providers.simulated import SimulatedConfig, SimulatedProvider

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"


def create_simulator_app(providers: dict[str, SimulatedProvider]) -> ASGIApp:
    """An ASGI app serving each provider under its model name (the keys of `providers`)."""
    return SimulatorApp(providers)


def run_simulator(host: str, port: int, providers: dict[str, SimulatedProvider]) -> None:
    """Serve the simulator with uvicorn (uvloop and httptools where available) until stopped."""
    config = uvicorn.Config(
        create_simulator_app(providers),
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_keep_alive=60,
    )
    uvicorn.Server(config).run()


def load_simulator_config(path: str | PathLike[str]) -> dict[str, SimulatedConfig]:
    """Read a YAML file mapping model name to `SimulatedConfig` (see the module docstring)."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of model name to simulator settings")
    configs: dict[str, SimulatedConfig] = {}
    for name, fields in raw.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: model names must be non-empty strings, got {name!r}")
        try:
            configs[name] = SimulatedConfig.model_validate(fields or {})
        except ValidationError as exc:
            raise ValueError(f"{path}: model {name!r}: {exc}") from None
    return configs


class SimulatorApp:
    """The ASGI application; see the module docstring for its routes."""

    def __init__(self, providers: Mapping[str, SimulatedProvider]) -> None:
        self.providers = dict(providers)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SimulatorCollector(self.providers))
        self._created = int(time.time())
        self._decode = msgspec.json.Decoder().decode
        self._encode = msgspec.json.Encoder().encode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        endpoint = ENDPOINTS.get(path)
        if endpoint is not None:
            if method != "POST":
                await self._error(send, 405, f"Use POST for {path}.", "invalid_request_error")
            else:
                await self._relay(endpoint, receive, send)
        elif method not in ("GET", "HEAD"):
            await self._error(send, 405, f"{method} is not allowed here.", "invalid_request_error")
        elif path == "/health":
            await self._json(send, 200, {"status": "ok"})
        elif path == "/metrics":
            await _respond(
                send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], self._metrics()
            )
        elif path == "/v1/models":
            data = [self._model(name) for name in self.providers]
            await self._json(send, 200, {"object": "list", "data": data})
        elif path.startswith("/v1/models/") and path[len("/v1/models/") :] in self.providers:
            await self._json(send, 200, self._model(path[len("/v1/models/") :]))
        else:
            await self._error(
                send, 404, f"Unknown path {path}.", "invalid_request_error", "not_found"
            )

    def _metrics(self) -> bytes:
        return generate_latest(self.registry)

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "simulated"}

    async def _relay(self, endpoint: Endpoint, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        try:
            body = self._decode(raw)
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            await self._error(
                send, 400, "The request body is not a JSON object.", "invalid_request_error"
            )
            return
        model = body.get("model")
        provider = self.providers.get(model) if isinstance(model, str) else None
        if provider is None:
            await self._error(
                send,
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
                param="model",
            )
            return
        request = ProviderRequest(endpoint, str(model), body)
        await _until_disconnect(self._answer(provider, request, send), receive)

    async def _answer(
        self, provider: SimulatedProvider, request: ProviderRequest, send: Send
    ) -> None:
        try:
            response = await provider.send(request)
        except UpstreamError as exc:
            await self._upstream_error(send, exc)
            return
        if response.stream is None:
            await self._json(send, 200, response.body)
            return
        stream = response.stream
        encode = self._encode
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            try:
                async for chunk in stream:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + encode(chunk) + b"\n\n",
                            "more_body": True,
                        }
                    )
            except UpstreamError as exc:
                event = b"data: " + encode(_error_body(exc.message, exc.type, exc.code)) + b"\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _json(self, send: Send, status: int, body: Any) -> None:
        await _respond(send, status, _JSON_HEADERS, self._encode(body))

    async def _upstream_error(self, send: Send, exc: UpstreamError) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if exc.retry_after is not None:
            seconds = max(exc.retry_after, 0.0)
            headers.append((b"retry-after", str(math.ceil(seconds)).encode()))
            headers.append((b"retry-after-ms", str(round(seconds * 1000)).encode()))
        await self._error(send, exc.status_code, exc.message, exc.type, exc.code, headers=headers)

    async def _error(
        self,
        send: Send,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        *,
        param: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        body = self._encode(_error_body(message, type_, code, param))
        await _respond(send, status, [*_JSON_HEADERS, *headers], body)


class SimulatorCollector(Collector):
    """Reads every provider's `stats()` at scrape time into vLLM-named metric families."""

    def __init__(self, providers: Mapping[str, SimulatedProvider]) -> None:
        self._providers = providers

    def collect(self) -> Iterable[Metric]:
        def spec(family: vllm.Family) -> dict[str, Any]:
            return {
                "name": family.name,
                "documentation": family.documentation,
                "labels": list(family.labels),
            }

        running = GaugeMetricFamily(**spec(vllm.NUM_REQUESTS_RUNNING))
        waiting = GaugeMetricFamily(**spec(vllm.NUM_REQUESTS_WAITING))
        prompt = CounterMetricFamily(**spec(vllm.PROMPT_TOKENS))
        generation = CounterMetricFamily(**spec(vllm.GENERATION_TOKENS))
        success = CounterMetricFamily(**spec(vllm.REQUEST_SUCCESS))
        outcomes = CounterMetricFamily(
            "maas_simulator_requests",
            "Requests finished, by outcome.",
            labels=["model_name", "outcome"],
        )
        ttft = HistogramMetricFamily(**spec(vllm.TIME_TO_FIRST_TOKEN))
        for name, provider in self._providers.items():
            stats = provider.stats()
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting)
            prompt.add_metric([name], stats.prompt_tokens_total)
            generation.add_metric([name], stats.generation_tokens_total)
            for reason in ("stop", "length"):
                success.add_metric([name, reason], stats.finished_total.get(reason, 0))
            for outcome, count in sorted(stats.requests_total.items()):
                outcomes.add_metric([name, outcome], count)
            ttft.add_metric(
                [name],
                buckets=[(floatToGoString(bound), count) for bound, count in stats.ttft_histogram],
                sum_value=stats.ttft_sum_seconds,
            )
        return [running, waiting, prompt, generation, success, outcomes, ttft]


def _error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return bytes(body)
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _until_disconnect(work: Awaitable[None], receive: Receive) -> None:
    """Run `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
