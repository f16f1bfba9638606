"""Microbenchmark of offline token counting: start-up time and microseconds per count.

Usage: python bench/tokens_bench.py [TOKENIZER_DIR] [--iterations N]

Without TOKENIZER_DIR, encodings come from $MAAS_TOKENIZER_DIR or the installed packages.
When TOKENIZER_DIR holds `deepseek_tokenizer.json`, a `deepseek-chat` model is counted with
it (a Hugging Face tokenizer.json and DeepSeek's chat template) as well.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.tokens import TokenCounter, TokenizerConfig

TYPICAL_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one short sentence."},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}
DEEPSEEK_FILE = "deepseek_tokenizer.json"
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 500  # about 5,000 tokens


def _microseconds(call: Callable[[], object], iterations: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    return (time.perf_counter() - start) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", nargs="?", type=Path, default=None)
    parser.add_argument("--iterations", type=int, default=50_000)
    args = parser.parse_args()

    models: dict[str, dict[str, str]] = {}
    if args.dir is not None and (args.dir / DEEPSEEK_FILE).is_file():
        models["deepseek-*"] = {"tokenizer_json": DEEPSEEK_FILE, "template": "deepseek"}
    start = time.perf_counter()
    counter = TokenCounter(TokenizerConfig.model_validate({"dir": args.dir, "models": models}))
    print(f"construction: {(time.perf_counter() - start) * 1000:.0f} ms")
    for warning in counter.warnings:
        print(f"warning: {warning}")

    n = args.iterations
    cases: list[tuple[str, Callable[[], object], int]] = []
    chat_models = ["gpt-4o", "gpt-4"] + (["deepseek-chat"] if models else [])
    for model in chat_models:
        cases += [
            (
                f"count_chat {model} 2 messages",
                partial(counter.count_chat, model, TYPICAL_CHAT),
                n,
            ),
            (
                f"count_chat {model} 2 messages + 1 tool",
                partial(counter.count_chat, model, TYPICAL_CHAT, tools=[WEATHER_TOOL]),
                n,
            ),
        ]
    cases += [
        ("count_prompt token array (256 ids)", lambda: counter.count_prompt("gpt-4", [1] * 256), n),
        (
            "count_input 8 strings",
            lambda: counter.count_input("text-embedding-3-small", ["hello world"] * 8),
            n,
        ),
        (
            "count_text ~5k tokens",
            lambda: counter.count_text("gpt-4o", LONG_TEXT),
            max(n // 100, 1),
        ),
    ]
    if models:
        cases += [
            (
                "count_text deepseek-chat 1 sentence",
                partial(counter.count_text, "deepseek-chat", TYPICAL_CHAT[1]["content"]),
                n,
            ),
            (
                "count_text deepseek-chat ~5k tokens",
                partial(counter.count_text, "deepseek-chat", LONG_TEXT),
                max(n // 100, 1),
            ),
        ]
    for label, call, iterations in cases:
        print(f"{label:<40} {_microseconds(call, iterations):9.2f} µs")


if __name__ == "__main__":
    main()
