"""The README's first run, verbatim: `maas-gateway serve` on its embedded defaults prints
the line that exports the demo key, the key works with both SDKs' APIs, and the billing
commands print nothing on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anthropic
import openai

from tests.harness import PROJECT_ROOT, free_port, stop_process, wait_for_http


def test_banner_exports_the_demo_key_and_commands_are_quiet(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    cli = [sys.executable, "-m", "gateway.cli"]
    process = subprocess.Popen(
        [*cli, "serve", "--port", str(port)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        exported = ""
        for line in process.stdout:
            if line.strip().startswith("export MAAS_DEMO_KEY="):
                exported = line.strip().removeprefix("export MAAS_DEMO_KEY=")
                break
        assert exported.startswith("sk-")
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/healthz", process=process)
        reply = openai.OpenAI(base_url=url + "/v1", api_key=exported).responses.create(
            model="sim-small", input="Hello!", max_output_tokens=16
        )
        assert reply.usage is not None and reply.usage.output_tokens > 0
        message = anthropic.Anthropic(base_url=url, api_key=exported).messages.create(
            model="sim-small", max_tokens=5, messages=[{"role": "user", "content": "Hello!"}]
        )
        assert message.usage.output_tokens > 0
    finally:
        stop_process(process)
    for command in (
        ["invoice", "--tenant", "demo", "--month", "2026-11"],
        ["reconcile", "--month", "2026-11"],
    ):
        done = subprocess.run(
            [*cli, *command],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout and done.stderr == ""
