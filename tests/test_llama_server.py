"""A real inference server behind the gateway: llama.cpp's OpenAI server (llama-cpp-python).

The test writes a tiny random-weight llama model (`tests/tiny_llama.py`), serves it with
`python -m llama_cpp.server`, and puts a `maas-gateway serve` process in front of it; every
call goes through the official openai SDK over real sockets. llama.cpp reports usage in its
JSON answers but not in streams (it ignores `stream_options.include_usage`), so a streamed
request is counted by the gateway with the tokenizer configured for the model. Configured
with the model's own tokenizer (the generated tokenizer.json and the GGUF's chat template),
the same request is billed exactly the same streamed and unstreamed.

Exactness is a property of correct counting, not luck, because of the vocabulary the model is
written with (see `tests/tiny_llama.py`): single printable characters and no merges, so the
delivered text re-tokenizes to exactly the generated tokens; no byte that could be invalid
UTF-8; control tokens that greedy decoding never emits, except the end-of-sequence token,
which llama.cpp does not count. The prompt count is right only if the gateway counts the
template's control tokens, the role and content text, and the BOS as llama.cpp does.

The server not starting is a failure, never a skip: `pip install -e '.[test]'` installs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import tokenizers
from openai import OpenAI

from tests.harness import (
    ACME_KEY,
    base_config,
    free_port,
    gateway_process,
    stop_process,
    wait_for_http,
)
from tests.tiny_llama import BOS, CHAT_TEMPLATE, CHAT_TEMPLATE_CONFIG, write_tiny_llama

pytestmark = pytest.mark.timeout(240)

MODEL = "tiny-llama"  # counted with the model's own tokenizer.json and template
DEEPSEEK_MODEL = "tiny-llama-as-deepseek"  # the same upstream, counted as a DeepSeek model
DS_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DS_USER, DS_ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"
PROMPTS = [
    "Hello there!",
    "Count from one to five, please.",
    "Write a haiku\nabout the sea.",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama")


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> tuple[Path, Path]:
    return write_tiny_llama(workdir)


@pytest.fixture(scope="module")
def llama_url(tiny_model: tuple[Path, Path], workdir: Path) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on a free port, serving the tiny model."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: pip install -e '.[test]'")
    port = free_port()
    log_path = workdir / "llama-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model[0])),
                *("--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port)),
                *("--n_ctx", "512", "--n_threads", "1", "--n_threads_batch", "1"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                wait_for_http(f"http://127.0.0.1:{port}/v1/models", timeout=60, process=process)
            except (RuntimeError, TimeoutError) as error:
                pytest.fail(f"llama.cpp server did not start: {error}\n{log_path.read_text()}")
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            stop_process(process)


@pytest.fixture(scope="module")
def gateway(
    llama_url: str, tiny_model: tuple[Path, Path], workdir: Path, tokenizer_dir: Path
) -> Iterator[str]:
    """A `maas-gateway serve` process in front of the llama.cpp server."""
    config = base_config(workdir, tokenizer_dir)
    config["providers"].append({"name": "llama", "type": "openai_compat", "base_url": llama_url})
    for name in (MODEL, DEEPSEEK_MODEL):
        config["models"].append(
            {"name": name, "deployments": [{"provider": "llama", "model": MODEL, "name": name}]}
        )
        config["pricing"]["models"][name] = [
            {"effective_from": "2026-01-01", "prices": {"input": "0.27", "output": "1.10"}}
        ]
    config["tokenizers"]["models"] = {
        MODEL: {"tokenizer_json": str(tiny_model[1]), "template": CHAT_TEMPLATE_CONFIG},
        DEEPSEEK_MODEL: {"tokenizer_json": "deepseek_tokenizer.json", "template": "deepseek"},
    }
    with gateway_process(config, workdir, name="gw-llama") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(gateway: str) -> OpenAI:
    return OpenAI(base_url=gateway + "/v1", api_key=ACME_KEY, max_retries=0, timeout=60)


def ledger_row(workdir: Path, request_id: str) -> dict[str, Any]:
    """The request's ledger row, once the gateway's batch writer has written it."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.closing(sqlite3.connect(workdir / "ledger.db")) as db:
            db.row_factory = sqlite3.Row
            with contextlib.suppress(sqlite3.OperationalError):  # no table before first write
                rows = db.execute(
                    "SELECT * FROM ledger_entries WHERE request_id = ?", (request_id,)
                ).fetchall()
                if rows:
                    assert len(rows) == 1
                    return dict(rows[0])
        assert time.monotonic() < deadline, f"{request_id} never reached the ledger"
        time.sleep(0.05)


def billed(row: dict[str, Any]) -> tuple[int, int, int, int]:
    return row["uncached_input"], row["cached_input"], row["output"], row["cost_nanos"]


def messages_for(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}]


def unstreamed(client: OpenAI, model: str, prompt: str, **params: Any) -> tuple[Any, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages_for(prompt), temperature=0, **params
    )
    return raw.parse(), raw.headers["x-request-id"]


def streamed(
    client: OpenAI, model: str, prompt: str, **params: Any
) -> tuple[str, str | None, Any, str]:
    """The delivered text, the finish reason, the usage chunk's usage (if any), the id."""
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=messages_for(prompt), temperature=0, stream=True, **params
    ) as response:
        request_id = response.headers["x-request-id"]
        text, finish, usage = "", None, None
        for chunk in response.parse():
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
    return text, finish, usage, request_id


def template_count(prompt: str) -> int:
    """llama.cpp's prompt tokens: the GGUF's template rendered, one token per character
    and one per control token."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(CHAT_TEMPLATE).render(
        messages=messages_for(prompt), bos_token=BOS, add_generation_prompt=True
    )
    controls = rendered.count(BOS) + rendered.count("<|im_start|>") + rendered.count("<|im_end|>")
    plain = rendered.replace(BOS, "").replace("<|im_start|>", "").replace("<|im_end|>", "")
    return len(plain) + controls


@pytest.mark.parametrize("prompt", PROMPTS)
def test_an_answer_is_billed_from_llama_cpps_own_usage(
    client: OpenAI, workdir: Path, prompt: str
) -> None:
    completion, request_id = unstreamed(client, MODEL, prompt, max_tokens=16)
    usage = completion.usage
    assert usage.prompt_tokens == template_count(prompt)
    assert usage.completion_tokens == len(completion.choices[0].message.content)
    row = ledger_row(workdir, request_id)
    assert (row["uncached_input"], row["cached_input"], row["output"]) == (
        usage.prompt_tokens,
        0,
        usage.completion_tokens,
    )
    assert row["provider"] == "llama" and row["status_code"] == 200 and not row["stream"]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("include_usage", [True, False])
def test_streamed_and_unstreamed_are_billed_the_same(
    client: OpenAI, workdir: Path, prompt: str, include_usage: bool
) -> None:
    """llama.cpp sends no usage in a stream: the gateway counts it, with the model's own
    tokenizer and template, and arrives at exactly llama.cpp's own count."""
    completion, plain_id = unstreamed(client, MODEL, prompt, max_tokens=20)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    text, finish, usage, stream_id = streamed(client, MODEL, prompt, max_tokens=20, **options)
    assert text == completion.choices[0].message.content  # greedy: the same tokens
    assert finish == completion.choices[0].finish_reason
    assert text  # something to count
    plain, stream = ledger_row(workdir, plain_id), ledger_row(workdir, stream_id)
    assert stream["stream"] and stream["stream_cut_by"] is None
    assert billed(stream) == billed(plain)
    assert (stream["uncached_input"], stream["output"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    if include_usage:  # what the caller is told is what the ledger holds
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            completion.usage.prompt_tokens,
            completion.usage.completion_tokens,
        )
    else:
        assert usage is None


def test_max_tokens_caps_the_answer_and_the_bill(client: OpenAI, workdir: Path) -> None:
    completion, plain_id = unstreamed(client, MODEL, PROMPTS[0], max_tokens=5)
    text, finish, _, stream_id = streamed(client, MODEL, PROMPTS[0], max_tokens=5)
    assert completion.choices[0].finish_reason == finish == "length"
    assert completion.usage.completion_tokens == len(text) == 5
    assert ledger_row(workdir, plain_id)["output"] == ledger_row(workdir, stream_id)["output"] == 5


def test_a_stop_sequence_ends_the_answer(client: OpenAI, workdir: Path) -> None:
    """The stop sequence is not delivered. llama.cpp counts its tokens as generated, and the
    gateway bills that unstreamed; a stream without usage is billed for what was delivered,
    which lacks exactly the stop sequence's tokens."""
    full, _ = unstreamed(client, MODEL, PROMPTS[1], max_tokens=24)
    text = full.choices[0].message.content
    assert len(text) >= 12, text
    stop = text[6:8]
    cut = text.index(stop)
    completion, plain_id = unstreamed(client, MODEL, PROMPTS[1], max_tokens=24, stop=[stop])
    streamed_text, finish, _, stream_id = streamed(
        client, MODEL, PROMPTS[1], max_tokens=24, stop=[stop]
    )
    assert completion.choices[0].message.content == streamed_text == text[:cut]
    assert completion.choices[0].finish_reason == finish == "stop"
    assert completion.usage.completion_tokens == cut + len(stop)
    plain, stream = ledger_row(workdir, plain_id), ledger_row(workdir, stream_id)
    assert plain["output"] == cut + len(stop)
    assert stream["output"] == cut
    assert stream["uncached_input"] == plain["uncached_input"]


def test_n_is_answered_with_one_choice_and_billed_for_it(client: OpenAI, workdir: Path) -> None:
    """llama-cpp-python ignores `n` and answers one choice: the gateway relays that answer as
    it is and bills the one choice (streamed the same)."""
    completion, plain_id = unstreamed(client, MODEL, PROMPTS[2], max_tokens=8, n=2)
    assert len(completion.choices) == 1
    text, _, _, stream_id = streamed(client, MODEL, PROMPTS[2], max_tokens=8, n=2)
    assert text == completion.choices[0].message.content
    plain, stream = ledger_row(workdir, plain_id), ledger_row(workdir, stream_id)
    assert plain["output"] == completion.usage.completion_tokens
    assert billed(stream) == billed(plain)


def test_a_stream_is_counted_with_the_models_configured_tokenizer(
    client: OpenAI, workdir: Path, tokenizer_dir: Path
) -> None:
    """The same upstream behind a model configured as DeepSeek: its unstreamed answers are
    billed from llama.cpp's usage, its streams are counted with DeepSeek's tokenizer and chat
    template (which is not this model's, so the two differ)."""
    prompt = PROMPTS[1]
    completion, plain_id = unstreamed(client, DEEPSEEK_MODEL, prompt, max_tokens=20)
    text, _, _, stream_id = streamed(client, DEEPSEEK_MODEL, prompt, max_tokens=20)
    assert text == completion.choices[0].message.content
    deepseek = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "deepseek_tokenizer.json"))

    def count(value: str) -> int:
        return len(deepseek.encode(value, add_special_tokens=False).ids)

    rendered = DS_BOS + "You are terse." + DS_USER + prompt + DS_ASSISTANT
    plain, stream = ledger_row(workdir, plain_id), ledger_row(workdir, stream_id)
    assert (plain["uncached_input"], plain["output"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert (stream["uncached_input"], stream["output"]) == (count(rendered), count(text))
    assert stream["output"] < plain["output"]  # DeepSeek merges what the tiny model spells


def test_a_client_that_hangs_up_is_billed_by_the_models_own_tokenizer(
    gateway: str, workdir: Path
) -> None:
    """A caller leaves after the first chunk of a long answer: the prompt is billed as
    llama.cpp counts it and the output as the delivered text's tokens (one per character
    here), both counted with the model's own tokenizer."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": messages_for(PROMPTS[0]),
            "temperature": 0,
            "max_tokens": 450,
            "stream": True,
        }
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(gateway.rsplit(":", 1)[1])
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        while not (text := delivered_text(received)):  # the first chunk has only the role
            data = sock.recv(65536)
            assert data, "the stream ended before the caller hung up"
            received += data
    headers = received.partition(b"\r\n\r\n")[0].decode().lower()
    request_id = headers.split("x-request-id:", 1)[1].split()[0]
    row = ledger_row(workdir, request_id)
    assert (row["stream_cut_by"], row["status_code"]) == ("client", 499)
    assert row["uncached_input"] == template_count(PROMPTS[0])
    # All the caller received, and what was written before the gateway saw it leave.
    assert len(text) <= row["output"] < 450


def delivered_text(received: bytes) -> str:
    """The content of the complete chunks in a raw (chunked) HTTP stream received so far."""
    text = ""
    for event in re.findall(rb"data: (\{.*?\})\n\n", received):
        for choice in json.loads(event)["choices"]:
            text += choice["delta"].get("content") or ""
    return text
