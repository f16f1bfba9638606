"""Compare what locust's clients received with what the gateway wrote to its ledger.

For every answer a client received (it carries `x-request-id`):

- the ledger has exactly that request, for the same tenant, key and streaming flag;
- its status is the one the client saw (a stream cut by the upstream is a 200 to the
  client and an error status, cut by ``upstream``, in the ledger);
- its tokens are the `usage` the client saw (prompt, cached, completion, reasoning) and its
  cost is the `usage.maas.cost` (and `x-maas-cost` header) the client saw;
- a refused or failed request is billed nothing.

An answer lost in transport (the client timed out or the connection broke) only has to be
in the ledger when the client got its request id.

Then per tenant and model: ledger rows no client saw are allowed only up to the number of
requests whose answer never reached the client (transport errors), and the rollups
(`Ledger.usage`) sum to the raw rows in requests, tokens and cost.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from billing.ledger import Ledger, LedgerConfig, UsageRow
from billing.money import format_amount, to_nanos
from billing.store import usage
from billing.store.schema import ENTRY_COLUMNS
from loadtest.workload import ClientRecord

_TOKEN_FIELDS = ("uncached_input", "cached_input", "output", "reasoning")


@dataclass(slots=True)
class Difference:
    """One way the ledger disagrees with the clients."""

    tenant: str
    model: str
    what: str
    request_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.tenant}/{self.model}"
        return (
            f"{where} {self.request_id}: {self.what}"
            if self.request_id
            else f"{where}: {self.what}"
        )


@dataclass(slots=True)
class Totals:
    """Counts and sums for one tenant and model."""

    client_answers: int = 0
    client_lost: int = 0
    client_prompt: int = 0
    client_completion: int = 0
    client_cost_nanos: int = 0
    ledger_rows: int = 0
    ledger_matched: int = 0
    ledger_prompt: int = 0
    ledger_completion: int = 0
    ledger_cost_nanos: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Reconciliation:
    """The result: per-tenant/model totals, client outcome counts and every difference."""

    totals: dict[tuple[str, str], Totals]
    outcomes: Counter[str]
    labels: Counter[str]
    differences: list[Difference]
    unflushed_journal: int = 0
    cut_streams: list[tuple[str, int, int]] = field(default_factory=list)
    deployments: Counter[str] = field(default_factory=Counter)
    retried: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences

    def count(self, name: str) -> int:
        """Client answers with this outcome (ok, refused, failed, cut) or label."""
        return self.outcomes.get(name, 0) + self.labels.get(name, 0)

    def render(self) -> str:
        lines = ["Reconciliation: ledger vs what the clients received", ""]
        header = (
            f"{'tenant':<12} {'model':<24} {'answers':>7} {'lost':>5} {'ledger':>6} "
            f"{'prompt(c/l)':>17} {'completion(c/l)':>17} {'cost client/ledger':>25}"
        )
        lines.append(header)
        for (tenant, model), t in sorted(self.totals.items()):
            lines.append(
                f"{tenant:<12} {model:<24} {t.client_answers:>7} {t.client_lost:>5} "
                f"{t.ledger_rows:>6} {f'{t.client_prompt}/{t.ledger_prompt}':>17} "
                f"{f'{t.client_completion}/{t.ledger_completion}':>17} "
                f"{_short(t.client_cost_nanos) + '/' + _short(t.ledger_cost_nanos):>25}"
            )
        lines.append("")
        lines.append(
            "client outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        )
        lines.append("labels: " + ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items())))
        lines.append(
            "ledger rows by deployment: "
            + ", ".join(f"{k or '(none)'}={v}" for k, v in sorted(self.deployments.items()))
            + f"; retried or failed over: {self.retried}"
        )
        for request_id, chunks, billed in self.cut_streams:
            lines.append(
                f"cut stream {request_id}: client received {chunks} content chunks, "
                f"ledger billed {billed} output tokens"
            )
        lines.append("")
        if self.ok:
            lines.append("RESULT: OK, the ledger matches every answer the clients received")
        else:
            lines.append(f"RESULT: {len(self.differences)} DIFFERENCES")
            lines.extend(f"  - {d}" for d in self.differences[:200])
            if len(self.differences) > 200:
                lines.append(f"  ... and {len(self.differences) - 200} more")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "outcomes": dict(self.outcomes),
            "labels": dict(self.labels),
            "unflushed_journal": self.unflushed_journal,
            "deployments": dict(self.deployments),
            "retried": self.retried,
            "cut_streams": [
                {"request_id": r, "content_chunks": c, "billed_output": b}
                for r, c, b in self.cut_streams
            ],
            "totals": [
                {
                    "tenant": tenant,
                    "model": model,
                    **{k: v for k, v in vars_of(t).items() if k != "outcomes"},
                    "outcomes": dict(t.outcomes),
                }
                for (tenant, model), t in sorted(self.totals.items())
            ],
            "differences": [str(d) for d in self.differences],
        }


def vars_of(totals: Totals) -> dict[str, Any]:
    return {f.name: getattr(totals, f.name) for f in fields(Totals)}


def _short(nanos: int) -> str:
    return format_amount(nanos).rstrip("0").rstrip(".") or "0"


async def read_ledger(config: LedgerConfig) -> tuple[list[dict[str, Any]], list[UsageRow]]:
    """Every raw ledger row, and the rollups by tenant and model (all time, UTC days)."""
    ledger = await Ledger.open(config)
    try:
        entries = [
            dict(row._mapping)
            async for chunk in usage.entries(ledger.engine, ENTRY_COLUMNS)
            for row in chunk
        ]
        now = datetime.now(UTC)
        rollups = await ledger.usage(None, now - timedelta(days=2), now + timedelta(days=1), "UTC")
    finally:
        await ledger.aclose()
    return entries, rollups


def compare(
    records: list[ClientRecord], entries: list[dict[str, Any]], rollups: list[UsageRow]
) -> Reconciliation:
    """Check the ledger against the client records; see the module docstring."""
    by_id = {entry["request_id"]: entry for entry in entries}
    totals: dict[tuple[str, str], Totals] = defaultdict(Totals)
    differences: list[Difference] = []
    outcomes: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    seen: set[str] = set()
    lost_by_tenant: Counter[str] = Counter()
    cut_streams: list[tuple[str, int, int]] = []

    for rec in records:
        outcomes[rec.outcome] += 1
        labels[rec.label] += 1
        if rec.request_id is None:
            lost_by_tenant[rec.tenant] += 1
            t = totals[(rec.tenant, rec.model)]
            t.client_lost += 1
            t.outcomes[rec.outcome] += 1
            continue
        entry = by_id.get(rec.request_id)
        model = str(entry["model"]) if entry is not None else rec.model
        t = totals[(rec.tenant, model)]
        t.client_answers += 1
        t.outcomes[rec.outcome] += 1
        usage = rec.usage or {}
        t.client_prompt += int(usage.get("prompt_tokens") or 0)
        t.client_completion += int(usage.get("completion_tokens") or 0)
        if rec.cost:
            t.client_cost_nanos += _nanos(rec.cost)

        def differ(what: str, rec: ClientRecord = rec, model: str = model) -> None:
            differences.append(Difference(rec.tenant, model, what, rec.request_id))

        if rec.request_id in seen:
            differ("the same request id was answered twice")
            continue
        seen.add(rec.request_id)
        if entry is None:
            differ(f"no ledger row (client saw {rec.status} {rec.label})")
            continue
        t.ledger_matched += 1
        if rec.outcome == "cut":
            cut_streams.append((rec.request_id, rec.content_chunks, int(entry["output"])))
        for problem in _row_problems(rec, entry):
            differ(problem)

    ledger_sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    unmatched_by_tenant: Counter[str] = Counter()
    for entry in entries:
        key = (str(entry["tenant_id"]), str(entry["model"]))
        t = totals[key]
        t.ledger_rows += 1
        t.ledger_prompt += int(entry["uncached_input"]) + int(entry["cached_input"])
        t.ledger_completion += int(entry["output"])
        t.ledger_cost_nanos += int(entry["cost_nanos"])
        sums = ledger_sums[key]
        sums[0] += 1
        for index, name in enumerate(_TOKEN_FIELDS, start=1):
            sums[index] += int(entry[name])
        sums[5] += int(entry["cost_nanos"])
        if entry["request_id"] not in seen:
            unmatched_by_tenant[key[0]] += 1

    for tenant, unmatched in sorted(unmatched_by_tenant.items()):
        lost = lost_by_tenant.get(tenant, 0)
        if unmatched > lost:
            differences.append(
                Difference(
                    tenant,
                    "*",
                    f"{unmatched} ledger rows no client received, but only {lost} requests "
                    "got no answer",
                )
            )

    rollup_sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    for row in rollups:
        sums = rollup_sums[(row.tenant_id, row.model)]
        for index, value in enumerate(
            (
                row.requests,
                row.uncached_input,
                row.cached_input,
                row.output,
                row.reasoning,
                row.cost_nanos,
            )
        ):
            sums[index] += value
    names = ("requests", *_TOKEN_FIELDS, "cost_nanos")
    for key in sorted(set(ledger_sums) | set(rollup_sums)):
        raw, rolled = ledger_sums.get(key, [0] * 6), rollup_sums.get(key, [0] * 6)
        for name, a, b in zip(names, raw, rolled, strict=True):
            if a != b:
                differences.append(
                    Difference(*key, f"rollups say {name}={b}, raw ledger rows sum to {a}")
                )
    return Reconciliation(
        dict(totals),
        outcomes,
        labels,
        differences,
        cut_streams=cut_streams,
        deployments=Counter(str(entry.get("deployment") or "") for entry in entries),
        retried=sum(1 for entry in entries if int(entry.get("attempts") or 1) > 1),
    )


def _row_problems(rec: ClientRecord, entry: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if entry["tenant_id"] != rec.tenant or entry["key_id"] != rec.key_id:
        problems.append(
            f"ledger says tenant {entry['tenant_id']} key {entry['key_id']}, "
            f"client used {rec.tenant} key {rec.key_id}"
        )
    if bool(entry["stream"]) != rec.stream:
        problems.append(f"ledger stream={bool(entry['stream'])}, client stream={rec.stream}")
    if rec.outcome == "lost":  # the client gave up or lost the connection: status unknown
        return problems
    if rec.response_model and entry["model"] != rec.response_model:
        problems.append(f"ledger model {entry['model']}, client saw {rec.response_model}")
    status = int(entry["status_code"])
    if rec.outcome == "cut":
        if status < 400 or entry["stream_cut_by"] != "upstream":
            problems.append(
                f"client saw the stream cut ({rec.label}); ledger has status {status}, "
                f"cut by {entry['stream_cut_by']}"
            )
    elif status != rec.status:
        problems.append(f"ledger status {status}, client saw {rec.status}")
    tokens = {name: int(entry[name]) for name in _TOKEN_FIELDS}
    cost = int(entry["cost_nanos"])
    if rec.outcome in ("refused", "failed"):
        if any(tokens.values()) or cost:
            problems.append(f"a {rec.label} answer was billed {tokens} cost {format_amount(cost)}")
    if rec.outcome == "ok" and rec.usage is None:
        problems.append("the client received no usage")
    if rec.usage is not None:
        usage = rec.usage
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        seen = {
            "prompt": prompt,
            "cached": cached,
            "completion": completion,
            "reasoning": reasoning,
        }
        stored = {
            "prompt": tokens["uncached_input"] + tokens["cached_input"],
            "cached": tokens["cached_input"],
            "completion": tokens["output"],
            "reasoning": tokens["reasoning"],
        }
        for name, value in seen.items():
            if stored[name] != value:
                problems.append(f"{name} tokens: ledger {stored[name]}, client saw {value}")
    for source, amount in (("usage.maas.cost", rec.cost), ("x-maas-cost", rec.cost_header)):
        if amount is not None and _nanos(amount) != cost:
            problems.append(f"cost: ledger {format_amount(cost)}, client saw {source} {amount}")
    return problems


def _nanos(amount: str) -> int:
    return to_nanos(amount)


def count_journal_segments(journal_dir: Path) -> int:
    """Files the gateway left in its journal directory (none after a clean shutdown)."""
    if not journal_dir.exists():
        return 0
    return sum(1 for path in journal_dir.iterdir() if path.is_file())


def write_report(report: Reconciliation, directory: Path) -> tuple[Path, Path]:
    """Write `reconciliation.txt` and `reconciliation.json` into `directory`."""
    text = directory / "reconciliation.txt"
    text.write_text(report.render() + "\n", encoding="utf-8")
    data = directory / "reconciliation.json"
    data.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True), encoding="utf-8")
    return text, data
