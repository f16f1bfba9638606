"""What a stream has delivered, as metering sees it: reads relayed untouched are held and
their text taken out in order, whatever mix of untouched and rewritten reads came."""

from __future__ import annotations

from typing import Any

from gateway.relay import PENDING_CHUNKS, Progress
from providers.base import Chunks


def chunk(text: str, index: int = 0, **delta: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": index, "delta": {"content": text, **delta}, "finish_reason": None}],
    }


def test_held_and_rewritten_reads_keep_their_order() -> None:
    progress = Progress()
    expected: dict[int, list[str]] = {0: [], 1: []}
    for i in range(3 * PENDING_CHUNKS):
        index = i % 2
        read = Chunks.of([chunk(f"<{i}>", index)])
        expected[index].append(f"<{i}>")
        if i % 7 == 3:  # a read the relay had to rewrite: its chunks added one by one
            for view in read.views:
                progress.add(view)
        else:
            progress.hold(read)
        assert progress.pending_chunks <= PENDING_CHUNKS  # held text is bounded
    assert progress.size() == 3 * PENDING_CHUNKS
    assert progress.collect() == expected
    assert progress.pending == [] and progress.size() == 3 * PENDING_CHUNKS


def test_reasoning_and_tool_calls_count_as_output() -> None:
    progress = Progress()
    call = {"index": 0, "function": {"name": "get", "arguments": '{"a":1}'}}
    progress.hold(Chunks.of([chunk("", reasoning_content="think"), chunk("", tool_calls=[call])]))
    assert progress.delivered()
    assert progress.collect() == {0: ["think", 'get{"a":1}']}


def test_a_held_read_that_is_json_but_no_chunk_adds_nothing() -> None:
    progress = Progress()
    progress.hold(Chunks([b'{"choices":[{"index":0,"delta":{"content":"ok"}}]}', b"[1,2]"]))
    assert progress.collect() == {0: ["ok"]}
