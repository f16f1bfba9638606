"""The `maas-gateway` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from litestar import Litestar

EPILOG = "Configuration reference: see the README's 'Configuration' section."
CONFIG_ENV = "MAAS_CONFIG"
#: How every serving process runs uvicorn.
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "access_log": False,
    "log_level": "warning",
    "timeout_graceful_shutdown": 30,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    _configure_logging()
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"maas-gateway: {exc}", file=sys.stderr)
        return 2


def _configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MAAS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for chatty in ("alembic", "httpx", "httpcore"):  # migrations run, requests sent
            logging.getLogger(chatty).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maas-gateway",
        description="A token-metered, OpenAI-compatible Model-as-a-Service gateway and simulator.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. With no --config it runs the embedded default: "
        "simulated models, SQLite ledger, in-process quotas and a demo tenant whose API key "
        "is printed at start-up, with the web console at /console/ and its demo users' "
        "password printed too. Several workers share one socket; they need "
        "quotas.backend: redis, and their metrics are summed in PROMETHEUS_MULTIPROC_DIR "
        "(a fresh temporary directory unless set). The metrics are served only on their own "
        "listener, metrics.host:metrics.port (127.0.0.1:9464 by default), never on --port.",
    )
    _config_arg(serve)
    serve.add_argument("--host", help="address to listen on (default: from config, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: from config, 8080)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1; more than one needs quotas.backend: redis)",
    )
    serve.set_defaults(run=_serve)

    simulate = commands.add_parser(
        "simulate",
        help="run the simulated model backend as its own OpenAI-compatible server",
        description="Serve simulated models over HTTP (the OpenAI API plus vLLM-style "
        "/metrics), to stand in for a GPU inference server in load tests.",
    )
    simulate.add_argument("--config", type=Path, help="simulator YAML: model name -> settings")
    simulate.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    simulate.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    simulate.set_defaults(run=_simulate)

    keys = commands.add_parser("keys", help="API keys: mint offline or manage over the admin API")
    key_commands = keys.add_subparsers(title="key commands", metavar="KEYCMD")
    new = key_commands.add_parser(
        "new",
        help="mint a key offline and print the stanza to put in the config file",
        description="Print a new random API key once, with the hash to store in the "
        "configuration file under tenants[].keys.",
    )
    new.add_argument("--id", default=None, help="key id (default: random)")
    new.set_defaults(run=_keys_new)
    for name, helptext in (
        ("create", "create a key for a tenant through the admin API (printed once)"),
        ("list", "list a tenant's keys through the admin API"),
        ("revoke", "revoke a key through the admin API"),
    ):
        sub = key_commands.add_parser(name, help=helptext, description=helptext)
        sub.add_argument("--url", default="http://127.0.0.1:8080", help="gateway base URL")
        sub.add_argument(
            "--admin-key-env",
            default="MAAS_ADMIN_KEY",
            help="environment variable holding the admin key (default MAAS_ADMIN_KEY)",
        )
        if name == "revoke":
            sub.add_argument("key_id", help="the key id to revoke")
        else:
            sub.add_argument("--tenant", required=True, help="tenant id")
        if name == "create":
            sub.add_argument("--name", default="", help="a label for the key")
            sub.add_argument("--models", help="comma-separated model allowlist")
            sub.add_argument("--expires-at", help="expiry, ISO 8601 (e.g. 2027-01-01T00:00:00Z)")
        sub.set_defaults(run=_keys_admin, action=name)

    invoice = commands.add_parser(
        "invoice",
        help="print a tenant's monthly invoice",
        description="Build a tenant's invoice for a month from the ledger and print it.",
    )
    _config_arg(invoice)
    invoice.add_argument("--tenant", required=True, help="tenant id")
    invoice.add_argument("--month", required=True, help="month, e.g. 2026-11")
    invoice.add_argument("--format", choices=["json", "csv", "html"], default="json")
    invoice.add_argument("--finalize", action="store_true", help="finalise the invoice")
    invoice.set_defaults(run=_invoice)

    rec = commands.add_parser(
        "reconcile",
        help="compare invoices, ledger sums and rollups for a month",
        description="Reconcile a month: invoice totals vs ledger sums vs rollups, per tenant. "
        "Exits 1 when any difference is found.",
    )
    _config_arg(rec)
    rec.add_argument("--month", required=True, help="month, e.g. 2026-11")
    rec.set_defaults(run=_reconcile)

    from economics.cli import add_commands
    from gateway.console.cli import add_commands as add_console_commands

    add_commands(commands)
    add_console_commands(commands)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("MAAS_CONFIG"),
        help="configuration YAML (default: $MAAS_CONFIG, else the embedded default)",
    )


def settings_from(path: Path | None) -> Settings:
    if path is None:
        from gateway.defaults import default_settings

        return default_settings()
    return load_settings(path)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import Gateway, create_app

    settings = settings_from(args.config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {args.workers}")
    if args.workers > 1:
        return _serve_workers(args.config, settings, host, port, args.workers)
    gateway = Gateway(settings, freeze_heap=True, metrics_listener=True)
    _print_banner(settings, host, port, gateway.ensure_demo_key())
    app = create_app(settings, gateway=gateway)
    uvicorn.run(app, host=host, port=port, **_uvicorn_options(settings))
    return 0


def _uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How this process runs uvicorn, with the request limits of `server.http`."""
    from gateway.http_limits import configure

    return {**UVICORN_OPTIONS, **configure(settings.server.http)}


def _print_banner(settings: Settings, host: str, port: int, demo_key: str | None) -> None:
    if not os.environ.get(settings.server.admin_key_env):
        print(f"admin API disabled: set {settings.server.admin_key_env} to enable it", flush=True)
    if demo_key:
        print(f"demo tenant API key: {demo_key}", flush=True)
        if settings.demo_key_env:
            print("for the README's examples, in another shell:", flush=True)
            print(f"  export {settings.demo_key_env}={demo_key}", flush=True)
    print(f"OpenAI base_url: http://{host}:{port}/v1", flush=True)
    print(f"Anthropic base_url: http://{host}:{port}", flush=True)
    from gateway.console.cli import announce_demo_users

    announce_demo_users(settings, host, port)
    metrics = settings.metrics
    if metrics.port:
        print(f"metrics (scrape only): http://{metrics.host}:{metrics.port}/metrics", flush=True)


def _serve_workers(
    config: Path | None, settings: Settings, host: str, port: int, workers: int
) -> int:
    """Run `workers` gateway processes on one socket under uvicorn's supervisor.

    Each worker builds its own gateway from the environment prepared here (`worker_app`):
    the configuration file, the demo key (so every worker accepts the one printed) and the
    Prometheus multiprocess directory, in which each worker's metrics are summed once.
    """
    import shutil
    import tempfile

    import uvicorn

    from gateway.auth import generate_key
    from gateway.metrics import MULTIPROC_ENV, reset_multiprocess_dir

    if settings.quotas.backend != "redis":
        raise ConfigError(
            f"--workers {workers} needs quotas.backend: redis (it is"
            f" {settings.quotas.backend!r}): an in-process quota store is per process, so"
            " each worker would enforce the limits, budgets and balances on its own."
            " Configure Redis, or run one worker."
        )
    given = os.environ.get(MULTIPROC_ENV)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="maas-metrics-"))
    reset_multiprocess_dir(directory)
    os.environ[MULTIPROC_ENV] = str(directory)
    if config is not None:
        os.environ[CONFIG_ENV] = str(config.resolve())
    else:
        os.environ.pop(CONFIG_ENV, None)  # the workers run the embedded default too
    demo_key = None
    if settings.demo_key_env and settings.tenants:
        demo_key = os.environ.get(settings.demo_key_env) or generate_key()
        os.environ[settings.demo_key_env] = demo_key
    _print_banner(settings, host, port, demo_key)
    print(f"{workers} workers; metrics summed in {MULTIPROC_ENV}={directory}", flush=True)
    metrics_port = _reserve_metrics_port(settings)
    server_config = uvicorn.Config(
        "gateway.cli:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        **_uvicorn_options(settings),
    )
    sock = server_config.bind_socket()
    try:
        _supervisor(server_config, sock, directory).run()
    finally:
        sock.close()
        if metrics_port is not None:
            metrics_port.close()
        if not given:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _reserve_metrics_port(settings: Settings) -> socket.socket | None:
    """With several workers, each serves the metrics on one shared port (`SO_REUSEPORT`):
    bind it here first (choosing it when configured as 0) and tell the workers which."""
    from gateway.metrics_server import METRICS_PORT_ENV

    config = settings.metrics
    if config.port is None:
        return None
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((config.host, config.port))
    os.environ[METRICS_PORT_ENV] = str(reserved.getsockname()[1])
    return reserved


def _supervisor(config: Any, sock: Any, directory: Path) -> Any:
    """uvicorn's worker supervisor (it restarts a worker that dies), marking every worker
    that has exited dead in the multiprocess directory: its live gauges (requests in
    flight, ledger backlog, backend load) leave the sums; its counters stay in them.
    It overrides the supervisor's hooks (not a public API): uvicorn is pinned in
    pyproject.toml and tests/test_pinned_internals.py checks them."""
    from uvicorn.supervisors import Multiprocess

    from gateway.metrics import mark_process_dead

    class Supervisor(Multiprocess):
        def __init__(self, config: Any, sockets: list[Any]) -> None:
            super().__init__(config, sockets)
            self.known: set[int] = set()

        def init_processes(self) -> None:
            super().init_processes()
            self._mark_exited()

        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            self._mark_exited()

        def handle_signals(self) -> None:  # SIGHUP restarts workers, SIGTTOU retires one
            super().handle_signals()
            self._mark_exited()

        def join_all(self) -> None:
            super().join_all()
            for pid in self.known:
                mark_process_dead(pid, directory)
            self.known = set()

        def _mark_exited(self) -> None:
            alive = {p.pid for p in self.processes if p.pid is not None}
            for pid in self.known - alive:
                mark_process_dead(pid, directory)
            self.known = alive

    return Supervisor(config, sockets=[sock])


def worker_app() -> Litestar:
    """One worker of `serve --workers N` (a uvicorn app factory, run in a fresh process)."""
    from gateway.app import Gateway, create_app

    _configure_logging()
    path = os.environ.get(CONFIG_ENV)
    settings = settings_from(Path(path) if path else None)
    gateway = Gateway(settings, freeze_heap=True, metrics_listener=True)
    gateway.ensure_demo_key()
    _uvicorn_options(settings)  # the request limits, for this worker's connections
    return create_app(settings, gateway=gateway)


def _simulate(args: argparse.Namespace) -> int:
    from gateway.tokens import TokenCounter
    from providers.simulate_server import load_simulator_config, run_simulator
    from providers.simulated import SimulatedConfig, SimulatedProvider

    configs = (
        load_simulator_config(args.config)
        if args.config
        else {"sim-small": SimulatedConfig(), "sim-large": SimulatedConfig(itl_ms=25)}
    )
    counter = TokenCounter()
    providers = {
        name: SimulatedProvider(name, config, counter.encoding(name))
        for name, config in configs.items()
    }
    print(f"simulated models {sorted(providers)} at http://{args.host}:{args.port}/v1", flush=True)
    run_simulator(args.host, args.port, providers)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from gateway.auth import generate_key, hash_key

    secret = generate_key()
    key_id = args.id or "key_" + secrets.token_hex(8)
    print(f"API key (shown once): {secret}")
    print("config stanza (tenants[].keys):")
    print(f"  - id: {key_id}\n    hash: {hash_key(secret)}")
    return 0


def _keys_admin(args: argparse.Namespace) -> int:
    import httpx

    admin_key = os.environ.get(args.admin_key_env)
    if not admin_key:
        print(f"maas-gateway: set {args.admin_key_env} to the admin key", file=sys.stderr)
        return 2
    headers = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=args.url, headers=headers, timeout=10) as client:
        if args.action == "create":
            body: dict[str, object] = {"name": args.name}
            if args.models:
                body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
            if args.expires_at:
                body["expires_at"] = args.expires_at
            response = client.post(f"/admin/tenants/{args.tenant}/keys", json=body)
        elif args.action == "list":
            response = client.get(f"/admin/tenants/{args.tenant}/keys")
        else:
            response = client.post(f"/admin/keys/{args.key_id}/revoke")
    print(response.text)
    return 0 if response.is_success else 1


def _invoice(args: argparse.Namespace) -> int:
    return asyncio.run(_invoice_async(args))


async def _invoice_async(args: argparse.Namespace) -> int:
    from billing.invoice import build_invoice, finalize_invoice
    from billing.invoice_render import render_invoice
    from billing.ledger import Ledger
    from gateway.admin import tenant_billing
    from gateway.state import build_directory

    settings = settings_from(args.config)
    tenant = build_directory(settings).tenants.get(args.tenant)
    if tenant is None:
        print(f"maas-gateway: no tenant {args.tenant!r} in the configuration", file=sys.stderr)
        return 2
    ledger = await Ledger.open(settings.ledger)
    try:
        make = finalize_invoice if args.finalize else build_invoice
        document = await make(ledger, tenant_billing(tenant), args.month)
        sys.stdout.write(render_invoice(document, args.format))
    finally:
        await ledger.aclose()
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    return asyncio.run(_reconcile_async(args))


async def _reconcile_async(args: argparse.Namespace) -> int:
    from billing.ledger import Ledger
    from billing.reconcile import reconcile
    from gateway.admin import tenant_billing
    from gateway.state import build_directory

    settings = settings_from(args.config)
    tenants = [tenant_billing(t) for t in build_directory(settings).tenants.values()]
    ledger = await Ledger.open(settings.ledger)
    try:
        report = await reconcile(ledger, tenants, args.month)
    finally:
        await ledger.aclose()
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
