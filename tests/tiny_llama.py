"""A tiny random-weight llama model for llama.cpp, and the same tokenizer as a tokenizer.json.

`write_tiny_llama` writes, in well under a second, a GGUF file (2 layers, 64 dimensions,
about 400 KB) that llama.cpp loads and runs, and a Hugging Face `tokenizer.json` that
tokenizes every text the tests send exactly as llama.cpp tokenizes it with that GGUF.

The vocabulary is chosen so that counting a delivered text again gives exactly the tokens the
model generated, for any sequence a random model can produce:

- one token per printable ASCII character and one for the newline, in GPT-2's byte-level
  alphabet, and no merges: any text of those characters is one token per character, however
  it is split or joined, so a stream's pieces re-tokenize to the tokens that made them. (No
  byte above 0x7F is in the vocabulary, so no generated text is invalid UTF-8 or held back
  as an incomplete character.) llama.cpp insists on at least one merge in a GGUF; the one
  written joins two NUL bytes, which are not in the vocabulary and never occur;
- three control tokens: `<|bos|>`, and ChatML's `<|im_start|>` and `<|im_end|>`, which is
  the end-of-sequence token (llama.cpp stops there and does not count it). The output
  projection's rows of `<|bos|>` and `<|im_start|>` are zero, so their logit is always 0
  while the argmax of the ninety-odd random logits is positive: greedy decoding never
  emits a token that would be generated and counted yet show no text.

The chat template is ChatML after a BOS, so a prompt's count is exactly its characters plus
the template's tokens (`CHAT_TEMPLATE_CONFIG` says it for the gateway).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

BOS, IM_START, IM_END = "<|bos|>", "<|im_start|>", "<|im_end|>"
CHARACTERS = [chr(c) for c in range(0x20, 0x7F)] + ["\n"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATE_CONFIG: dict[str, Any] = {"preset": "chatml", "prefix": BOS}
"""The gateway's `template` for the model: ChatML after the BOS token."""

N_EMBD, N_LAYER, N_HEAD, N_FF, N_CTX = 64, 2, 4, 128, 512


def _byte_level(character: str) -> str:
    """GPT-2's printable stand-in for an ASCII character (space and newline are remapped)."""
    return {" ": "\u0120", "\n": "\u010a"}.get(character, character)


def vocabulary() -> list[str]:
    """Token texts by id: the characters (byte-level), then the three control tokens."""
    return [_byte_level(c) for c in CHARACTERS] + [BOS, IM_START, IM_END]


def write_tiny_llama(directory: Path, seed: int = 1234) -> tuple[Path, Path]:
    """Write `tiny-llama.gguf` and `tiny-llama-tokenizer.json` into `directory`."""
    import gguf  # a test dependency

    tokens = vocabulary()
    n_vocab = len(tokens)
    bos_id, im_start_id, im_end_id = n_vocab - 3, n_vocab - 2, n_vocab - 1
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    path = directory / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    token_types = [gguf.TokenType.NORMAL] * len(CHARACTERS) + [gguf.TokenType.CONTROL] * 3
    writer.add_token_types(token_types)
    writer.add_token_merges(["\u0100 \u0100"])
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(im_end_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    output = weights(n_vocab, N_EMBD, scale=1.0)
    output[[bos_id, im_start_id]] = 0.0  # never the argmax: see the module docstring
    writer.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for layer in range(N_LAYER):
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(block + name + ".weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(block + "ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_down.weight", weights(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tokenizer_path = directory / "tiny-llama-tokenizer.json"
    tokenizer_path.write_text(json.dumps(_tokenizer_json(tokens), ensure_ascii=False))
    return path, tokenizer_path


def _tokenizer_json(tokens: list[str]) -> dict[str, Any]:
    """The same vocabulary as a byte-level BPE tokenizer.json, control tokens as added."""
    n_chars = len(CHARACTERS)
    added = [
        {
            "id": n_chars + i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, text in enumerate(tokens[n_chars:])
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {text: i for i, text in enumerate(tokens[:n_chars])},
            "merges": [],
        },
    }
