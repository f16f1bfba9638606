"""The locust load-test suite: a short steady run end to end, and the reconciliation's checks.

Locust monkey-patches the process with gevent when imported, so it only ever runs here as a
subprocess (`python -m loadtest.run`); this module imports the locust-free parts.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from billing.ledger import UsageRow
from loadtest.reconcile import compare
from loadtest.scenario import available, load_scenario, parse_duration
from loadtest.workload import AppProfile, ClientRecord, SseReader, build_request, classify

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_short_steady_run_reconciles_and_writes_reports(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.run",
            "steady",
            "--duration",
            "8s",
            "--users",
            "6",
            "--spawn-rate",
            "6",
            "--time-scale",
            "0.3",
            "--report-dir",
            str(tmp_path),
            "--tokenizer-dir",
            str(tokenizer_dir),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: OK" in result.stdout
    assert "PASS: scenario steady" in result.stdout

    run_dir = tmp_path / "steady"
    for name in ("locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    assert "<html" in (run_dir / "report.html").read_text(encoding="utf-8")[:2000].lower()

    with (run_dir / "locust_stats.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["Type"]] = counts.get(row["Type"], 0) + int(row["Request Count"])
    # Streaming metrics are locust entries of their own; nothing failed or was refused.
    assert counts.get("TTFT", 0) > 0 and counts.get("ITL", 0) > 0
    assert counts.get("TOKENS/S", 0) > 0
    assert sum(int(r["Failure Count"]) for r in rows if r["Type"]) == 0

    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == counts.get("POST", 0) + counts.get("STREAM", 0)
    assert {r["tenant"] for r in records} == {"acme", "globex", "initech"}
    assert {r["endpoint"] for r in records} == {"chat", "completions", "embeddings"}
    assert any(r["stream"] for r in records) and not all(r["stream"] for r in records)
    assert all(r["request_id"] and r["usage"] for r in records)

    report = json.loads((run_dir / "reconciliation.json").read_text())
    assert report["ok"] is True and report["differences"] == []
    assert report["outcomes"] == {"ok": len(records)}
    ledger_rows = sum(t["ledger_rows"] for t in report["totals"])
    assert ledger_rows == len(records)


# --- the reconciliation on its own ----------------------------------------------------------


def _record(request_id: str | None, **fields: Any) -> ClientRecord:
    base: dict[str, Any] = {
        "app": "acme-app",
        "tenant": "acme",
        "key_id": "acme-key",
        "endpoint": "chat",
        "model": "gpt-4o-mini",
        "stream": False,
        "outcome": "ok",
        "label": "ok",
        "status": 200,
        "request_id": request_id,
        "started_at": 0.0,
        "duration_ms": 10.0,
        "response_model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        "cost": "0.000011700",
    }
    base.update(fields)
    return ClientRecord(**base)


def _entry(request_id: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": request_id,
        "tenant_id": "acme",
        "key_id": "acme-key",
        "model": "gpt-4o-mini",
        "stream": False,
        "status_code": 200,
        "stream_cut_by": None,
        "uncached_input": 30,
        "cached_input": 0,
        "output": 12,
        "reasoning": 0,
        "cost_nanos": 11_700,
    }
    base.update(fields)
    return base


def _rollups(entries: list[dict[str, Any]]) -> list[UsageRow]:
    return [
        UsageRow(
            e["tenant_id"],
            datetime.now(UTC).date(),
            e["model"],
            "USD",
            1,
            int(e["status_code"] >= 400),
            e["uncached_input"],
            e["cached_input"],
            e["output"],
            e["reasoning"],
            e["cost_nanos"],
        )
        for e in entries
    ]


def test_matching_ledger_has_no_differences() -> None:
    entries = [
        _entry("req_1"),
        _entry(
            "req_2",
            status_code=429,
            error_type="insufficient_quota",
            output=0,
            uncached_input=0,
            cost_nanos=0,
        ),
    ]
    records = [
        _record("req_1"),
        _record(
            "req_2",
            outcome="refused",
            label="insufficient_quota",
            status=429,
            usage=None,
            cost=None,
            response_model=None,
        ),
    ]
    report = compare(records, entries, _rollups(entries))
    assert report.ok, report.render()
    assert report.count("refused") == 1 and report.count("insufficient_quota") == 1


def test_each_kind_of_disagreement_is_reported() -> None:
    entries = [
        _entry("req_tokens", output=13),
        _entry("req_cost", cost_nanos=11_701),
        _entry("req_status", status_code=502),
        _entry("req_billed_refusal", status_code=429),
        _entry("req_unseen_by_any_client"),
    ]
    records = [
        _record("req_tokens"),
        _record("req_cost"),
        _record("req_status"),
        _record(
            "req_billed_refusal",
            outcome="refused",
            label="rate_limit_exceeded",
            status=429,
            usage=None,
            cost=None,
        ),
        _record("req_missing_from_ledger"),
    ]
    report = compare(records, entries, _rollups(entries))
    text = "\n".join(str(d) for d in report.differences)
    assert "req_tokens: completion tokens: ledger 13, client saw 12" in text
    assert "req_cost: cost: ledger 0.000011701, client saw usage.maas.cost 0.000011700" in text
    assert "req_status: ledger status 502, client saw 200" in text
    assert "req_billed_refusal: a rate_limit_exceeded answer was billed" in text
    assert "req_missing_from_ledger: no ledger row" in text
    assert "1 ledger rows no client received, but only 0 requests got no answer" in text
    assert not report.ok and "DIFFERENCES" in report.render()


def test_rollups_that_disagree_with_raw_rows_are_reported() -> None:
    entries = [_entry("req_1")]
    rollups = _rollups([_entry("req_1", output=11)])
    report = compare([_record("req_1")], entries, rollups)
    assert [str(d) for d in report.differences] == [
        "acme/gpt-4o-mini: rollups say output=11, raw ledger rows sum to 12"
    ]


def test_a_stream_cut_by_the_upstream_must_be_an_error_in_the_ledger() -> None:
    cut = _record(
        "req_cut",
        stream=True,
        outcome="cut",
        label="stream cut",
        usage=None,
        cost=None,
        content_chunks=5,
    )
    good = [_entry("req_cut", stream=True, status_code=502, stream_cut_by="upstream", output=5)]
    assert compare([cut], good, _rollups(good)).ok
    bad = [_entry("req_cut", stream=True, status_code=200, output=5)]
    report = compare([cut], bad, _rollups(bad))
    assert "client saw the stream cut" in str(report.differences[0])


def test_requests_lost_in_transport_excuse_unmatched_ledger_rows() -> None:
    entries = [_entry("req_1"), _entry("req_2", status_code=499, output=0, cost_nanos=0)]
    lost = _record(None, outcome="failed", label="transport ReadTimeout", status=None)
    report = compare([_record("req_1"), lost], entries, _rollups(entries))
    assert report.ok, report.render()


# --- what the users send and how they read it -------------------------------------------------


def test_quota_refusals_are_told_apart_from_upstream_rate_limits() -> None:
    assert classify(200, None) == ("ok", "ok")
    quota = {"type": "insufficient_quota", "code": "insufficient_quota"}
    assert classify(429, quota) == ("refused", "insufficient_quota")
    tenant_rpm = {"type": "requests", "code": "rate_limit_exceeded"}
    assert classify(429, tenant_rpm) == ("refused", "rate_limit_exceeded")
    upstream = {"type": "rate_limit_error", "code": "rate_limit_exceeded"}
    assert classify(429, upstream) == ("failed", "429 rate_limit_exceeded")
    assert classify(502, {"type": "upstream_error", "code": None}) == (
        "failed",
        "502 upstream_error",
    )


def test_sse_reader_handles_events_split_across_reads() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    reader = SseReader()
    events: list[Any] = []
    for i in range(0, len(stream), 7):
        events.extend(reader.feed(stream[i : i + 7]))
    assert events == [{"a": 1}, {"b": 2}, "[DONE]"]
    assert reader.pending == b""


def test_requests_use_the_openai_shapes() -> None:
    app = AppProfile.model_validate(
        {
            "name": "app",
            "tenant": "t",
            "key_id": "k",
            "mix": [
                {"endpoint": "chat", "model": "m"},
                {"endpoint": "completions", "model": "m"},
                {"endpoint": "embeddings", "model": "e"},
            ],
            "stream_share": 0.5,
        }
    )
    rng = random.Random(3)
    seen: set[tuple[str, bool]] = set()
    for _ in range(200):
        planned = build_request(app, rng)
        body = planned.body
        seen.add((planned.endpoint, planned.stream))
        if planned.endpoint == "chat":
            assert [m["role"] for m in body["messages"]] == ["system", "user"]
            assert ("max_tokens" in body) != ("max_completion_tokens" in body)
        elif planned.endpoint == "completions":
            assert isinstance(body["prompt"], str) and body["max_tokens"] >= 1
        else:
            assert isinstance(body["input"], str | list) and "stream" not in body
        if planned.stream:
            assert body["stream_options"] == {"include_usage": True}
    assert seen == {
        ("chat", True),
        ("chat", False),
        ("completions", True),
        ("completions", False),
        ("embeddings", False),
    }


def test_every_named_scenario_loads() -> None:
    assert available() == ["budget", "burst", "degrade", "steady"]
    for name in available():
        scenario = load_scenario(name)
        assert scenario.name == name and scenario.description
        assert parse_duration(scenario.duration) > 0
    assert parse_duration("1m30s") == 90
