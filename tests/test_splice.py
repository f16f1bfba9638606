"""The relay's model-name splice, against decoding each chunk and setting its `model`.

Servers lay their chunks out differently: vLLM, SGLang, Ollama and OpenAI begin every chunk
of a stream alike up to the model's name; llama.cpp names the model after `choices`, and
some servers change `created` from chunk to chunk. Whatever the layout, a spliced read must
decode to the upstream's chunks with the public name as their own `model` and nothing else
changed, and a read the splice cannot vouch for must be refused (the relay then rewrites it
chunk by chunk).
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.relay import _Splicer

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def events(wire: bytes) -> list[Any]:
    """The JSON of each `data: ` event of a spliced read."""
    assert wire.startswith(b"data: ") and wire.endswith(b"\n\n")
    return [_decode(block[6:]) for block in wire[:-2].split(b"\n\n")]


def chunk(layout: str, model: str, created: int, text: str, nested: str | None) -> bytes:
    """One chunk as a server of `layout` writes it."""
    choices = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    if layout == "vllm":
        body: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
    else:  # llama.cpp: the model after the choices
        body = {"choices": choices, "created": created, "id": "chatcmpl-1", "model": model}
    if nested is not None:  # an object of the upstream's own naming a model too
        body = {"meta": {"model": nested}, **body}
    return _encode(body)


@settings(max_examples=300, deadline=None)
@given(
    layout=st.sampled_from(["vllm", "llama.cpp"]),
    upstream=st.sampled_from(["upstream-m", "m", "a-much-longer-upstream-name", "é/q"]),
    public=st.sampled_from(["m", "public-mod", "public-model", "a-much-longer-upstream-name"]),
    created=st.lists(st.integers(1, 3), min_size=1, max_size=12),
    texts=st.lists(st.text(max_size=8), min_size=12, max_size=12),
    nested=st.sampled_from([None, "upstream-m", "other"]),
    odd=st.none() | st.integers(0, 11),
)
def test_a_spliced_read_is_the_chunks_with_the_public_name(
    layout: str,
    upstream: str,
    public: str,
    created: list[int],
    texts: list[str],
    nested: str | None,
    odd: int | None,
) -> None:
    head = [
        chunk(layout, upstream, stamp, text, nested)
        for stamp, text in zip(created, texts, strict=False)
    ]
    if odd is not None and odd < len(head):  # one chunk naming another model
        head[odd] = chunk(layout, "someone-else", created[odd], texts[odd], nested)
    wire = _Splicer(upstream, public).wire(head)
    expected = []
    for raw in head:
        body = _decode(raw)
        body["model"] = public
        expected.append(body)
    if wire is None:
        # Refused only when a chunk did not name the upstream's model once, as its own.
        assert any(
            _decode(raw)["model"] != upstream or raw.count(_encode(upstream)) != 1 for raw in head
        )
        return
    assert events(wire) == expected


def test_chunks_that_begin_alike_are_spliced_without_a_search() -> None:
    """The common start is cut off each chunk: the rest is kept byte for byte."""
    head = [chunk("vllm", "upstream-m", 7, text, None) for text in ("a", "b", "c")]
    wire = _Splicer("upstream-m", "public").wire(head)
    assert wire is not None
    start = head[0][: head[0].index(b'"model"')]
    assert wire == b"".join(
        b"data: " + start + b'"model":"public"' + raw[len(start) + 20 :] + b"\n\n" for raw in head
    )


def test_one_chunk_naming_another_model_is_refused() -> None:
    head = [chunk("vllm", "upstream-m", 7, "a", None), chunk("vllm", "other", 7, "b", None)]
    assert _Splicer("upstream-m", "public").wire(head) is None
