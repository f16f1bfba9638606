"""`maas-gateway users ...`: console users over the admin API; the demo users' banner."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gateway.admin_client import add_admin_api_options, admin_client
from gateway.config import Settings


def announce_demo_users(settings: Settings, host: str, port: int) -> None:
    """With `console.demo_password_env` set (the embedded default), choose the demo users'
    password (from that variable, else a fresh one put there for the server) and print it."""
    from gateway.console.routes import DEMO_OPERATOR_USER, DEMO_TENANT_USER
    from gateway.console.users import generate_password

    env = settings.console.demo_password_env
    if not settings.console.enabled or env is None or not settings.tenants:
        return
    password = os.environ.get(env) or generate_password()
    os.environ[env] = password
    url = f"http://{host}:{port}/console/"
    print(
        f"console: {url}  user {DEMO_TENANT_USER} (tenant {settings.tenants[0].id}, owner)"
        f" and {DEMO_OPERATOR_USER} (operator admin), password: {password}",
        flush=True,
    )


def add_commands(commands: Any) -> None:
    """Add `users create|list|delete` to the CLI's subcommands."""
    users = commands.add_parser(
        "users",
        help="web console users: create, list or delete them through the admin API",
        description="Manage the web console's users through the admin API. A tenant's user "
        "(--tenant) has role owner, member or finance; an operator user (no --tenant) has "
        "role admin or finance.",
    )
    sub_commands = users.add_subparsers(title="user commands", metavar="USERCMD")
    for name, helptext in (
        ("create", "create a console user (a generated password is printed once)"),
        ("list", "list the console users"),
        ("delete", "delete a console user and end their sessions"),
    ):
        sub = sub_commands.add_parser(name, help=helptext, description=helptext)
        add_admin_api_options(sub)
        if name in ("create", "delete"):
            sub.add_argument("username", help="the user's sign-in name")
        if name == "create":
            sub.add_argument(
                "--role",
                required=True,
                help="a tenant user: owner, member or finance; an operator user: admin or finance",
            )
            sub.add_argument("--tenant", help="the user's tenant (omit for an operator user)")
            sub.add_argument(
                "--password-env",
                help="environment variable holding the password (default: generate one)",
            )
        sub.set_defaults(run=_users, action=name)


def _users(args: argparse.Namespace) -> int:
    client = admin_client(args, timeout=30)
    if client is None:
        return 2
    with client:
        if args.action == "create":
            body: dict[str, object] = {"username": args.username, "role": args.role}
            if args.tenant:
                body["tenant_id"] = args.tenant
            if args.password_env:
                password = os.environ.get(args.password_env)
                if not password:
                    print(f"maas-gateway: {args.password_env} is not set", file=sys.stderr)
                    return 2
                body["password"] = password
            response = client.post("/admin/console-users", json=body)
        elif args.action == "list":
            response = client.get("/admin/console-users")
        else:
            response = client.delete(f"/admin/console-users/{args.username}")
    print(response.text)
    return 0 if response.is_success else 1
