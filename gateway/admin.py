"""The admin API (tenants, keys, balances, usage, invoices, health) and tenant usage.

Admin routes take `Authorization: Bearer <admin key>`; the admin key comes from the
environment variable named by `server.admin_key_env`. Without one the admin API refuses.
Balances live in the quota store: while it cannot be reached, the routes that read or move
them answer 503 (creating a prepaid tenant then stores nothing). Writes honour an
`Idempotency-Key` header (`gateway.admin_idempotency`); a top-up records it in the same
atomic step as the balance change.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import msgspec
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from billing.idempotency import IdempotencyConflict
from billing.invoice import TenantBilling, build_invoice, finalize_invoice
from billing.invoice_render import render_invoice
from billing.money import format_amount, to_nanos
from billing.quota import MAX_BALANCE_NANOS, Limits, QuotaUnavailable
from billing.reconcile import reconcile
from gateway.admin_idempotency import REPLAYED, claim_of, conflict, idempotent
from gateway.auth import Tenant
from gateway.errors import ApiError, invalid_request, service_unavailable

if TYPE_CHECKING:
    from gateway.app import Gateway

_encode = msgspec.json.Encoder().encode
_CONTENT_TYPES = {"json": "application/json", "csv": "text/csv", "html": "text/html"}


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    name: str = ""
    timezone: str = "UTC"
    currency: str = "USD"
    plan: str | None = None
    limits: dict[str, int | None] = {}
    balance: str | None = None
    tax_rate: str = "0"


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    models: list[str] | None = None
    expires_at: datetime | None = None
    limits: dict[str, int | None] | None = None


class TopUp(msgspec.Struct, forbid_unknown_fields=True):
    amount: str


def tenant_billing(tenant: Tenant) -> TenantBilling:
    return TenantBilling(
        tenant_id=tenant.id,
        name=tenant.name,
        timezone=tenant.timezone,
        currency=tenant.currency,
        tax_rate=tenant.tax_rate,
    )


def admin_routes(gw: Gateway) -> list[HTTPRouteHandler]:
    """The admin and usage route handlers, bound to one gateway."""

    def require_admin(request: Request[Any, Any, Any]) -> None:
        if not gw.admin_key:
            raise ApiError(
                403,
                "The admin API is disabled: set the admin key environment variable.",
                type="permission_error",
            )
        scheme, _, secret = (request.headers.get("authorization") or "").partition(" ")
        presented = secret.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(presented, gw.admin_key.encode()):
            raise ApiError(401, "Invalid admin key.", code="invalid_api_key")

    def tenant_or_404(tenant_id: str) -> Tenant:
        tenant = gw.directory.tenants.get(tenant_id)
        if tenant is None:
            raise ApiError(404, f"No tenant {tenant_id!r}.", code="tenant_not_found")
        return tenant

    async def body_of(request: Request[Any, Any, Any], kind: type[Any]) -> Any:
        try:
            return msgspec.json.decode(await request.body(), type=kind)
        except msgspec.ValidationError as exc:
            raise invalid_request(str(exc)) from None
        except msgspec.DecodeError:
            raise invalid_request("The request body is not valid JSON.") from None

    @get("/admin/tenants")
    async def list_tenants(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        return _json({"data": [_tenant_json(t) for t in gw.directory.tenants.values()]})

    once = functools.partial(idempotent, lambda: gw.quotas, require_admin)

    @post("/admin/tenants", status_code=201)
    @once()
    async def create_tenant(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        new = await body_of(request, NewTenant)
        if new.id in gw.directory.tenants:
            raise ApiError(409, f"Tenant {new.id!r} exists.", code="tenant_exists")
        try:
            ZoneInfo(new.timezone)
            limits = Limits(**new.limits)
            balance = Decimal(new.balance) if new.balance is not None else None
            balance_nanos = to_nanos(balance) if balance is not None else None
            tax_rate = Decimal(new.tax_rate)
        except (ValueError, ArithmeticError, KeyError) as exc:
            raise invalid_request(f"Invalid tenant: {exc}") from None
        if balance_nanos is not None and not 0 <= balance_nanos <= MAX_BALANCE_NANOS:
            raise invalid_request(
                f"An initial balance must be between 0 and {format_amount(MAX_BALANCE_NANOS)}.",
                param="balance",
            )
        if new.plan is not None and new.plan not in gw.settings.pricing.plans:
            raise invalid_request(f"Unknown plan {new.plan!r}.", param="plan")
        tenant = Tenant(
            id=new.id,
            name=new.name or new.id,
            timezone=new.timezone,
            currency=new.currency,
            plan=new.plan,
            limits=limits,
            prepaid=balance is not None,
            initial_balance=balance,
            tax_rate=tax_rate,
        )
        if balance_nanos is not None:
            with _quota_errors():  # a 503 now stores nothing, so the call can be repeated
                await gw.quotas.balance(tenant.id)
        await gw.directory_sync.create_tenant(tenant)  # stored first; 409 when taken
        if balance_nanos is not None:  # kept by the store if it has just become unreachable
            await gw.quotas.set_balance(tenant.id, balance_nanos)
        return _json(_tenant_json(tenant), 201)

    @post("/admin/tenants/{tenant_id:str}/keys", status_code=201)
    @once(secret_fields=("key",))  # a replay never shows the secret again
    async def create_key(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        tenant_id = request.path_params["tenant_id"]
        new = await body_of(request, NewKey)
        served = {m.name for m in gw.settings.models}
        for model in new.models or ():
            if model not in served:
                raise invalid_request(f"Unknown model {model!r}.", param="models")
        try:
            limits = Limits(**new.limits) if new.limits else None
        except ValueError as exc:
            raise invalid_request(f"Invalid key limits: {exc}", param="limits") from None
        created = await gw.directory_sync.create_key(
            tenant_id,
            name=new.name,
            models=frozenset(new.models) if new.models is not None else None,
            expires_at=new.expires_at,
            limits=limits,
            created_at=datetime.now(UTC),
        )
        if created is None:
            raise ApiError(404, f"No tenant {tenant_id!r}.", code="tenant_not_found")
        key, secret = created
        return _json({**key.public(), "key": secret}, 201)

    @get("/admin/tenants/{tenant_id:str}/keys")
    async def list_keys(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        tenant_id = request.path_params["tenant_id"]
        tenant_or_404(tenant_id)
        return _json({"data": [k.public() for k in gw.directory.keys_of(tenant_id)]})

    @post("/admin/keys/{key_id:str}/revoke", status_code=200)
    @once()
    async def revoke_key(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        key_id = request.path_params["key_id"]
        revoked = await gw.directory_sync.revoke(key_id)  # stored first; 409 for a file key
        if revoked is None:
            raise ApiError(404, f"No key {key_id!r}.", code="key_not_found")
        return _json(revoked.public())

    @post("/admin/tenants/{tenant_id:str}/topup", status_code=200)
    async def topup(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        tenant_id = request.path_params["tenant_id"]
        tenant = tenant_or_404(tenant_id)
        if not tenant.prepaid:
            raise invalid_request(f"Tenant {tenant_id!r} is not prepaid.")
        amount = (await body_of(request, TopUp)).amount
        try:
            nanos = to_nanos(Decimal(amount))
        except (ValueError, ArithmeticError):  # not a number, finer than 1e-9, infinite
            raise invalid_request(f"Invalid amount {amount!r}.", param="amount") from None
        if nanos <= 0:
            raise invalid_request("A top-up must be positive.", param="amount")
        claim = await claim_of(request)
        # A store that timed out may still apply the top-up: say so rather than invite a repeat.
        with _quota_errors(
            "The quota service is unavailable: repeat the top-up with the same Idempotency-Key"
            " (it is applied at most once), or check the balance before repeating it."
        ):
            try:
                if claim is None:
                    balance, again = await gw.quotas.topup(tenant_id, nanos), False
                else:  # the key is recorded in the same atomic step as the balance change
                    balance, again = await gw.quotas.topup_once(tenant_id, nanos, claim)
            except ValueError as exc:  # the balance would grow past the largest one
                raise invalid_request(f"Invalid top-up: {exc}.", param="amount") from None
            except IdempotencyConflict as exc:
                raise conflict(exc) from None
        response = _json({"tenant": tenant_id, "balance": format_amount(balance)})
        if again:
            response.headers[REPLAYED] = "true"
        return response

    @get("/admin/tenants/{tenant_id:str}/balance")
    async def balance(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        tenant_id = request.path_params["tenant_id"]
        tenant_or_404(tenant_id)
        with _quota_errors():
            nanos = await gw.quotas.balance(tenant_id)
        value = format_amount(nanos) if nanos is not None else None
        return _json({"tenant": tenant_id, "balance": value})

    @get("/admin/usage")
    async def admin_usage(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        tenant = request.query_params.get("tenant")
        zone = tenant_or_404(tenant).timezone if tenant else "UTC"
        start, end = _dates(request)
        return _json(await _usage(gw, tenant, start, end, zone))

    @get("/v1/usage")
    async def tenant_usage(request: Request[Any, Any, Any]) -> Response[Any]:
        _, tenant = gw.directory.authenticate(
            request.headers.get("authorization"), datetime.now(UTC)
        )
        start, end = _dates(request)
        return _json(await _usage(gw, tenant.id, start, end, tenant.timezone))

    @get("/admin/invoices/{tenant_id:str}/{month:str}")
    async def invoice(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        fmt = request.query_params.get("format", "json")
        if fmt not in _CONTENT_TYPES:
            raise invalid_request("format must be json, csv or html.", param="format")
        tenant = tenant_or_404(request.path_params["tenant_id"])
        month = _month(request.path_params["month"])
        await gw.ledger.flush()
        document = await build_invoice(gw.ledger, tenant_billing(tenant), month)
        return Response(render_invoice(document, fmt), media_type=_CONTENT_TYPES[fmt])  # type: ignore[arg-type]

    @post("/admin/invoices/{tenant_id:str}/{month:str}/finalize", status_code=200)
    @once()
    async def finalize(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        tenant = tenant_or_404(request.path_params["tenant_id"])
        month = _month(request.path_params["month"])
        await gw.ledger.flush()
        try:
            document = await finalize_invoice(gw.ledger, tenant_billing(tenant), month)
        except ValueError as exc:
            raise invalid_request(str(exc), param="month") from None
        return Response(render_invoice(document, "json"), media_type="application/json")

    @get("/admin/reconcile/{month:str}")
    async def reconcile_month(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        month = _month(request.path_params["month"])
        await gw.ledger.flush()
        tenants = [tenant_billing(t) for t in gw.directory.tenants.values()]
        report = await reconcile(gw.ledger, tenants, month)
        return _json(report.to_dict())

    @get("/admin/deployments")
    async def deployments(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        return _json({"data": gw.router.health()})

    return [
        list_tenants,
        create_tenant,
        create_key,
        list_keys,
        revoke_key,
        topup,
        balance,
        admin_usage,
        tenant_usage,
        invoice,
        finalize,
        reconcile_month,
        deployments,
    ]


async def _usage(
    gw: Gateway, tenant_id: str | None, start: date | None, end: date | None, zone: str
) -> dict[str, Any]:
    tz = ZoneInfo(zone)
    today = datetime.now(tz).date()
    first = start or today.replace(day=1)
    last = end or today
    if last < first:
        raise invalid_request("end is before start.", param="end")
    begin = datetime.combine(first, datetime.min.time(), tz)
    finish = datetime.combine(last + timedelta(days=1), datetime.min.time(), tz)
    await gw.ledger.flush()
    rows = await gw.ledger.usage(tenant_id, begin, finish, zone)
    data = [row.as_dict() for row in rows]  # costs as exact nanos and as a decimal string
    return {"object": "list", "start": first.isoformat(), "end": last.isoformat(), "data": data}


def _dates(request: Request[Any, Any, Any]) -> tuple[date | None, date | None]:
    found = []
    for name in ("start", "end"):
        value = request.query_params.get(name)
        try:
            found.append(date.fromisoformat(value) if value else None)
        except ValueError:
            raise invalid_request(f"{name} must be a date like 2026-11-01.", param=name) from None
    return found[0], found[1]


def _month(value: str) -> str:
    try:
        datetime.strptime(value, "%Y-%m")
    except ValueError:
        raise invalid_request("month must look like 2026-11.", param="month") from None
    return value


@contextmanager
def _quota_errors(
    message: str = "The quota service is unavailable. Retry shortly.",
) -> Iterator[None]:
    """The quota store being unreachable, as an OpenAI-shaped 503."""
    try:
        yield
    except QuotaUnavailable:
        raise service_unavailable(message) from None


def _tenant_json(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "timezone": tenant.timezone,
        "currency": tenant.currency,
        "plan": tenant.plan,
        "prepaid": tenant.prepaid,
        "limits": tenant.limits.model_dump(),
    }


def _json(body: Any, status: int = 200) -> Response[Any]:
    return Response(_encode(body), status_code=status, media_type="application/json")
