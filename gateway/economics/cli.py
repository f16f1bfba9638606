"""The `simulate-month` and `what-if` subcommands of `maas-gateway`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def add_commands(commands: Any) -> None:
    """Add the economics subcommands to the `maas-gateway` parser's subparsers."""
    month = commands.add_parser(
        "simulate-month",
        help="run a scenario's synthetic month; write invoices, a margin report and charts",
        description="Drive a scenario's month of synthetic traffic through the gateway on a "
        "compressed clock (simulated backends, no sleeping), then finalise each tenant's "
        "invoice, reconcile it with the ledger and write the margin report and its chart. "
        "Exits 1 when reconciliation finds a difference.",
    )
    month.add_argument("scenario", type=Path, help="scenario YAML (see examples/scenarios/)")
    month.add_argument("--out", type=Path, required=True, help="output directory (fresh)")
    month.add_argument(
        "--variant", default="baseline", help="run one of the scenario's variants instead"
    )
    month.add_argument("--requests", type=int, help="override the month's request count")
    month.add_argument("--tokenizer-dir", type=Path, help="directory of .tiktoken files")
    month.set_defaults(run=_simulate_month)

    what = commands.add_parser(
        "what-if",
        help="run one scenario under two configurations and compare them",
        description="Run the same seeded month twice, as FIRST and as SECOND (each 'baseline' "
        "or a variant named in the scenario file), and report revenue, compute cost, idle "
        "capacity, gross margin, modelled latency and refusals side by side.",
    )
    what.add_argument("scenario", type=Path, help="scenario YAML with variants")
    what.add_argument("first", help="'baseline' or a variant name")
    what.add_argument("second", help="a variant name (or 'baseline')")
    what.add_argument("--out", type=Path, required=True, help="output directory (fresh)")
    what.add_argument("--requests", type=int, help="override the month's request count")
    what.add_argument("--tokenizer-dir", type=Path, help="directory of .tiktoken files")
    what.set_defaults(run=_what_if)


def _load(args: argparse.Namespace) -> Any:
    from gateway.economics.scenario import load_scenario

    for noisy in ("httpx", "alembic"):  # one line per request or migration step otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    scenario = load_scenario(args.scenario)
    if args.requests:
        scenario = scenario.model_copy(update={"requests": args.requests})
    return scenario


def _progress(done: int, total: int) -> None:
    print(f"  {done}/{total} requests", file=sys.stderr, flush=True)


def _simulate_month(args: argparse.Namespace) -> int:
    from gateway.economics.scenario import ScenarioError
    from gateway.economics.simulate import simulate_month

    try:
        scenario = _load(args).variant(args.variant)
    except ScenarioError as exc:
        print(f"maas-gateway: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    outcome = asyncio.run(
        simulate_month(scenario, args.out, tokenizer_dir=args.tokenizer_dir, progress=_progress)
    )
    print(outcome.report.to_text())
    print(outcome.reconciliation)
    print(
        f"{outcome.run.planned} requests in {outcome.run.elapsed_s:.1f}s through the gateway,"
        f" {time.perf_counter() - started:.1f}s in all; output in {args.out}"
    )
    clean = outcome.reconciliation.ok and not outcome.reconciliation.pending
    return 0 if clean else 1


def _what_if(args: argparse.Namespace) -> int:
    from gateway.economics.scenario import ScenarioError
    from gateway.economics.whatif import what_if

    try:
        scenario = _load(args)
        scenario.variant(args.first)
        scenario.variant(args.second)
    except ScenarioError as exc:
        print(f"maas-gateway: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    comparison = asyncio.run(
        what_if(
            scenario,
            args.first,
            args.second,
            args.out,
            tokenizer_dir=args.tokenizer_dir,
            progress=_progress,
        )
    )
    print(comparison.to_text())
    print(f"done in {time.perf_counter() - started:.1f}s; output in {args.out}")
    clean = all(o.reconciliation.ok and not o.reconciliation.pending for o in comparison.outcomes)
    return 0 if clean else 1
