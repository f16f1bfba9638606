"""Normalised token usage: the unit every other part of billing speaks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request, split the way they are priced.

    `uncached_input + cached_input` is the whole prompt; `reasoning` is the part
    of `output` spent on hidden reasoning (it is billed as output, and is
    already included in `output`, as in OpenAI's usage object).
    """

    uncached_input: int = 0
    cached_input: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def input(self) -> int:
        return self.uncached_input + self.cached_input

    @property
    def total(self) -> int:
        return self.input + self.output

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.uncached_input + other.uncached_input,
            self.cached_input + other.cached_input,
            self.output + other.output,
            self.reasoning + other.reasoning,
        )

    @classmethod
    def from_openai(cls, usage: dict[str, Any]) -> Usage:
        """Read an OpenAI `usage` object (chat, completions or embeddings), in any of the
        dialects upstreams speak: cached input in `prompt_tokens_details.cached_tokens`
        (OpenAI, vLLM, SGLang, llama.cpp, Ark) or `prompt_cache_hit_tokens` (DeepSeek, whose
        `prompt_cache_hit_tokens + prompt_cache_miss_tokens` is the prompt), reasoning in
        `completion_tokens_details.reasoning_tokens` (part of the output)."""
        hit = int(usage.get("prompt_cache_hit_tokens") or 0)
        prompt = int(
            usage.get("prompt_tokens")
            or usage.get("input_tokens")
            or hit + int(usage.get("prompt_cache_miss_tokens") or 0)
        )
        output = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        # DeepSeek reports cache hits at the top level.
        cached = cached or hit
        out_details = (
            usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        )
        reasoning = (
            int(out_details.get("reasoning_tokens") or 0) if isinstance(out_details, dict) else 0
        )
        cached = min(cached, prompt)
        return cls(prompt - cached, cached, output, min(reasoning, output))

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `usage` object a caller sees."""
        return {
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.total,
            "prompt_tokens_details": {"cached_tokens": self.cached_input},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        }
