"""The gateway starts and meters requests on a machine with no network at all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import PROJECT_ROOT

SCRIPT = r"""
import asyncio, json, sys
import httpx
from gateway.app import Gateway, create_app
from gateway.defaults import DEFAULT_CONFIG
from gateway.config import parse_settings

config = dict(DEFAULT_CONFIG)
config["tokenizers"] = {"dir": sys.argv[1]}
config["ledger"] = {"url": "sqlite+aiosqlite:///" + sys.argv[2], "url_env": None}
settings = parse_settings(config)

async def main():
    gateway = Gateway(settings)
    key = gateway.ensure_demo_key()
    app = create_app(settings, gateway=gateway)
    async with app.lifespan():  # starts providers, ledger and quotas, then closes them
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            response = await http.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "gpt-4o-mini", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "Hello!"}]},
            )
    print(json.dumps({"status": response.status_code, "usage": response.json().get("usage"),
                      "warnings": gateway.counter.warnings}))

asyncio.run(main())
"""


def _network_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _network_namespaces(), reason="needs `unshare -rn`")
def test_gateway_starts_and_counts_with_networking_disabled(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            "unshare",
            "-rn",
            sys.executable,
            "-c",
            SCRIPT,
            str(tokenizer_dir),
            str(tmp_path / "x.db"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 200
    # "Hello!" as one user message is 9 prompt tokens in OpenAI's chat format.
    assert outcome["usage"]["prompt_tokens"] == 9
    assert outcome["usage"]["completion_tokens"] >= 1
    assert outcome["warnings"] == []
