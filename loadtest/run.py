"""Run a load-test scenario end to end and reconcile the ledger with what clients received.

    python -m loadtest.run SCENARIO [--users N] [--duration 60s] [--report-dir reports]

Starts the scenario's simulators (`maas-gateway simulate`) and a gateway (`maas-gateway
serve`, SQLite ledger in the run's report directory) on free loopback ports, runs locust
headless as a subprocess (CSV and HTML reports), stops the gateway with SIGTERM (which
flushes the ledger), then compares the ledger with the clients' records
(`loadtest.reconcile`) and the scenario's expectations. Exits 0 when everything agrees, 1
on any difference, 2 on a usage or start-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import yaml

from loadtest.scenario import (
    Phase,
    Scenario,
    app_profiles,
    available,
    gateway_config,
    issue_keys,
    load_scenario,
    parse_duration,
    simulator_config,
)
from loadtest.workload import Plan, read_records

if TYPE_CHECKING:
    from loadtest.reconcile import Reconciliation

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
ADMIN_KEY_ENV = "MAAS_LOADTEST_ADMIN_KEY"
STOP_GRACE_S = 5
METRIC_TYPES = ("POST", "STREAM", "TTFT", "ITL", "TOKENS/S", "QUOTA")


class RunError(Exception):
    """The run could not be carried out (a process did not start, locust crashed...)."""


@dataclass(slots=True)
class RunOptions:
    scenario: Scenario
    users: int
    spawn_rate: float
    duration_s: float
    run_dir: Path
    time_scale: float | None
    tokenizer_dir: Path | None
    seed: int | None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name in available():
            print(f"{name:<10} {load_scenario(name).description}")
        return 0
    if not args.scenario:
        parser.error("name a scenario (or --list)")
    try:
        scenario = load_scenario(args.scenario)
        duration = parse_duration(args.duration or scenario.duration)
    except ValueError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    options = RunOptions(
        scenario=scenario,
        users=args.users or scenario.users,
        spawn_rate=args.spawn_rate or scenario.spawn_rate,
        duration_s=duration,
        run_dir=Path(args.report_dir).resolve() / scenario.name,
        time_scale=args.time_scale,
        tokenizer_dir=Path(args.tokenizer_dir).resolve() if args.tokenizer_dir else None,
        seed=args.seed if args.seed is not None else scenario.seed,
    )
    try:
        return run(options)
    except RunError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description="Run a load-test scenario against simulated backends and reconcile the "
        "gateway's ledger with what the clients received.",
    )
    parser.add_argument("scenario", nargs="?", help="scenario name or YAML path")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--users", type=int, help="locust users (default: the scenario's)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second")
    parser.add_argument("--duration", help="run time, e.g. 15s, 2m (default: the scenario's)")
    parser.add_argument(
        "--report-dir",
        default="reports",
        help="reports go to REPORT_DIR/SCENARIO/ (default: reports)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        help="multiply every simulated delay by this (0.2 = five times faster backends)",
    )
    parser.add_argument("--seed", type=int, help="seed for the users' draws")
    parser.add_argument(
        "--tokenizer-dir",
        default=os.environ.get("MAAS_TOKENIZER_DIR"),
        help="directory of <encoding>.tiktoken files (default: $MAAS_TOKENIZER_DIR)",
    )
    return parser


def run(options: RunOptions) -> int:
    """Carry out one run; returns the process exit code (see the module docstring)."""
    scenario, run_dir = options.scenario, options.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_run(run_dir)
    ledger_path = run_dir / "ledger.db"
    records_path = run_dir / "records.jsonl"
    keys = issue_keys(scenario)
    plan = Plan(
        scenario=scenario.name,
        records_path=str(records_path),
        apps=app_profiles(scenario, keys),
        seed=options.seed,
    )
    plan.write(run_dir / "plan.json")
    records_path.touch()
    print(f"scenario {scenario.name}: {scenario.description.strip()}", flush=True)
    print(
        f"{options.users} users, {options.duration_s:g}s, reports in {run_dir}",
        flush=True,
    )

    clock = time.monotonic()
    with contextlib.ExitStack() as stack:
        simulators = {
            spec.name: stack.enter_context(
                Simulator(spec.name, spec.phases[0].models, run_dir, options.time_scale)
            )
            for spec in scenario.simulators
        }
        config = gateway_config(
            scenario,
            simulator_urls={name: sim.url for name, sim in simulators.items()},
            keys=keys,
            ledger_path=ledger_path,
            admin_key_env=ADMIN_KEY_ENV,
            tokenizer_dir=options.tokenizer_dir,
        )
        gateway = stack.enter_context(GatewayProcess(config, run_dir))
        # The reconciliation's imports (SQLAlchemy...) take a while: load them while the
        # processes start rather than before.
        importlib.import_module("loadtest.reconcile")
        for simulator in simulators.values():  # all started at once; now wait for each
            simulator.wait_ready()
        gateway.wait_ready()
        _progress(clock, f"gateway ready at {gateway.url}; starting locust")
        locust_code = run_locust(options, gateway.url, run_dir, simulators, plan, clock)
        _progress(clock, f"locust finished ({locust_code}); stopping the gateway")
        gateway_code = gateway.stop()
        _progress(clock, "gateway stopped; reconciling")
    return finish(options, locust_code, gateway_code, ledger_path, records_path)


def finish(
    options: RunOptions, locust_code: int, gateway_code: int, ledger_path: Path, records: Path
) -> int:
    """Reconcile, check expectations and the reports, print the verdict."""
    from billing.ledger import LedgerConfig
    from loadtest.reconcile import compare, count_journal_segments, read_ledger, write_report

    run_dir = options.run_dir
    problems: list[str] = []
    if locust_code != 0:
        problems.append(f"locust exited with {locust_code} (see {run_dir / 'locust.log'})")
    if gateway_code not in (0, -signal.SIGTERM):
        problems.append(f"the gateway exited with {gateway_code} (see gateway.log)")
    journal_dir = ledger_path.with_name(ledger_path.stem + ".journal")
    unflushed = count_journal_segments(journal_dir)
    if unflushed:
        problems.append(f"the gateway left {unflushed} journal segments unflushed at shutdown")
    entries, rollups = asyncio.run(
        read_ledger(LedgerConfig(url=f"sqlite+aiosqlite:///{ledger_path}", url_env=None))
    )
    client_records = read_records(records)
    report = compare(client_records, entries, rollups)
    report.unflushed_journal = unflushed
    write_report(report, run_dir)
    problems.extend(check_expectations(options.scenario, report))
    for name in ("locust_stats.csv", "locust_failures.csv", "report.html"):
        if not (run_dir / name).exists():
            problems.append(f"locust did not write {name}")
    crashes = count_csv_rows(run_dir / "locust_exceptions.csv")
    if crashes:
        problems.append(
            f"{crashes} kinds of exceptions in the locust users (locust_exceptions.csv)"
        )
    reported = count_reported_requests(run_dir / "locust_stats.csv")
    if reported is not None and reported != len(client_records):
        problems.append(
            f"locust's stats count {reported} requests, the client records {len(client_records)}"
        )
    print()
    print_metrics(run_dir / "locust_stats.csv")
    print()
    print(report.render())
    for problem in problems:
        print(f"PROBLEM: {problem}")
    ok = report.ok and not problems
    print(f"\n{'PASS' if ok else 'FAIL'}: scenario {options.scenario.name}", flush=True)
    return 0 if ok else 1


def check_expectations(scenario: Scenario, report: Reconciliation) -> list[str]:
    """The scenario's `expect` bounds (at least one successful answer is always expected)."""
    problems = []
    minimums = {"ok": 1, **scenario.expect.min}
    for name, bound in minimums.items():
        if report.count(name) < bound:
            problems.append(f"expected at least {bound} {name}, got {report.count(name)}")
    for name, bound in scenario.expect.max.items():
        if report.count(name) > bound:
            problems.append(f"expected at most {bound} {name}, got {report.count(name)}")
    return problems


def print_metrics(stats_csv: Path) -> None:
    """The streaming and quota metrics from locust's stats CSV, one line each."""
    if not stats_csv.exists():
        return
    print(f"{'metric':<9} {'name':<36} {'count':>6} {'median':>8} {'p95':>8} {'max':>8}")
    with stats_csv.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            kind = row.get("Type", "")
            if kind not in METRIC_TYPES:
                continue
            median, p95, top = (
                _number(row[name]) for name in ("Median Response Time", "95%", "Max Response Time")
            )
            print(
                f"{kind:<9} {row['Name'][:36]:<36} {row['Request Count']:>6} "
                f"{median:>8} {p95:>8} {top:>8}"
            )


def count_reported_requests(stats_csv: Path) -> int | None:
    """Requests in locust's stats: the POST, STREAM and QUOTA entries (None without a file)."""
    if not stats_csv.exists():
        return None
    with stats_csv.open(newline="", encoding="utf-8") as handle:
        return sum(
            int(row["Request Count"])
            for row in csv.DictReader(handle)
            if row.get("Type") in ("POST", "STREAM", "QUOTA")
        )


def count_csv_rows(path: Path) -> int:
    """Data rows of a CSV file (0 when it is missing)."""
    if not path.exists():
        return 0
    with path.open(newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def _number(text: str) -> str:
    try:
        return f"{float(text):.1f}"
    except ValueError:
        return text


def run_locust(
    options: RunOptions,
    host: str,
    run_dir: Path,
    simulators: dict[str, Simulator],
    plan: Plan,
    clock: float,
) -> int:
    """Run locust headless to the end, switching simulator phases on schedule."""
    # Let every user finish its request (each is bounded by its app's timeout), so that no
    # answer is cut short by the end of the run.
    stop_timeout_s = max(app.timeout_s for app in plan.apps) + STOP_GRACE_S
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(options.users),
        "--spawn-rate",
        f"{options.spawn_rate:g}",
        "--run-time",
        f"{options.duration_s:g}s",
        "--stop-timeout",
        f"{stop_timeout_s:g}",
        "--csv",
        str(run_dir / "locust"),
        "--html",
        str(run_dir / "report.html"),
        "--plan",
        str(run_dir / "plan.json"),
        "--exit-code-on-error",
        "0",
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    switches = sorted(
        (phase.at * options.duration_s, spec.name, phase.models)
        for spec in options.scenario.simulators
        for phase in spec.phases[1:]
    )
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    deadline_s = options.duration_s + stop_timeout_s + 60
    with (run_dir / "locust.log").open("wb") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        started = time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - started
                while switches and switches[0][0] <= elapsed:
                    _, name, models = switches.pop(0)
                    _progress(clock, f"simulator {name} enters its next phase")
                    simulators[name].restart(models)
                wait = (switches[0][0] - elapsed) if switches else deadline_s - elapsed
                try:
                    return process.wait(max(0.05, min(wait, deadline_s - elapsed)))
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started >= deadline_s:
                        raise RunError(f"locust did not finish within {deadline_s:g}s") from None
        finally:
            stop_process(process, timeout=10)


class Simulator:
    """`maas-gateway simulate` on a free port; `restart` swaps its configuration."""

    def __init__(
        self, name: str, models: dict[str, Any], run_dir: Path, time_scale: float | None
    ) -> None:
        self.name = name
        self.run_dir = run_dir
        self.time_scale = time_scale
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.phase = 0
        self._models = models
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Simulator:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt()

    def wait_ready(self) -> None:
        assert self._process is not None
        wait_for_http(self.url + "/health", self._process, f"simulator {self.name}")

    def restart(self, models: dict[str, Any]) -> None:
        """Stop the simulator and start it again on the same port with `models`."""
        self._halt()
        self.phase += 1
        self._models = models
        self._start()
        self.wait_ready()

    def _start(self) -> None:
        path = self.run_dir / f"simulator-{self.name}-{self.phase}.yaml"
        config = simulator_config(Phase(models=self._models), self.time_scale)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self._log = (self.run_dir / f"simulator-{self.name}.log").open("ab")
        self._process = subprocess.Popen(
            _maas("simulate", "--config", str(path), "--port", str(self.port)),
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "PYTHONPATH": _pythonpath(),
                "MAAS_LOG_LEVEL": os.environ.get("MAAS_LOG_LEVEL", "WARNING"),
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _halt(self) -> None:
        if self._process is not None:
            stop_process(self._process, timeout=10)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class GatewayProcess:
    """`maas-gateway serve` with the run's configuration on a free port."""

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        self.config_path = run_dir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.log_path = run_dir / "gateway.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> GatewayProcess:
        self._log = self.log_path.open("wb")
        env = {
            **os.environ,
            "PYTHONPATH": _pythonpath(),
            "MAAS_LOG_LEVEL": os.environ.get("MAAS_LOG_LEVEL", "WARNING"),
            ADMIN_KEY_ENV: "sk-admin-" + secrets.token_urlsafe(18),
        }
        self._process = subprocess.Popen(
            _maas("serve", "--config", str(self.config_path), "--port", str(self.port)),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self) -> None:
        assert self._process is not None
        wait_for_http(self.url + "/readyz", self._process, "the gateway", timeout=60)

    def stop(self) -> int:
        """SIGTERM (a graceful stop flushes the ledger) and the exit code."""
        if self._process is not None:
            self.exit_code = stop_process(self._process, timeout=45)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_code if self.exit_code is not None else 0

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _progress(clock: float, message: str) -> None:
    print(f"[{time.monotonic() - clock:6.1f}s] {message}", flush=True)


def _maas(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return str(PROJECT_ROOT) + (os.pathsep + existing if existing else "")


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    """Stop a server process the way an operator would: SIGTERM, then SIGKILL after
    `timeout`; the exit code (negative when killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunError(f"{what} exited with {process.returncode} before answering {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RunError(f"{what} did not answer {url} within {timeout:g}s")


def _remove_previous_run(run_dir: Path) -> None:
    """Delete what an earlier run of this scenario left in its report directory."""
    for pattern in ("ledger.db*", "records.jsonl", "locust*.csv", "simulator-*", "*.log"):
        for path in run_dir.glob(pattern):
            path.unlink()
    shutil.rmtree(run_dir / "ledger.journal", ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
