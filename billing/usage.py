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

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `usage` object a caller sees."""
        return {
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.total,
            "prompt_tokens_details": {"cached_tokens": self.cached_input},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        }
