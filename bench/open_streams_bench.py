"""How long the ledger's journal holds the event loop while many streams are open.

    python bench/open_streams_bench.py --tokenizers ../shared/tokenizers [--streams 64]
        [--rounds 4]

At each new journal segment (every `ledger.flush_interval_ms` under load) the ledger
writes the crash policy's row of every request still open (`Ledger._rejournal_open`), on
the event loop. This runs the gateway's app in-process (`gateway.app.create_app`, its
services opened; the in-process `simulated` provider at real time: 64-token answers, one
token every 20 ms), keeps `--streams` streams open, their starts spread over one stream's
length as a steady load is, for `--rounds` streams each, and prints:

- the time each rewrite of the open requests' rows took (wall clock: it is the time the
  event loop was held), and each journal rotation;
- the checkpoints of delivered output (`Relay._checkpoint`) and the recounts of it
  (`Relay._count_output`): how many, and how long each took;
- the event loop's lag: how late a 5 ms timer fired, sampled throughout.

The figures are wall-clock times on this machine: run it on a quiet one and compare
commits, not machines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from bench.relay_path_bench import STREAM_BODY, one, settings_for  # noqa: E402
from billing.journal import Journal  # noqa: E402
from billing.ledger import Ledger  # noqa: E402
from gateway.app import Gateway, create_app  # noqa: E402
from gateway.relay import Relay  # noqa: E402

#: Wall-clock microseconds of each call, by what was timed.
TIMES: dict[str, list[float]] = {
    "rows rewritten": [],
    "journal rotation": [],
    "checkpoint": [],
    "output recount": [],
}


def _timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            TIMES[name].append((time.perf_counter() - started) * 1e6)

    return timed


def _watch_the_methods() -> None:
    Ledger._rejournal_open = _timed("rows rewritten", Ledger._rejournal_open)  # type: ignore[method-assign]
    Journal.rotate = _timed("journal rotation", Journal.rotate)  # type: ignore[method-assign]
    Relay._count_output = _timed("output recount", Relay._count_output)  # type: ignore[method-assign]
    if hasattr(Relay, "_checkpoint"):  # (not in the commits before it)
        Relay._checkpoint = _timed("checkpoint", Relay._checkpoint)  # type: ignore[method-assign]


async def _lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 5 ms sleep wakes, in µs, until `stop`."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append((time.perf_counter() - started - 0.005) * 1e6)


def _line(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:18} none"
    ordered = sorted(values)
    p90 = ordered[int(len(ordered) * 0.9)]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"  {name:18} {len(values):6} calls  median {statistics.median(values):8.1f}  "
        f"p90 {p90:8.1f}  p99 {p99:8.1f}  max {ordered[-1]:8.1f} µs"
    )


async def main_async(args: argparse.Namespace) -> None:
    _watch_the_methods()
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(args.tokenizers, Path(tmp))
        provider = settings.providers[0]
        provider.time_scale = 1.0
        provider.itl_ms = 20.0
        provider.jitter = 0.0
        provider.capacity = 4 * args.streams  # no slowdown at this load
        provider.output.distribution = "fixed"
        provider.output.mean = provider.output.max = 64
        gateway = Gateway(settings, freeze_heap=True)
        app = create_app(settings, gateway=gateway)
        length_s = 64 * 0.020
        async with gateway.serving():

            async def caller(i: int) -> None:
                await asyncio.sleep(i * length_s / args.streams)
                for _ in range(args.rounds):
                    await one(app, STREAM_BODY)

            stop = asyncio.Event()
            lags: list[float] = []
            watching = asyncio.ensure_future(_lag(stop, lags))
            started = time.perf_counter()
            await asyncio.gather(*(caller(i) for i in range(args.streams)))
            spent = time.perf_counter() - started
            stop.set()
            await watching
    print(
        f"{args.streams} streams open, {args.rounds} each ({args.streams * args.rounds} "
        f"streams of 64 tokens at 20 ms) in {spent:.1f} s:"
    )
    for name, values in TIMES.items():
        print(_line(name, values))
    print(_line("event-loop lag", lags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", type=Path, required=True, help="tokenizer files")
    parser.add_argument("--streams", type=int, default=64, help="streams open at once")
    parser.add_argument("--rounds", type=int, default=4, help="streams per caller")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
