"""Take the README's console screenshots (docs/images/console-*.png) in a real Chromium.

Starts `maas-gateway serve` on the embedded default plus a prepaid second tenant, with a
month of synthetic usage written to its ledger first and a few real requests, then signs in
as the demo users and photographs the main pages. Needs Debian's `chromium` and the
`playwright` package (the test extras); nothing is downloaded.

    python scripts/console_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from bench.console_bench import fill, migrate, settings_for  # noqa: E402
from gateway.config import deep_merge  # noqa: E402
from gateway.defaults import DEFAULT_CONFIG  # noqa: E402

PASSWORD = "screenshot-password"
ADMIN_KEY = "sk-admin-screenshots-000000000000"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "images")
    parser.add_argument("--port", type=int, default=18777)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="console-shots-") as tmp:
        db = Path(tmp) / "ledger.db"
        asyncio.run(migrate(settings_for(db)))
        fill(db, 40_000, datetime.now(UTC), whole_month=False)
        config = deep_merge(
            DEFAULT_CONFIG,
            {
                "ledger": {"url": f"sqlite+aiosqlite:///{db}", "url_env": None},
                "console": {
                    "grafana_url": "http://127.0.0.1:3000",
                    "seller": {
                        "name": "Example Cloud Ltd",
                        "address": ["1 Compute Way", "London EC1A 1AA"],
                        "tax_id": "GB123456789",
                    },
                },
            },
        )
        config["tenants"] = [
            {**config["tenants"][0], "limits": {"rpm": 600, "tpm": 200000, **{
                "tokens_per_month": 200_000_000, "tokens_per_day": 10_000_000}}},
            {"id": "globex", "name": "Globex", "balance": "250", "tax_rate": "0.2"},
        ]  # fmt: skip
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "MAAS_DEMO_CONSOLE_PASSWORD": PASSWORD, "MAAS_ADMIN_KEY": ADMIN_KEY}
        url = f"http://127.0.0.1:{args.port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
             "--port", str(args.port)],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait(url)
            keys = httpx.post(
                url + "/admin/tenants/demo/keys",
                json={"name": "production"},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            ).json()
            for _ in range(5):
                httpx.post(
                    url + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {keys['key']}"},
                    json={"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=30,
                )
            args.out.mkdir(parents=True, exist_ok=True)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 860})
                _sign_in(page, url, "demo")
                _shot(page, args.out / "console-overview.png", full=True)
                page.goto(url + "/console/tenants/demo/keys")
                page.fill("input[name=name]", "staging")
                page.check("input[name='model:sim-small']")
                page.fill("input[name=expires]", f"{datetime.now(UTC).year + 1}-06-30")
                page.click("text=Create key")
                _shot(page, args.out / "console-keys.png")
                month = datetime.now(UTC).strftime("%Y-%m")
                page.goto(url + f"/console/tenants/demo/invoices/{month}")
                page.frame_locator("iframe.invoice").locator("#invoice-total").wait_for()
                _shot(page, args.out / "console-invoice.png")
                page.click("text=Sign out")
                _sign_in(page, url, "operator")
                page.goto(url + "/console/finance/")
                _shot(page, args.out / "console-finance.png", full=True)
                page.goto(url + "/console/ops/")
                _shot(page, args.out / "console-ops.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(15)
    for png in sorted(args.out.glob("console-*.png")):
        print(f"{png.relative_to(PROJECT_ROOT)}: {png.stat().st_size // 1024} KiB")
    return 0


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the gateway did not start")


def _sign_in(page: Any, url: str, username: str) -> None:
    page.goto(url + "/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _shot(page: Any, path: Path, full: bool = False) -> None:
    """A screenshot, kept small: 256 colours are plenty for these flat pages."""
    from PIL import Image

    page.screenshot(path=str(path), full_page=full)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


if __name__ == "__main__":
    raise SystemExit(main())
