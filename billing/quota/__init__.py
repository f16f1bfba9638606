"""Quotas and budgets: admission and spending as one atomic step each.

The package, one module per job:

- `contract` - what callers use: `QuotaStore`, `AdmitRequest`, `Admission`, `Scope`,
  `Limits`, `QuotaExceeded`, `QuotaUnavailable` (and the semantics both stores keep);
- `plan` - a scope's periods, key names and key lifetimes for one admission;
- `policy` - the shared rule: `decide`, the refusal it explains, the rate-limit headers;
- `memory` - the in-process store; `redis_store` - the Redis store, whose Lua scripts are
  the ``.lua`` files beside it (`pipeline` is its pipelined connection);
- `fail_open` - Redis when it answers, the in-process store while it does not;
- `factory` - the `quotas:` configuration section and `build_quota_store`.

Callers import from here: ``from billing.quota import AdmitRequest, QuotaStore, ...``.
"""

from billing.quota.contract import (
    MAX_BALANCE_NANOS,
    Admission,
    AdmitRequest,
    Limits,
    QuotaExceeded,
    QuotaStore,
    QuotaUnavailable,
    Scope,
    ScopeCharge,
)
from billing.quota.factory import QuotaConfig, build_quota_store
from billing.quota.fail_open import FailOpenQuotaStore
from billing.quota.memory import MemoryQuotaStore
from billing.quota.policy import AccountReading, ScopeReading, format_reset
from billing.quota.redis_store import RedisQuotaStore

__all__ = [
    "MAX_BALANCE_NANOS",
    "AccountReading",
    "Admission",
    "AdmitRequest",
    "FailOpenQuotaStore",
    "Limits",
    "MemoryQuotaStore",
    "QuotaConfig",
    "QuotaExceeded",
    "QuotaStore",
    "QuotaUnavailable",
    "RedisQuotaStore",
    "Scope",
    "ScopeCharge",
    "ScopeReading",
    "build_quota_store",
    "format_reset",
]
