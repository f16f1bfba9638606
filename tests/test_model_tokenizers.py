"""Each model family counted with its own tokenizer and chat template (`tokenizers.models`).

Counts are checked against an independent rendering: the whole prompt written out as the
model's server renders it (its chat template) and tokenized at once by the `tokenizers`
library, which is what the server counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pydantic
import pytest
import tokenizers

from gateway.chat_template import PRESETS, ChatTemplate
from gateway.config import ConfigError, parse_settings
from gateway.tokens import TokenCounter, TokenizerConfig, TokenizerFileError
from tests.harness import base_config
from tests.tiny_llama import BOS, CHAT_TEMPLATE, CHAT_TEMPLATE_CONFIG, write_tiny_llama

DEEPSEEK_FILE = "deepseek_tokenizer.json"
DS_BOS, DS_EOS = (
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)
DS_USER, DS_ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    ],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "用一句话介绍一下杭州。"},
        {"role": "assistant", "content": "杭州是浙江省的省会，以西湖闻名。"},
        {"role": "user", "content": "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)"},
    ],
]


@pytest.fixture(scope="module")
def deepseek_json(tokenizer_dir: Path) -> Path:
    path = tokenizer_dir / DEEPSEEK_FILE
    if not path.is_file():
        pytest.fail(f"{DEEPSEEK_FILE} not found in {tokenizer_dir}; set MAAS_TEST_TOKENIZER_DIR")
    return path


@pytest.fixture(scope="module")
def reference(deepseek_json: Path) -> tokenizers.Tokenizer:
    """DeepSeek's tokenizer read directly with the `tokenizers` library."""
    return tokenizers.Tokenizer.from_file(str(deepseek_json))


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path, deepseek_json: Path) -> TokenCounter:
    return TokenCounter(
        TokenizerConfig.model_validate(
            {
                "dir": str(tokenizer_dir),
                "models": {"deepseek-*": {"tokenizer_json": DEEPSEEK_FILE, "template": "deepseek"}},
            }
        )
    )


def render_deepseek(messages: list[dict[str, Any]]) -> str:
    """DeepSeek V3's chat template (tokenizer_config.json), for messages without tools."""
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    text = DS_BOS + system
    for message in messages:
        if message["role"] == "user":
            text += DS_USER + message["content"]
        elif message["role"] == "assistant":
            text += DS_ASSISTANT + message["content"] + DS_EOS
    return text + DS_ASSISTANT


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_deepseek_prompts_count_as_the_rendered_template(
    counter: TokenCounter, reference: tokenizers.Tokenizer, messages: list[dict[str, Any]]
) -> None:
    expected = len(reference.encode(render_deepseek(messages), add_special_tokens=False).ids)
    assert counter.count_chat("deepseek-chat", messages) == expected
    # Not what an OpenAI encoding says: the family's own tokenizer is in use.
    assert counter.count_chat("gpt-4", messages) != expected


def test_deepseek_output_is_counted_with_its_tokenizer(
    counter: TokenCounter, reference: tokenizers.Tokenizer
) -> None:
    text = "杭州是浙江省的省会，以西湖闻名。 The quick brown fox jumps over the lazy dog."
    expected = len(reference.encode(text, add_special_tokens=False).ids)
    assert counter.count_text("deepseek-reasoner", text) == expected
    assert counter.count_text("gpt-4", text) != expected
    assert counter.tokenizer_label("deepseek-chat") == DEEPSEEK_FILE
    assert counter.tokenizer_label("provider/deepseek-chat") == DEEPSEEK_FILE
    assert counter.tokenizer_label("gpt-4o") == "o200k_base"


def test_a_generated_models_template_counts_as_llama_cpp_renders_it(tmp_path: Path) -> None:
    """The tiny llama model's tokenizer.json and ChatML-after-BOS template, against the
    Jinja template its GGUF carries (rendered the way llama-cpp-python renders it)."""
    _, tokenizer_json = write_tiny_llama(tmp_path)
    counter = TokenCounter(
        TokenizerConfig.model_validate(
            {
                "models": {
                    "tiny": {
                        "tokenizer_json": str(tokenizer_json),
                        "template": CHAT_TEMPLATE_CONFIG,
                    }
                }
            }
        )
    )
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(CHAT_TEMPLATE)
    reference = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi\nand bye."},
    ]
    prompt = template.render(messages=messages, bos_token=BOS, add_generation_prompt=True)
    expected = len(reference.encode(prompt, add_special_tokens=False).ids)
    # One token per character plus the control tokens: 1 + 2 x 2 + 1 = 6 of them.
    assert (
        expected
        == len(prompt.replace(BOS, "").replace("<|im_start|>", "").replace("<|im_end|>", "")) + 6
    )
    assert counter.count_chat("tiny", messages) == expected


def test_an_encoding_family_keeps_its_template(tokenizer_dir: Path) -> None:
    """A family may use a tiktoken encoding with another chat template."""
    counter = TokenCounter(
        TokenizerConfig.model_validate(
            {
                "dir": str(tokenizer_dir),
                "models": {"qwen*": {"encoding": "o200k_base", "template": "none"}},
            }
        )
    )
    messages = [{"role": "user", "content": "hello world"}]
    assert counter.count_chat("qwen-max", messages) == 2  # the text alone
    assert counter.count_chat("gpt-4o", messages) == 2 + 1 + 3 + 3  # role, message, priming
    assert counter.encoding_name("qwen-max") == "o200k_base"


def test_a_missing_tokenizer_file_falls_back_with_a_warning(tokenizer_dir: Path) -> None:
    counter = TokenCounter(
        TokenizerConfig.model_validate(
            {"dir": str(tokenizer_dir), "models": {"llama-*": {"tokenizer_json": "nope.json"}}}
        )
    )
    assert any("nope.json" in w and "llama-*" in w for w in counter.warnings)
    assert counter.tokenizer_label("llama-3") == "cl100k_base"


def test_a_bad_tokenizer_file_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerFileError, match=r"bad\.json"):
        TokenCounter(
            TokenizerConfig.model_validate({"models": {"m": {"tokenizer_json": str(bad)}}})
        )


def test_template_specs_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="content"):
        ChatTemplate(message="<|im_start|>{role}")
    with pytest.raises(pydantic.ValidationError, match="presets"):
        TokenizerConfig.model_validate({"models": {"m": {"template": "mistral-v9"}}})
    with pytest.raises(pydantic.ValidationError, match="not both"):
        TokenizerConfig.model_validate(
            {"models": {"m": {"encoding": "cl100k_base", "tokenizer_json": "t.json"}}}
        )
    with pytest.raises(pydantic.ValidationError, match="unknown encoding"):
        TokenizerConfig.model_validate({"models": {"m": {"encoding": "o300k_base"}}})
    spec = (
        TokenizerConfig.model_validate(
            {"models": {"m": {"template": {"preset": "llama3", "prefix": ""}}}}
        )
        .models["m"]
        .template
    )
    assert spec.prefix == "" and spec.message == PRESETS["llama3"].message


def test_the_configuration_file_names_a_models_tokenizer(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The `tokenizers` section of a whole configuration, old and new forms together."""
    config = base_config(
        tmp_path,
        tokenizer_dir,
        tokenizers={
            "encodings": {"gpt-4o*": "o200k_base"},
            "models": {"deepseek-*": {"tokenizer_json": DEEPSEEK_FILE, "template": "deepseek"}},
        },
    )
    settings = parse_settings(config)
    assert settings.tokenizers.models["deepseek-*"].template == PRESETS["deepseek"]
    config["tokenizers"]["models"]["deepseek-*"]["template"] = {"message": "no content"}
    with pytest.raises(ConfigError, match=r"tokenizers\.models\.deepseek-\*\.template"):
        parse_settings(config)
