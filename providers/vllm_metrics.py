"""The vLLM metric families a model backend exposes, defined once.

A simulated backend reports its capacity the way a vLLM server does, so the same dashboards
and alerts read both: the simulator's scrape-time collector (`providers.simulate_server`)
and the gateway's in-process backend metrics (`gateway.metrics.VllmStyleMetrics`) take
each family's name, help text and labels from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its name (counters without `_total`), help text and labels."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ("model_name",)


NUM_REQUESTS_RUNNING = Family("vllm:num_requests_running", "Number of requests currently running.")
NUM_REQUESTS_WAITING = Family(
    "vllm:num_requests_waiting", "Number of requests waiting to be processed."
)
PROMPT_TOKENS = Family("vllm:prompt_tokens", "Number of prefill tokens processed.")
GENERATION_TOKENS = Family("vllm:generation_tokens", "Number of generation tokens processed.")
REQUEST_SUCCESS = Family(
    "vllm:request_success",
    "Count of successfully processed requests.",
    ("model_name", "finished_reason"),
)
TIME_TO_FIRST_TOKEN = Family(
    "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."
)
