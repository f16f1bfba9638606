"""Issue 13, the edge: a real `maas-gateway serve` process attacked over real sockets.

The metrics are only on their own listener; request heads are bounded (431 / 414 / 408) and
an attack with unfinished 32 MiB header lines leaves the process's memory flat; deeply nested
JSON gets a 400; a broken metrics backend leaves the client's 200 (and its ledger row) intact.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ACME_KEY, PROJECT_ROOT, base_config, free_port, gateway_process

SCRAPE_TOKEN = "scrape-token-test-0000000000"
HEADER_TIMEOUT_S = 1.0
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
AUTH = {"authorization": f"Bearer {ACME_KEY}"}


@dataclass(frozen=True)
class Served:
    url: str
    pid: int
    metrics_url: str
    port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("edge")
    metrics_port = free_port()
    config = base_config(
        tmp,
        tokenizer_dir,
        metrics={"port": metrics_port, "bearer_token_env": "MAAS_TEST_SCRAPE_TOKEN"},
        server={"http": {"header_timeout_s": HEADER_TIMEOUT_S}},
    )
    env = {"MAAS_TEST_SCRAPE_TOKEN": SCRAPE_TOKEN}
    with gateway_process(config, tmp, env=env, name="edge") as (url, process):
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Served(url, process.pid, metrics_url, int(url.rsplit(":", 1)[1]))


# ---- raw HTTP over a socket --------------------------------------------------------------------


def exchange(port: int, chunks: Iterator[bytes], timeout: float = 20.0) -> bytes:
    """Send `chunks` on one connection while reading what comes back until the server
    closes (a reader thread, so an answer sent early is never lost to a reset)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    received = bytearray()

    def read() -> None:
        try:
            while data := sock.recv(65536):
                received.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError:
        pass  # the server closed while we were still sending: expected for an attack
    reader.join(timeout)
    sock.close()
    return bytes(received)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def body_of(response: bytes) -> Any:
    import json

    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def big_header(total: int, chunk: int = 1 << 20, *, finish: bool = True) -> Iterator[bytes]:
    yield b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nx-big: "
    sent = 0
    while sent < total:
        yield b"a" * chunk
        sent += chunk
    if finish:
        yield b"\r\n\r\n"


# ---- the metrics listener ----------------------------------------------------------------------


def test_metrics_only_on_their_listener_with_the_token(served: Served) -> None:
    assert httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers=AUTH).is_success
    public = httpx.get(served.url + "/metrics")
    assert public.status_code == 404
    assert public.json()["error"]["type"] == "invalid_request_error"
    assert "tenant=" not in public.text
    assert httpx.get(served.metrics_url).status_code == 401
    wrong = httpx.get(served.metrics_url, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    scrape = httpx.get(served.metrics_url, headers={"authorization": f"Bearer {SCRAPE_TOKEN}"})
    assert scrape.status_code == 200
    requests = [line for line in scrape.text.splitlines() if line.startswith("maas_requests_")]
    assert any('tenant="acme"' in line for line in requests), scrape.text
    assert scrape.headers["content-type"].startswith("text/plain")
    # the listener serves nothing else
    other = httpx.get(served.metrics_url.removesuffix("/metrics") + "/v1/models", headers=AUTH)
    assert other.status_code == 404


# ---- bounded request heads ---------------------------------------------------------------------


def test_a_16_mib_header_gets_431(served: Served) -> None:
    response = exchange(served.port, big_header(16 << 20))
    assert status_of(response) == 431
    error = body_of(response)["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert "32768 bytes" in error["message"]


def test_too_many_headers_get_431(served: Served) -> None:
    for count in (101, 20_000):
        fields = b"".join(b"x-h%d: v\r\n" % i for i in range(count))
        head = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n" + fields + b"\r\n"
        response = exchange(served.port, iter([head]))
        assert status_of(response) == 431, count
    # 98 extra fields plus host and the client's own: within the limit of 100
    fields = b"".join(b"x-h%d: v\r\n" % i for i in range(98))
    head = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n" + fields + b"connection: close\r\n\r\n"
    assert status_of(exchange(served.port, iter([head]))) == 200


def test_a_long_request_line_gets_414(served: Served) -> None:
    head = b"GET /healthz?" + b"q" * 9000 + b" HTTP/1.1\r\nhost: gateway\r\n\r\n"
    response = exchange(served.port, iter([head]))
    assert status_of(response) == 414
    assert body_of(response)["error"]["code"] == "request_line_too_long"


def test_a_slow_head_gets_408_and_an_idle_connection_closes(served: Served) -> None:
    def slowly() -> Iterator[bytes]:
        yield b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n"
        for i in range(40):  # a field every 0.1 s: never complete within the timeout
            time.sleep(0.1)
            yield b"x-slow-%d: v\r\n" % i

    started = time.monotonic()
    response = exchange(served.port, slowly())
    assert status_of(response) == 408
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 3
    started = time.monotonic()
    assert exchange(served.port, iter([])) == b""  # opened, never used: closed
    assert HEADER_TIMEOUT_S - 0.2 < time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_unfinished_32_mib_header_lines_leave_memory_flat(served: Served) -> None:
    for _ in range(3):  # warm up: the answers and the connections themselves
        status_of(exchange(served.port, big_header(1 << 20)))
    before = rss_kib(served.pid)
    answers: list[bytes] = []
    peak = [before]

    def attack() -> None:
        answers.append(exchange(served.port, big_header(32 << 20, finish=False)))

    attackers = [threading.Thread(target=attack) for _ in range(4)]
    for thread in attackers:
        thread.start()
    while any(thread.is_alive() for thread in attackers):
        peak[0] = max(peak[0], rss_kib(served.pid))
        time.sleep(0.02)
    after = rss_kib(served.pid)
    assert [status_of(answer) for answer in answers] == [431] * 4
    # Unbounded, the four lines grew the process by 159 MiB; bounded, by (almost) nothing.
    assert max(peak[0], after) - before < 8 * 1024, (before, peak[0], after)
    # and the gateway still serves
    assert httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers=AUTH).is_success


def test_ordinary_keep_alive_requests_pass_the_limits(served: Served) -> None:
    with httpx.Client(base_url=served.url, headers=AUTH) as client:
        for _ in range(5):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


# ---- nested JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        b"[" * 1000 + b"]" * 1000,
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
        b"[" * 100_000,  # unterminated
        b"[" * 65 + b"]" * 65,  # one level past the limit (the body itself is one)
    ],
    ids=["arrays", "objects", "unterminated", "65"],
)
def test_deeply_nested_json_gets_400_naming_the_limit(served: Served, extra: bytes) -> None:
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x":' + extra
    body += b"}"
    response = httpx.post(
        served.url + "/v1/chat/completions",
        content=body,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "json_too_deep"
    assert "at most 64 levels" in error["message"]


def test_nesting_within_the_limit_is_accepted(served: Served) -> None:
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x":'
    body += b"[" * 62 + b"]" * 62 + b"}"  # 64 levels with the body and its "x"
    response = httpx.post(
        served.url + "/v1/chat/completions",
        content=body,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 200, response.text


# ---- a failing metrics backend -----------------------------------------------------------------


def test_a_failing_metrics_backend_leaves_the_answer_intact(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """Every observation of the process raises, as writing to a full disk does (the metrics of
    `serve --workers N` live in memory-mapped files): the fault is put into the real process at
    start-up by a `sitecustomize` module, since a healthy one will not fail on demand. The
    requests are still answered, recorded and billed, and the fault is logged once."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import gateway.metrics\n\n"
        "def observe_request(self, *args, **kwargs):\n"
        "    raise OSError(28, 'No space left on device')\n\n"
        "gateway.metrics.Metrics.observe_request = observe_request\n"
    )
    config = base_config(tmp_path, tokenizer_dir)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(PROJECT_ROOT)])}
    with gateway_process(config, tmp_path, env=env, name="broken") as (url, _):
        ids = []
        for model in ("gpt-4o-mini", "gpt-4", "gpt-4o-mini"):
            response = httpx.post(
                url + "/v1/chat/completions", json={**CHAT, "model": model}, headers=AUTH
            )
            assert response.status_code == 200, response.text
            assert Decimal(response.headers["x-maas-cost"]) > 0
            ids.append(response.headers["x-request-id"])
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT request_id, status_code, cost_nanos FROM ledger_entries")
        recorded = {row[0]: row for row in rows}
    assert set(ids) <= set(recorded)
    assert all(recorded[i][1] == 200 and recorded[i][2] > 0 for i in ids)
    log = (tmp_path / "broken.log").read_text()
    assert log.count("observing a request in the metrics failed") == 1, log[-3000:]
