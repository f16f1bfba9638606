"""Locust users that behave like the apps of several tenants calling the gateway.

Run through `python -m loadtest.run SCENARIO` (which starts the backends and the gateway
and writes the plan), or by hand against a running gateway::

    PYTHONPATH=. locust -f loadtest/locustfile.py --plan plan.json --host http://127.0.0.1:8080

Each user takes one app of the plan (in proportion to the apps' weights) and sends that
app's requests in OpenAI's shapes, streamed or not. Besides one entry per kind of request
(type ``POST``, or ``STREAM`` for streams), it reports:

- ``TTFT``: time to the first generated token of a stream, in ms;
- ``ITL``: the mean gap between generated chunks of one stream, in ms;
- ``TOKENS/S``: output tokens per second of one request (decode rate for streams), shown in
  locust's time columns;
- ``QUOTA``: the gateway's quota refusals (429 ``insufficient_quota`` or
  ``rate_limit_exceeded``), named by tenant and code, counted apart from failures.

Every answer is appended to the plan's JSONL records file for the reconciliation.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import Any, TextIO

import gevent
import requests
from locust import User, events, task
from locust.env import Environment

from loadtest.workload import (
    AppAssigner,
    AppProfile,
    ClientRecord,
    Plan,
    PlannedRequest,
    SseReader,
    build_request,
    chunk_text,
    classify,
)

PLAN_ENV = "MAAS_LOADTEST_PLAN"
CSV_SETTLE_S = 1.5


class _Run:
    """The state shared by every user of this locust process, set up at init."""

    plan: Plan | None = None
    assigner: AppAssigner | None = None
    records: TextIO | None = None
    user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--plan",
        type=str,
        env_var=PLAN_ENV,
        default=os.environ.get(PLAN_ENV, ""),
        help="JSON plan of apps and keys (written by `python -m loadtest.run`)",
    )


@events.init.add_listener
def _load_plan(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    path = getattr(options, "plan", "") if options is not None else ""
    if not path:
        raise SystemExit(f"loadtest: pass --plan or set {PLAN_ENV}")
    _Run.plan = Plan.load(path)
    _Run.assigner = AppAssigner(_Run.plan.apps)
    _Run.records = open(_Run.plan.records_path, "a", encoding="utf-8", buffering=1)


@events.quitting.add_listener
def _close_records(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None):
        # Locust rewrites its CSV files once a second and not again at exit; give its writer
        # one more turn so the files hold the final counts (as the HTML report does).
        gevent.sleep(CSV_SETTLE_S)
    if _Run.records is not None:
        _Run.records.close()
        _Run.records = None


class TenantApp(User):
    """One instance of one tenant's app; see the module docstring for what it reports."""

    app: AppProfile
    rng: random.Random
    session: requests.Session

    def on_start(self) -> None:
        assert _Run.plan is not None and _Run.assigner is not None
        self.app = _Run.assigner.next()
        number = next(_Run.user_numbers)
        seed = _Run.plan.seed
        self.rng = random.Random(f"{seed}-{number}") if seed is not None else random.Random()
        self.session = requests.Session()
        self.session.headers["authorization"] = f"Bearer {self.app.api_key}"

    def on_stop(self) -> None:
        self.session.close()

    def wait_time(self) -> float:
        low, high = self.app.think_time_s
        return self.rng.uniform(low, high)

    @task
    def call(self) -> None:
        planned = build_request(self.app, self.rng)
        record = ClientRecord(
            app=planned.app,
            tenant=planned.tenant,
            key_id=planned.key_id,
            endpoint=planned.endpoint,
            model=planned.model,
            stream=planned.stream,
            outcome="failed",
            label="",
            status=None,
            request_id=None,
            started_at=time.time(),
            duration_ms=0.0,
        )
        started = time.perf_counter()
        size = 0
        try:
            response = self.session.post(
                (self.host or "") + planned.path,
                json=planned.body,
                stream=planned.stream,
                timeout=(5, self.app.timeout_s),
            )
            record.status = response.status_code
            record.request_id = response.headers.get("x-request-id")
            record.cost_header = response.headers.get("x-maas-cost")
            if planned.stream and response.status_code == 200:
                size = self._read_stream(response, record, started)
            else:
                size = len(response.content)
                self._read_json(response, record)
        except (requests.RequestException, ValueError) as exc:
            record.outcome, record.label = "lost", f"transport {type(exc).__name__}"
            record.error = str(exc)[:300]
        record.duration_ms = (time.perf_counter() - started) * 1000
        self._report(planned, record, size)

    def _read_json(self, response: requests.Response, record: ClientRecord) -> None:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        record.outcome, record.label = classify(response.status_code, error)
        if error is not None:
            record.error = str(error.get("message"))[:300]
            return
        record.response_model = body.get("model")
        usage = body.get("usage")
        if isinstance(usage, dict):
            record.usage = usage
            record.cost = (usage.get("maas") or {}).get("cost")

    def _read_stream(
        self, response: requests.Response, record: ClientRecord, started: float
    ) -> int:
        reader = SseReader()
        chunk_times: list[float] = []
        size = 0
        done = False
        with response:
            for data in response.iter_content(chunk_size=None):
                now = time.perf_counter()
                size += len(data)
                for event in reader.feed(data):
                    if event == "[DONE]":
                        done = True
                        continue
                    assert isinstance(event, dict)
                    if "error" in event:
                        record.outcome, record.label = (
                            "cut",
                            "stream cut: "
                            + str(event["error"].get("code") or event["error"].get("type")),
                        )
                        record.error = str(event["error"].get("message"))[:300]
                        continue
                    record.response_model = event.get("model") or record.response_model
                    if chunk_text(event):
                        chunk_times.append(now)
                    usage = event.get("usage")
                    if isinstance(usage, dict):
                        record.usage = usage
                        record.cost = (usage.get("maas") or {}).get("cost")
        record.content_chunks = len(chunk_times)
        if chunk_times:
            record.ttft_ms = (chunk_times[0] - started) * 1000
            if len(chunk_times) > 1:
                gaps = (chunk_times[-1] - chunk_times[0]) / (len(chunk_times) - 1)
                record.extra["itl_ms"] = gaps * 1000
        if record.outcome != "cut":
            if done:
                record.outcome, record.label = "ok", "ok"
            else:
                record.outcome, record.label = "cut", "stream ended without [DONE]"
        if chunk_times:
            record.extra["decode_s"] = chunk_times[-1] - chunk_times[0]
        return size

    def _report(self, planned: PlannedRequest, record: ClientRecord, size: int) -> None:
        fire = self.environment.events.request.fire
        if _Run.records is not None:
            _Run.records.write(record.to_json() + "\n")
        if record.outcome == "refused":
            fire(
                request_type="QUOTA",
                name=f"{record.tenant} {record.label}",
                response_time=record.duration_ms,
                response_length=size,
                exception=None,
                context={},
            )
            return
        kind = "STREAM" if planned.stream else "POST"
        exception = None if record.outcome == "ok" else RuntimeError(record.label)
        fire(
            request_type=kind,
            name=f"{planned.app} {planned.endpoint} {planned.model}",
            response_time=record.duration_ms,
            response_length=size,
            exception=exception,
            context={},
        )
        if record.outcome != "ok":
            return
        series = f"{record.tenant} {planned.model}"
        if record.ttft_ms is not None:
            fire(
                request_type="TTFT",
                name=series,
                response_time=record.ttft_ms,
                response_length=0,
                exception=None,
                context={},
            )
        itl = record.extra.get("itl_ms")
        if itl is not None:
            fire(
                request_type="ITL",
                name=series,
                response_time=itl,
                response_length=0,
                exception=None,
                context={},
            )
        rate = _tokens_per_second(record)
        if rate is not None:
            fire(
                request_type="TOKENS/S",
                name=series,
                response_time=rate,
                response_length=0,
                exception=None,
                context={},
            )


def _tokens_per_second(record: ClientRecord) -> float | None:
    """Output tokens per second: decode rate for streams, tokens over duration otherwise."""
    usage = record.usage or {}
    tokens = int(usage.get("completion_tokens") or 0)
    if tokens <= 0:
        return None
    decode_s = record.extra.get("decode_s")
    if record.stream and decode_s and tokens > 1:
        return (tokens - 1) / decode_s
    if record.duration_ms > 0:
        return tokens / (record.duration_ms / 1000)
    return None
