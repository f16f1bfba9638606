"""`Idempotency-Key` on the admin API's writes (Stripe's semantics; see docs/billing.md).

The same key with the same request (method, path, JSON body) returns the first result with
`idempotent-replayed: true` and does not apply again; with another request it is a 409
(`idempotency_key_reused`); while the first is still running it is a 409
(`idempotency_key_in_use`). Only successful (2xx) results are kept, for 24 hours; a failed
request leaves the key free, so a corrected retry runs. Secrets are never stored: a
replayed key creation comes back without its `key` field.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response

from billing.idempotency import Claim, IdempotencyConflict, Stored, check_key, fingerprint
from billing.quota import QuotaStore, QuotaUnavailable
from gateway.errors import ApiError, invalid_request, service_unavailable

log = logging.getLogger("maas.admin")

HEADER = "idempotency-key"
REPLAYED = "idempotent-replayed"


async def claim_of(request: Request[Any, Any, Any]) -> Claim | None:
    """The request's idempotency claim, None without the header; 400 for a bad key."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    problem = check_key(key)
    if problem is not None:
        raise invalid_request(problem, param=HEADER)
    return Claim(key, fingerprint(request.method, request.url.path, await request.body()))


def conflict(exc: IdempotencyConflict) -> ApiError:
    code = "idempotency_key_in_use" if exc.kind == "in_flight" else "idempotency_key_reused"
    return ApiError(409, str(exc), param=HEADER, code=code)


def replayed(status: int, body: bytes) -> Response[Any]:
    return Response(
        body, status_code=status, media_type="application/json", headers={REPLAYED: "true"}
    )


def _storable(body: bytes, secret_fields: tuple[str, ...]) -> str:
    if not secret_fields:
        return body.decode()
    value = msgspec.json.decode(body)
    if isinstance(value, dict):
        for name in secret_fields:
            value.pop(name, None)
    return msgspec.json.encode(value).decode()


async def once(
    request: Request[Any, Any, Any],
    quotas: QuotaStore,
    handle: Callable[[], Awaitable[Response[Any]]],
    secret_fields: tuple[str, ...] = (),
) -> Response[Any]:
    """Run an admin write, `handle()`, honouring the request's `Idempotency-Key`.

    The admin guard has authenticated the caller already (an unauthenticated caller learns
    nothing about keys); `secret_fields` are left out of the stored result (a replay omits
    them).
    """
    if HEADER not in request.headers:
        return await handle()
    claim = await claim_of(request)
    assert claim is not None
    stored = await _begin(quotas, claim)
    if stored is not None:
        return replayed(stored.s, stored.b.encode())
    try:
        response = await handle()
    except BaseException:
        await _abandon(quotas, claim)
        raise
    status = response.status_code or 200
    if 200 <= status < 300 and isinstance(response.content, bytes):
        body = _storable(response.content, secret_fields)
        try:
            await quotas.idempotency_finish(claim, status, body)
        except QuotaUnavailable:
            log.warning("the result of an idempotent admin write could not be stored")
    else:
        await _abandon(quotas, claim)
    return response


async def _begin(quotas: QuotaStore, claim: Claim) -> Stored | None:
    try:
        return await quotas.idempotency_begin(claim)
    except IdempotencyConflict as exc:
        raise conflict(exc) from None
    except QuotaUnavailable:
        raise service_unavailable(
            "The store of idempotency keys is unavailable; nothing was done. Retry shortly."
        ) from None


async def _abandon(quotas: QuotaStore, claim: Claim) -> None:
    with contextlib.suppress(QuotaUnavailable):  # the claim then lapses by itself
        await quotas.idempotency_abandon(claim)
