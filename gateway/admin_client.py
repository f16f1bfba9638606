"""The command line's side of the admin API (`maas-gateway keys ...`, `users ...`): the
`--url` and `--admin-key-env` options, and an HTTP client that sends the admin key."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


def add_admin_api_options(parser: argparse.ArgumentParser) -> None:
    """Add `--url` (the gateway) and `--admin-key-env` (where the admin key is)."""
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="gateway base URL")
    parser.add_argument(
        "--admin-key-env",
        default="MAAS_ADMIN_KEY",
        help="environment variable holding the admin key (default MAAS_ADMIN_KEY)",
    )


def admin_client(args: argparse.Namespace, timeout: float) -> httpx.Client | None:
    """A client of the gateway at `args.url` with the admin key; None (after saying which
    variable to set) when the key's environment variable is unset."""
    import httpx

    admin_key = os.environ.get(args.admin_key_env)
    if not admin_key:
        print(f"maas-gateway: set {args.admin_key_env} to the admin key", file=sys.stderr)
        return None
    headers = {"authorization": f"Bearer {admin_key}"}
    return httpx.Client(base_url=args.url, headers=headers, timeout=timeout)
