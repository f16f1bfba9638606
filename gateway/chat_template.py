"""Chat templates as token overheads: what a model's prompt adds around the messages' text.

An inference server turns `messages` into one prompt with its model's chat template and
counts that prompt's tokens. `ChatTemplate` describes the template's layout so the gateway
can count the same prompt without rendering Jinja: literal text around each message (with
`{role}` and `{content}` placeholders), text once per prompt (a BOS token) and the reply
priming (the generation prompt), plus constant token counts for templates whose markup is
not text of the counting tokenizer (OpenAI's). Template text is tokenized once per role by
the model's own tokenizer, with its special tokens recognized, and remembered.

`PRESETS` names the layouts of the model families a MaaS cloud sells: `openai`, `chatml`
(Qwen, Yi and other ChatML models), `deepseek` (DeepSeek V3 and R1), `llama3` (Llama 3.x),
`doubao` (ByteDance Seed: Seed-OSS and Doubao) and `none`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["PRESETS", "ChatTemplate", "resolve_template"]

CONTENT = "{content}"
ROLE = "{role}"


class ChatTemplate(BaseModel):
    """The layout of a chat prompt, in template text and constant token counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field("", description="Text once at the start of every prompt (a BOS token)")
    message: str = Field(
        "{content}",
        description="Text of each message: `{role}` and `{content}` are replaced by the "
        "message's role and text",
    )
    roles: dict[str, str] = Field(
        default_factory=dict, description="Per-role message text, overriding `message`"
    )
    reply: str = Field("", description="The reply priming (generation prompt) text")
    tokens_per_message: int = Field(0, ge=0, description="Tokens added to every message")
    tokens_per_name: int = Field(0, ge=0, description="Tokens added per `name` field")
    reply_tokens: int = Field(0, ge=0, description="Tokens added once for the reply priming")
    names: bool = Field(False, description="Whether a message's `name` is part of the prompt")
    tools: Literal["openai", "json"] = Field(
        "json",
        description="Tool definitions counted by OpenAI's published rules, or as their JSON",
    )

    @field_validator("message")
    @classmethod
    def _one_content(cls, value: str) -> str:
        _check_message(value)
        return value

    @field_validator("roles")
    @classmethod
    def _one_content_per_role(cls, value: dict[str, str]) -> dict[str, str]:
        for text in value.values():
            _check_message(text)
        return value

    def message_text(self, role: str) -> tuple[str, str]:
        """The template text before and after a message's content, for `role`."""
        layout = self.roles.get(role, self.message).replace(ROLE, role)
        before, _, after = layout.partition(CONTENT)
        return before, after


def _check_message(text: str) -> None:
    if text.count(CONTENT) != 1:
        raise ValueError("a message template must hold `{content}` exactly once")


def _deepseek(name: str) -> str:
    """A DeepSeek special token: its bars are FULLWIDTH VERTICAL LINEs (U+FF5C)."""
    return f"<\uff5c{name}\uff5c>"


PRESETS: dict[str, ChatTemplate] = {
    # OpenAI's cookbook: <|start|>{role}<|message|>{content}<|end|>, 3 tokens of markup per
    # message, 1 per name, every reply primed with <|start|>assistant<|message|>.
    "openai": ChatTemplate(
        message="{role}{content}",
        tokens_per_message=3,
        tokens_per_name=1,
        reply_tokens=3,
        names=True,
        tools="openai",
    ),
    "chatml": ChatTemplate(
        message="<|im_start|>{role}\n{content}<|im_end|>\n",
        reply="<|im_start|>assistant\n",
    ),
    "deepseek": ChatTemplate(
        prefix=_deepseek("begin▁of▁sentence"),
        roles={
            "system": "{content}",
            "user": _deepseek("User") + "{content}",
            "assistant": _deepseek("Assistant") + "{content}" + _deepseek("end▁of▁sentence"),
            "tool": _deepseek("tool▁output▁begin") + "{content}" + _deepseek("tool▁output▁end"),
        },
        reply=_deepseek("Assistant"),
    ),
    "llama3": ChatTemplate(
        prefix="<|begin_of_text|>",
        message="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        reply="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "doubao": ChatTemplate(
        message="<seed:bos>{role}\n{content}<seed:eos>\n",
        reply="<seed:bos>assistant\n",
    ),
    "none": ChatTemplate(),
}


def resolve_template(value: str | ChatTemplate | dict[str, Any]) -> ChatTemplate:
    """A preset by name, or a template spec (a mapping may name a `preset` to start from)."""
    if isinstance(value, ChatTemplate):
        return value
    if isinstance(value, str):
        try:
            return PRESETS[value]
        except KeyError:
            raise ValueError(
                f"unknown chat template {value!r}; presets: {', '.join(PRESETS)}"
            ) from None
    fields = dict(value)
    preset = fields.pop("preset", None)
    if preset is None:
        return ChatTemplate.model_validate(fields)
    base = resolve_template(str(preset))
    return ChatTemplate.model_validate({**base.model_dump(), **fields})
