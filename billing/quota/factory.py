"""The `quotas:` configuration section and the store it builds."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from billing.quota.contract import QuotaStore
from billing.quota.fail_open import FailOpenQuotaStore
from billing.quota.memory import MemoryQuotaStore
from billing.quota.redis_store import RedisQuotaStore

__all__ = ["QuotaConfig", "build_quota_store"]


class QuotaConfig(BaseModel):
    """The `quotas:` section of the gateway configuration.

    `redis_url_env` names an environment variable holding the Redis URL (it may carry a
    password); when set it wins over `redis_url`. `on_unavailable="open"` serves from a
    per-process memory store while Redis is unreachable and returns to Redis by itself.
    `redis_cluster` makes the URL one node of a Redis Cluster (`redis_cluster_nodes`, more
    ``host:port`` nodes to start from): keys are hash-tagged by tenant, so that one
    request's scripts touch one slot, and redis-py follows MOVED, ASK and failovers.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    redis_url_env: str | None = "MAAS_REDIS_URL"
    on_unavailable: Literal["closed", "open"] = "closed"
    reservation_ttl_s: float = Field(default=600, gt=0)
    default_max_tokens: int = Field(default=4096, gt=0)
    timeout_ms: int = Field(default=1000, gt=0)
    retry_interval_ms: int = Field(default=500, ge=0)
    max_connections: int = Field(default=64, gt=0)
    key_prefix: str = "maas:quota:"
    redis_cluster: bool = False
    redis_cluster_nodes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _untagged_prefix(self) -> QuotaConfig:
        if self.redis_cluster and ("{" in self.key_prefix or "}" in self.key_prefix):
            raise ValueError("quotas.key_prefix cannot hold braces on a Redis Cluster")
        return self

    def resolved_redis_url(self) -> str | None:
        if self.redis_url_env and os.environ.get(self.redis_url_env):
            return os.environ[self.redis_url_env]
        return self.redis_url


def build_quota_store(config: QuotaConfig) -> QuotaStore:
    """The configured store. Connects lazily: no I/O happens here."""
    memory = MemoryQuotaStore(  # named as the Redis store names keys: it replays there
        reservation_ttl_s=config.reservation_ttl_s,
        key_prefix=config.key_prefix,
        tagged=config.backend == "redis" and config.redis_cluster,
    )
    if config.backend == "memory":
        return memory
    url = config.resolved_redis_url()
    if not url:
        raise ValueError(
            "quotas.backend is 'redis' but no URL is configured: set quotas.redis_url or the"
            f" environment variable named by quotas.redis_url_env ({config.redis_url_env!r})"
        )
    redis_store = RedisQuotaStore(
        url,
        reservation_ttl_s=config.reservation_ttl_s,
        timeout_ms=config.timeout_ms,
        retry_interval_ms=config.retry_interval_ms,
        key_prefix=config.key_prefix,
        max_connections=config.max_connections,
        cluster=config.redis_cluster,
        cluster_nodes=config.redis_cluster_nodes,
    )
    if config.on_unavailable == "open":
        return FailOpenQuotaStore(redis_store, memory)
    return redis_store
