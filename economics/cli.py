"""The `simulate-month`, `simulate-months` and `what-if` subcommands of `maas-gateway`.

Misuse (a missing or invalid scenario, an unknown variant, an output directory that is
not empty, a count that is not positive) is one line on stderr and exit code 2.
"""

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

    months = commands.add_parser(
        "simulate-months",
        help="run a scenario's months one after another; write the margin trajectory",
        description="Project a scenario over its `months` (or --months N): month by month, "
        "with each tenant's growth, the cost trend (accelerator price and throughput) and "
        "list price versions on their dates, each month through the gateway on a compressed "
        "clock with its own invoices, reconciliation and margin report (<out>/<YYYY-MM>/), "
        "then the margin trajectory: trajectory.txt, .json and .svg. Exits 1 when any "
        "month's reconciliation finds a difference.",
    )
    months.add_argument("scenario", type=Path, help="scenario YAML with months and trends")
    months.add_argument("--out", type=Path, required=True, help="output directory (fresh)")
    months.add_argument("--months", type=int, help="override the number of months")
    months.add_argument("--requests", type=int, help="override the first month's request count")
    months.add_argument("--tokenizer-dir", type=Path, help="directory of .tiktoken files")
    months.set_defaults(run=_simulate_months)

    what = commands.add_parser(
        "what-if",
        help="run one scenario under two configurations and compare them",
        description="Run the same seeded month twice, as FIRST and as SECOND (each 'baseline' "
        "or a variant named in the scenario file), and report revenue, compute cost, idle "
        "capacity, gross margin, modelled latency and refusals side by side. Each run writes "
        "into <out>/<name>/ (the same name twice: <out>/<name>/ and <out>/<name>-again/).",
    )
    what.add_argument("scenario", type=Path, help="scenario YAML with variants")
    what.add_argument("first", help="'baseline' or a variant name")
    what.add_argument("second", help="a variant name (or 'baseline')")
    what.add_argument("--out", type=Path, required=True, help="output directory (fresh)")
    what.add_argument("--requests", type=int, help="override the month's request count")
    what.add_argument("--tokenizer-dir", type=Path, help="directory of .tiktoken files")
    what.set_defaults(run=_what_if)


def _load(args: argparse.Namespace) -> Any:
    """The scenario with --requests applied; `ScenarioError` for any misuse."""
    from economics.scenario import ScenarioError, load_scenario

    for noisy in ("httpx", "alembic"):  # one line per request or migration step otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for option in ("requests", "months"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ScenarioError(f"--{option} must be a positive number, not {value}")
    if args.tokenizer_dir is not None and not args.tokenizer_dir.is_dir():
        raise ScenarioError(f"--tokenizer-dir {args.tokenizer_dir}: not a directory")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScenarioError(f"--out {out}: exists and is not an empty directory; use a new one")
    scenario = load_scenario(args.scenario)
    if args.requests:
        scenario = scenario.model_copy(update={"requests": args.requests})
    return scenario


def _fail(message: object) -> int:
    """Misuse: the message on one line of stderr, exit code 2."""
    first, *rest = [line.strip() for line in str(message).splitlines() if line.strip()] or [""]
    print(f"maas-gateway: {' '.join([first, '; '.join(rest)]).strip()}", file=sys.stderr)
    return 2


def _progress(done: int, total: int) -> None:
    print(f"  {done}/{total} requests", file=sys.stderr, flush=True)


def _simulate_month(args: argparse.Namespace) -> int:
    from economics.scenario import ScenarioError
    from economics.simulate import simulate_month

    try:
        scenario = _load(args).variant(args.variant)
    except ScenarioError as exc:
        return _fail(exc)
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
    from economics.scenario import ScenarioError
    from economics.whatif import what_if

    try:
        scenario = _load(args)
        scenario.variant(args.first)
        scenario.variant(args.second)
    except ScenarioError as exc:
        return _fail(exc)
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


def _simulate_months(args: argparse.Namespace) -> int:
    from economics.projection import simulate_months
    from economics.scenario import ScenarioError

    try:
        scenario = _load(args)
    except ScenarioError as exc:
        return _fail(exc)
    started = time.perf_counter()
    trajectory = asyncio.run(
        simulate_months(
            scenario,
            args.out,
            months=args.months,
            tokenizer_dir=args.tokenizer_dir,
            progress=_progress,
        )
    )
    print(trajectory.to_text())
    print(f"done in {time.perf_counter() - started:.1f}s; output in {args.out}")
    clean = all(t.reconciled for t in trajectory.totals)
    return 0 if clean else 1
