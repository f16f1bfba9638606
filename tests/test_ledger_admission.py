"""Admission journaling: a request admitted and never recorded still gets exactly one row,
by the crash policy, and a final record always wins over the provisional one.

The SIGKILL-under-load test through a running gateway is in tests/test_ledger_gateway.py;
here a recorder process admits requests, records some, and is killed with SIGKILL, and a
`maas-gateway serve` process is killed in the middle of a long stream, whose row then bills
the output delivered by the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar
from litestar.exceptions import LitestarException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from billing.ledger import ENTRIES, Ledger, LedgerConfig, merge_replayed
from billing.record import GATEWAY_DIED, UsageRecord
from billing.store.schema import LedgerEntry
from billing.usage import Usage
from gateway.app import create_app
from tests.harness import ACME_KEY, SLOW_SIMULATOR, base_config, gateway_process, running_gateway

PROJECT_ROOT = Path(__file__).resolve().parent.parent

NOW = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


def record(request_id: str, output: int = 0, error_type: str | None = None) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        started_at=NOW,
        tenant_id="acme",
        key_id="k",
        model="gpt-sim",
        endpoint="chat.completions",
        usage=Usage(output=output),
        unit_price_output_nanos=1_000,
        cost_nanos=output * 1_000,
        status_code=500 if error_type else 200,
        error_type=error_type,
    )


def test_a_final_record_wins_over_provisional_ones_in_any_order() -> None:
    died = [record("a", 3, GATEWAY_DIED), record("a", 7, GATEWAY_DIED)]
    final = record("a", 9)
    assert merge_replayed([*died, final]) == [final]
    assert merge_replayed([final, *died]) == [final]
    assert merge_replayed(died) == [died[1]]  # the later checkpoint
    assert merge_replayed([record("b"), record("c", 1, GATEWAY_DIED)])[1].usage.output == 1


async def rows(url: str) -> dict[str, tuple[int, str | None, int]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            found = (
                await connection.execute(
                    select(
                        ENTRIES.c.request_id,
                        ENTRIES.c.status_code,
                        ENTRIES.c.error_type,
                        ENTRIES.c.cost_nanos,
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    return {rid: (int(status), error, int(cost)) for rid, status, error, cost in found}


async def test_a_clean_stop_closes_requests_still_in_flight(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None, flush_interval_ms=10))
    ledger.admit("open", lambda: record("open", 4, GATEWAY_DIED))
    ledger.admit("done", lambda: record("done", 0, GATEWAY_DIED))
    ledger.record(record("done", 5))
    assert ledger.open_requests == 1
    await ledger.aclose()
    assert await rows(url) == {
        "open": (500, GATEWAY_DIED, 4_000),
        "done": (200, None, 5_000),
    }


RECORDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path

    from billing.ledger import Ledger, LedgerConfig
    from tests.test_ledger_admission import record
    from billing.record import GATEWAY_DIED

    async def main() -> None:
        url, journal = sys.argv[1], Path(sys.argv[2])
        config = LedgerConfig(url=url, url_env=None, journal_dir=journal, flush_interval_ms=5)
        ledger = await Ledger.open(config)
        for i in range(200):  # in flight across many journal rotations, never recorded
            ledger.admit(f"open-{i}", lambda i=i: record(f"open-{i}", i % 3, GATEWAY_DIED))
        for i in range(3000):
            ledger.admit(f"done-{i}", lambda i=i: record(f"done-{i}", 0, GATEWAY_DIED))
            await asyncio.sleep(0)
            ledger.record(record(f"done-{i}", 1 + i % 5))
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # the writer commits and rotates meanwhile
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def _start_recorder(url: str, journal: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", RECORDER, url, str(journal)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=PROJECT_ROOT,
    )


async def test_sigkill_leaves_one_row_per_admitted_request(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    journal = tmp_path / "journal"
    child = _start_recorder(url, journal)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    before = await rows(url)
    assert not any(rid.startswith("open-") for rid in before)
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None, journal_dir=journal))
    await ledger.aclose()
    after = await rows(url)
    assert len(after) == 3200
    for i in range(200):
        assert after[f"open-{i}"] == (500, GATEWAY_DIED, (i % 3) * 1_000)
    for i in range(3000):
        assert after[f"done-{i}"] == (200, None, (1 + i % 5) * 1_000)


async def test_sigkill_mid_stream_bills_the_output_delivered_by_the_last_checkpoint(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """A stream in flight for over a second when `maas-gateway serve` is killed: its row is
    `gateway_died`, bills output it had delivered (never more, never the prompt)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    provider = {
        "name": "sim",
        "type": "simulated",
        "time_scale": 1,
        "ttft_overhead_ms": 2,
        "prefill_ms_per_token": 0,
        "itl_ms": 40,
        "jitter": 0,
        "output": {"distribution": "uniform", "mean": 200, "sd": 0, "min": 200, "max": 200},
    }
    config = base_config(
        tmp_path, tokenizer_dir, providers=[provider], ledger={"url": url, "url_env": None}
    )
    headers = {"authorization": f"Bearer {ACME_KEY}"}
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 200,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }
    chunks = 0
    with gateway_process(config, tmp_path, name="killed") as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:

            async def short_requests() -> None:  # others finish meanwhile: the journal rotates
                quick = {**body, "stream": False, "max_tokens": 1}
                while True:
                    await http.post("/v1/chat/completions", json=quick, headers=headers)
                    await asyncio.sleep(0.05)

            background = asyncio.create_task(short_requests())
            try:
                async with http.stream(
                    "POST", "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    request_id = response.headers["x-request-id"]
                    started = time.monotonic()
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunks += 1
                        if time.monotonic() - started > 2.5:
                            process.send_signal(signal.SIGKILL)
                            await asyncio.to_thread(process.wait, 10)
                            break
            finally:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await background
    assert chunks > 20
    status, error, prompt, output, cost, output_price, cut_by = await _row_after_restart(
        url, request_id
    )
    assert (status, error, prompt, cut_by) == (500, GATEWAY_DIED, 0, "gateway")
    assert 0 < output <= chunks  # one token a chunk here: never more than was delivered
    assert cost == output * output_price


async def _row_after_restart(url: str, request_id: str) -> tuple[Any, ...]:
    """A request's ledger row once the next gateway has opened the ledger (replayed the
    dead one's journal)."""
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None))
    await ledger.aclose()
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return tuple(
                (
                    await connection.execute(
                        select(
                            ENTRIES.c.status_code,
                            ENTRIES.c.error_type,
                            ENTRIES.c.uncached_input,
                            ENTRIES.c.output,
                            ENTRIES.c.cost_nanos,
                            ENTRIES.c.unit_price_output_nanos,
                            ENTRIES.c.stream_cut_by,
                        ).where(ENTRIES.c.request_id == request_id)
                    )
                ).one()
            )
    finally:
        await engine.dispose()


#: A vLLM stream's head and chunks (as in `tests/transcripts/vllm/`), each sent as an HTTP chunk.
_VLLM_HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _vllm_event(delta: dict[str, Any]) -> bytes:
    chunk = {
        "id": "chatcmpl-9f1c2d3e4b5a46c7a8b9c0d1e2f3a4b5",
        "object": "chat.completion.chunk",
        "created": 1764842400,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }
    event = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


@contextlib.asynccontextmanager
async def _stalling_upstream() -> AsyncIterator[str]:
    """A vLLM-like upstream whose stream sends four chunks in 0.6 s, then nothing."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(_VLLM_HEAD + _vllm_event({"role": "assistant", "content": ""}))
        for text, pause in (("Hello", 0.05), (" there", 0.3), (" friend", 0.3)):
            await asyncio.sleep(pause)
            writer.write(_vllm_event({"content": text}))
        await reader.read()  # stalled until the gateway goes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


async def test_sigkill_while_a_stream_stalls_bills_all_it_had_delivered(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """A stream takes its checkpoints as its reads arrive, at most once a second; one whose
    upstream then stalls is recounted when the journal writes its row, so the row of a
    gateway killed in the stall bills all three words it had delivered, not only the first."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    async with _stalling_upstream() as upstream:
        config = base_config(tmp_path, tokenizer_dir, ledger={"url": url, "url_env": None})
        config["providers"].append({"name": "vllm", "type": "openai_compat", "base_url": upstream})
        config["models"][0]["deployments"] = [{"provider": "vllm", "model": "Qwen"}]
        headers = {"authorization": f"Bearer {ACME_KEY}"}
        body = {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "Greet a friend."}],
        }
        with gateway_process(config, tmp_path, name="stalled") as (base_url, process):
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:

                async def others() -> None:  # requests that end meanwhile: the journal rotates
                    quick = {"model": "gpt-4", "max_tokens": 1, "messages": body["messages"]}
                    while True:
                        await http.post("/v1/chat/completions", json=quick, headers=headers)
                        await asyncio.sleep(0.05)

                background = asyncio.create_task(others())
                delivered = asyncio.Event()
                text = ""

                async def read(response: httpx.Response) -> None:  # on, through the stall
                    nonlocal text
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["delta"]["content"]
                        if text == "Hello there friend":
                            delivered.set()

                try:
                    async with http.stream(
                        "POST", "/v1/chat/completions", json=body, headers=headers
                    ) as response:
                        request_id = response.headers["x-request-id"]
                        reading = asyncio.create_task(read(response))
                        await asyncio.wait_for(delivered.wait(), 10)
                        await asyncio.sleep(2.6)  # stalled for over two seconds
                        process.send_signal(signal.SIGKILL)
                        await asyncio.to_thread(process.wait, 10)
                        with contextlib.suppress(httpx.HTTPError):
                            await reading
                finally:
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await background
    status, error, prompt, output, cost, output_price, cut_by = await _row_after_restart(
        url, request_id
    )
    assert (status, error, prompt, cut_by) == (500, GATEWAY_DIED, 0, "gateway")
    assert output == 3  # "Hello", " there", " friend" in o200k_base
    assert cost == output * output_price


async def test_a_client_gone_before_its_stream_is_read_is_recorded_at_once(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The connection is gone by the time the answer starts (the server's `send` raises, as
    some ASGI servers' does on a closed connection), so the stream is never read once: the
    request still ends in its own row, cut by the client, at once, not at shutdown."""

    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "Hello there"}],
        }
    ).encode()
    async with running_gateway(tmp_path, tokenizer_dir, providers=[SLOW_SIMULATOR]) as gw:
        app: Litestar = create_app(gw.settings, gateway=gw.gateway)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"authorization", f"Bearer {ACME_KEY}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", gw.port),
            "state": {},
        }
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return requests.pop() if requests else {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            raise ConnectionResetError("the client has gone")

        with contextlib.suppress(ConnectionResetError, LitestarException):
            await app(scope, receive, send)  # type: ignore[arg-type]
        start = sent[0]
        assert (start["type"], start["status"]) == ("http.response.start", 200)
        request_id = dict(start["headers"])[b"x-request-id"].decode()
        row = None
        for _ in range(50):
            await gw.gateway.ledger.flush()
            async with AsyncSession(gw.gateway.ledger.engine) as session:
                row = await session.get(LedgerEntry, request_id)
            if row is not None:
                break
            await asyncio.sleep(0.02)
        assert row is not None, "the request has no row while the gateway runs"
        assert (row.status_code, row.error_type, row.stream_cut_by) == (
            499,
            "client_disconnected",
            "client",
        )
