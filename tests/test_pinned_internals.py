"""The private parts of pinned packages the gateway relies on, checked so that an upgrade
which changes them fails here (see the version ranges in pyproject.toml).

- prometheus_client: `gateway.metrics` adds batched observations straight to a histogram
  child's `_buckets` (non-cumulative, +Inf last) and `_sum`, and reads
  `values.ValueClass._multiprocess` to tell whether the multiprocess mode was switched on
  before prometheus_client was imported.
- httpx and httpx-aiohttp: `providers.openai_compat` builds each request as the client's
  `build_request` would and hands it to the transport itself; it reads a body straight
  from aiohttp, through the response's stream (httpx-aiohttp's `AiohttpResponseStream`)
  and its `_aiohttp_response`.
- uvicorn: `gateway.http_limits` subclasses the httptools protocol and overrides its parser
  callbacks; `gateway.cli` subclasses the worker supervisor `Multiprocess` and reads its
  `processes` (each a `Process` with a `pid`).

`test_every_private_read_of_a_library_is_listed_here` keeps this list whole: a new
underscored attribute read on a library's object fails it until it is pinned and checked here.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import inspect
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import ClientResponse, web
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from gateway.http_limits import BoundedHttpToolsProtocol
from providers.base import ProviderRequest
from providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider, _body_reads
from tests.test_layering import DEFINED, MODULES, PACKAGES

# The private names of libraries the packages read, each checked by a test in this module.
CHECKED_PRIVATE_READS = {"_buckets", "_sum", "_multiprocess", "_aiohttp_response"}


def test_histogram_children_keep_buckets_and_sum_as_value_objects() -> None:
    bounds = (0.1, 1.0, 10.0)
    exposed = []
    for direct in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", ["x"], registry=registry, buckets=bounds)
        child = histogram.labels("a")
        if direct:  # what gateway.metrics does with a batch: bucket 1.0 twice, +Inf once
            buckets = child._buckets
            assert len(buckets) == len(bounds) + 1
            buckets[1].inc(2)
            buckets[3].inc(1)
            child._sum.inc(0.5 + 0.7 + 20)
        else:
            for value in (0.5, 0.7, 20):
                child.observe(value)
        lines = generate_latest(registry).decode().splitlines()
        exposed.append([line for line in lines if "_created" not in line])
    assert exposed[0] == exposed[1]


def test_the_httptools_protocol_has_the_parts_the_limits_override() -> None:
    for name in (
        "data_received",
        "send_400_response",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_message_complete",
        "connection_made",
        "connection_lost",
    ):
        assert callable(getattr(HttpToolsProtocol, name)), name
    source = inspect.getsource(HttpToolsProtocol)
    # a parser error (a callback's exception included) is answered by send_400_response
    data_received = inspect.getsource(HttpToolsProtocol.data_received)
    assert "except httptools.HttpParserError" in data_received
    assert "self.send_400_response(" in data_received
    # the state the limits read
    for attribute in ("self.url", "self.cycle", "self.loop", "self.transport", "default_headers"):
        assert attribute in source, attribute
    assert "self.url += url" in inspect.getsource(HttpToolsProtocol.on_url)
    assert "self.headers.append(" in inspect.getsource(HttpToolsProtocol.on_header)
    assert issubclass(BoundedHttpToolsProtocol, HttpToolsProtocol)


async def test_a_streamed_body_reaches_aiohttp_through_httpx_aiohttp() -> None:
    """The provider's reads of a stream come from the aiohttp response behind httpx's, and
    are the bytes `aiter_raw` gives."""
    body = b"".join(b"data: %d\n\n" % n for n in range(2000))

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for at in range(0, len(body), 5000):
            await response.write(body[at : at + 5000])
        await response.write_eof()
        return response

    async with serving("GET", "/", stream) as port:
        transport = AiohttpTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            got = []
            for direct in (True, False):
                request = client.build_request("GET", f"http://127.0.0.1:{port}/")
                response = await transport.handle_async_request(request)
                assert isinstance(response.stream, AiohttpResponseStream)
                assert isinstance(response.stream._aiohttp_response, ClientResponse)
                reads = _body_reads(response) if direct else response.aiter_raw()
                got.append(b"".join([data async for data in reads]))
                await response.aclose()
            assert got == [body, body]


@pytest.mark.parametrize("connect_s", [None, 2.5])
def test_the_provider_builds_the_request_the_client_would(connect_s: float | None) -> None:
    config = OpenAICompatConfig(base_url="http://upstream.example:8000/v1/", headers={"x-a": "1"})
    provider = OpenAICompatProvider("x", config)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ours = provider.http_request(
        ProviderRequest("chat.completions", "m", body, "r", connect_timeout_s=connect_s)
    )
    timeout = (
        httpx.Timeout(config.read_timeout_s, connect=connect_s, pool=connect_s)
        if connect_s is not None
        else httpx.USE_CLIENT_DEFAULT
    )
    theirs = provider._client.build_request(
        "POST", "/chat/completions", content=ours.content, timeout=timeout
    )
    assert (ours.method, ours.url, ours.headers.raw) == (
        theirs.method,
        theirs.url,
        theirs.headers.raw,
    )
    assert ours.extensions == theirs.extensions and ours.content == theirs.content


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_either_transport_gives_the_provider_the_same_answers(transport: str) -> None:
    """The provider hands its requests to the transport itself. Under httpx-aiohttp a plain
    body is read straight from aiohttp and a content-encoded one through httpx, which
    decodes it; under httpx's own transport, httpx reads both. A stream's chunks and usage
    are the same either way."""
    answer = {"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    chunk = {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    last = {"id": "x", "model": "m", "choices": [], "usage": answer["usage"]}
    sse = b"".join(b"data: %s\n\n" % json.dumps(c).encode() for c in (chunk, last))

    async def chat(request: web.Request) -> web.Response:
        if (await request.json()).get("stream"):
            return web.Response(body=sse + b"data: [DONE]\n\n", content_type="text/event-stream")
        raw = json.dumps(answer).encode()
        if request.query.get("gzip"):
            return web.Response(
                body=gzip.compress(raw),
                headers={"content-type": "application/json", "content-encoding": "gzip"},
            )
        return web.Response(body=raw, content_type="application/json")

    async with serving("POST", "/v1/chat/completions", chat) as port:
        await _ask_both_kinds(port, transport, answer, [chunk, last])


async def _ask_both_kinds(
    port: int, transport: str, answer: dict[str, Any], chunks: list[dict[str, Any]]
) -> None:
    """A JSON answer (plain, then gzip-encoded) and a stream, through the provider."""
    config = OpenAICompatConfig(
        base_url=f"http://127.0.0.1:{port}/v1",
        transport=transport,  # type: ignore[arg-type]
    )
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for query in (b"", b"gzip=1"):
        provider = OpenAICompatProvider("x", config)
        url = provider._urls["chat.completions"]
        provider._urls["chat.completions"] = url.copy_with(query=query or None)
        got = await provider.send(ProviderRequest("chat.completions", "m", body, "r"))
        assert got.body == answer and got.usage is not None, query
        await provider.aclose()
    provider = OpenAICompatProvider("x", config)
    streamed = {**body, "stream": True}
    got = await provider.send(ProviderRequest("chat.completions", "m", streamed, "r"))
    assert got.stream is not None
    reads = [read async for read in got.stream]
    assert [json.loads(raw) for read in reads for raw in read.raw] == chunks
    assert reads[-1].usage is not None and reads[-1].usage.output == 4
    await provider.aclose()


@contextlib.asynccontextmanager
async def serving(method: str, path: str, handler: Any) -> AsyncIterator[int]:
    """A real aiohttp server answering `method path` with `handler`; yields its port."""
    app = web.Application()
    app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def test_the_supervisor_has_the_hooks_the_cli_overrides() -> None:
    for name in ("init_processes", "keep_subprocess_alive", "handle_signals", "join_all", "run"):
        assert callable(getattr(Multiprocess, name)), name
    assert "self.processes: list[Process]" in inspect.getsource(Multiprocess.__init__)
    # the workers' pids, read from each Process; the subclass's own names do not shadow any
    assert isinstance(inspect.getattr_static(Process, "pid"), property)
    for name in ("known", "_mark_exited"):
        assert not hasattr(Multiprocess, name), name
    assert list(inspect.signature(Multiprocess.__init__).parameters) == [
        "self",
        "config",
        "sockets",
    ]


def test_the_value_class_says_whether_multiprocess_mode_is_on(tmp_path: Path) -> None:
    from prometheus_client import values

    assert values.ValueClass._multiprocess is False  # this process: no multiprocess dir
    probe = "from prometheus_client import values; print(values.ValueClass._multiprocess)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "True"


def _library_private_reads() -> set[str]:
    """Underscored attributes the packages read that no project module defines (so a
    library's), including `getattr(x, "_name", ...)`, and imports from a library's private
    modules or of its private names (as `module:names`)."""
    ours = set().union(*DEFINED.values())
    found = set()
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                name = node.args[1].value
            if name and name.startswith("_") and not name.startswith("__") and name not in ours:
                found.add(name)
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                library = node.module.split(".")[0] not in PACKAGES
                private = [p for p in node.module.split(".") if p.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if library and node.module != "__future__" and private:
                    found.add(f"{node.module}:{','.join(private)}")
    return found


def test_every_private_read_of_a_library_is_listed_here() -> None:
    assert _library_private_reads() == CHECKED_PRIVATE_READS
