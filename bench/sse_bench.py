"""Micro-benchmark: the event-stream parser (`providers.sse.SSEDecoder`) against the one it
replaced (events split on `\\n\\n` only), in microseconds per chunk, parsing only.

    python bench/sse_bench.py [--chunks 64] [--repeat 500]

A stream of `--chunks` chat-completion chunks (as vLLM sends them), a usage chunk and
`[DONE]`, cut into reads three ways: one event per read (a live model), the whole stream in
one read (a fast upstream), and random reads of 1 to 300 bytes; with LF and, for the new
parser only (the old one fails on it), CRLF line endings. Figures are CPU time per chunk
(best of 15 rounds, old and new interleaved), which other load on a shared host inflates
less than wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from providers.sse import SSEDecoder


def old_parse(reads: list[bytes]) -> int:
    """The parser before `providers.sse`: events split on LF LF only."""
    count = 0
    buffer = b""
    for data in reads:
        buffer = buffer + data if buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                buffer = buffer[start:]
                break
            event, start = buffer[start:end], end + 2
            payload = _old_event_data(event)
            if payload is None:
                continue
            count += 1
            _ready = buffer.find(b"\n\n", start) >= 0
    return count


def _old_event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    event = event.replace(b"\r\n", b"\n")
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def new_parse(reads: list[bytes]) -> int:
    count = 0
    decoder = SSEDecoder()
    for data in reads:
        events = decoder.feed(data)
        left = len(events)
        for event in events:
            left -= 1
            if type(event) is tuple:
                _kind, _payload = event
            count += 1
            _ready = left > 0
    return count


def stream(chunks: int, ending: bytes) -> list[bytes]:
    events = []
    for i in range(chunks):
        chunk = {
            "id": "chatcmpl-0d9a3c1b7e5f4a2b8c6d4e2f0a1b3c5d",
            "object": "chat.completion.chunk",
            "created": 1764806400,
            "model": "Qwen/Qwen2.5-7B-Instruct",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": f" word{i}"},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        events.append(b"data: " + json.dumps(chunk).encode() + ending + ending)
    events.append(b'data: {"choices":[],"usage":{"prompt_tokens":9}}' + ending + ending)
    events.append(b"data: [DONE]" + ending + ending)
    return events


def per_chunk_us(
    parsers: list[Callable[[list[bytes]], int]], reads: list[bytes], repeat: int, rounds: int = 15
) -> list[float]:
    """Each parser's best CPU time per chunk, rounds interleaved so load hits all alike."""
    count = parsers[0](reads)
    best = [float("inf")] * len(parsers)
    for _ in range(rounds):
        for i, parse in enumerate(parsers):
            t0 = time.thread_time()  # CPU time: a shared, loaded host does not inflate it
            for _ in range(repeat):
                parse(reads)
            best[i] = min(best[i], time.thread_time() - t0)
    return [b / repeat / count * 1e6 for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=500)
    args = parser.parse_args()
    rng = random.Random(7)
    print("| reads | line end | old µs/chunk | new µs/chunk |")
    print("|---|---|---|---|")
    for ending in (b"\n", b"\r\n"):
        events = stream(args.chunks, ending)
        whole = b"".join(events)
        cuts = []
        at = 0
        while at < len(whole):
            step = rng.randint(1, 300)
            cuts.append(whole[at : at + step])
            at += step
        for label, reads in (("one event each", events), ("one read", [whole]), ("random", cuts)):
            if ending == b"\n":
                old, new = per_chunk_us([old_parse, new_parse], reads, args.repeat)
            else:
                old, (new,) = None, per_chunk_us([new_parse], reads, args.repeat)
            name = "LF" if ending == b"\n" else "CRLF"
            old_text = f"{old:.3f}" if old is not None else "fails"
            print(f"| {label} | {name} | {old_text} | {new:.3f} |")


if __name__ == "__main__":
    main()
