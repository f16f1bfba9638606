"""The admin API (tenants, keys, balances, usage, invoices, health) and tenant usage.

One Litestar controller per resource. Admin routes take `Authorization: Bearer <admin
key>`, checked by one guard (`AdminGuard`); the admin key comes from the environment
variable named by `server.admin_key_env`. Without one the admin API refuses. Handlers get
the services they use (directory, quota store, ledger, ...) injected from the serving
`gateway.state.AppState`.
Balances live in the quota store: while it cannot be reached, the routes that read or move
them answer 503 (creating a prepaid tenant then stores nothing). Writes honour an
`Idempotency-Key` header (`gateway.admin_idempotency`); a top-up records it in the same
atomic step as the balance change.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from litestar import Controller, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath

from billing.idempotency import IdempotencyConflict
from billing.invoice import TenantBilling, build_invoice, finalize_invoice
from billing.invoice_render import render_invoice
from billing.ledger import Ledger
from billing.money import format_amount, to_nanos
from billing.quota import MAX_BALANCE_NANOS, Limits, QuotaStore, QuotaUnavailable
from billing.reconcile import reconcile
from gateway.admin_idempotency import REPLAYED, claim_of, conflict, once
from gateway.auth import Directory, Tenant
from gateway.config import Settings
from gateway.errors import ApiError, invalid_request, service_unavailable
from gateway.keystore import DirectorySync
from gateway.routing import Router as DeploymentRouter
from gateway.state import AppState

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


def admin_routes(state: Callable[[], AppState]) -> list[Router]:
    """The admin API (behind `AdminGuard`) and the tenants' own usage route, their
    dependencies drawn from `state()`, the serving state."""
    dependencies = _dependencies(state)
    admin = Router(
        path="/",
        route_handlers=[
            TenantsController,
            KeysController,
            BalancesController,
            UsageController,
            InvoicesController,
            DeploymentsController,
        ],
        guards=[AdminGuard(state)],
        dependencies=dependencies,
    )
    tenants = Router(path="/", route_handlers=[TenantUsageController], dependencies=dependencies)
    return [admin, tenants]


def _dependencies(state: Callable[[], AppState]) -> dict[str, Provide]:
    def settings() -> Settings:
        return state().settings

    def directory() -> Directory:
        return state().directory

    def directory_sync() -> DirectorySync:
        return state().directory_sync

    def quotas() -> QuotaStore:
        return state().quotas

    def ledger() -> Ledger:
        return state().ledger

    def deployments() -> DeploymentRouter:
        return state().router

    found = (settings, directory, directory_sync, quotas, ledger, deployments)
    return {f.__name__: Provide(f, sync_to_thread=False) for f in found}


@dataclass(frozen=True, slots=True)
class AdminGuard:
    """Lets a request through only with `Authorization: Bearer <admin key>` (compared in
    constant time): 401 otherwise, 403 for every request while no admin key is set."""

    state: Callable[[], AppState]

    def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
    ) -> None:
        admin_key = self.state().admin_key
        if not admin_key:
            raise ApiError(
                403,
                "The admin API is disabled: set the admin key environment variable.",
                type="permission_error",
            )
        scheme, _, secret = (connection.headers.get("authorization") or "").partition(" ")
        presented = secret.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(presented, admin_key.encode()):
            raise ApiError(401, "Invalid admin key.", code="invalid_api_key")


class TenantsController(Controller):
    """`/admin/tenants`: list and create tenants."""

    path = "/admin/tenants"

    @get("/")
    async def list_tenants(self, directory: NamedDependency[Directory]) -> Response[Any]:
        return _json({"data": [_tenant_json(t) for t in directory.tenants.values()]})

    @post("/", status_code=201)
    async def create_tenant(
        self,
        request: Request[Any, Any, Any],
        settings: NamedDependency[Settings],
        directory: NamedDependency[Directory],
        directory_sync: NamedDependency[DirectorySync],
        quotas: NamedDependency[QuotaStore],
    ) -> Response[Any]:
        async def create() -> Response[Any]:
            new = await _body_of(request, NewTenant)
            tenant, balance_nanos = _new_tenant(new, settings, directory)
            if balance_nanos is not None:
                with _quota_errors():  # a 503 now stores nothing, so the call can be repeated
                    await quotas.balance(tenant.id)
            await directory_sync.create_tenant(tenant)  # stored first; 409 when taken
            if balance_nanos is not None:  # kept by the store if it has just become unreachable
                await quotas.set_balance(tenant.id, balance_nanos)
            return _json(_tenant_json(tenant), 201)

        return await once(request, quotas, create)


class KeysController(Controller):
    """A tenant's API keys: create, list, revoke."""

    path = "/admin"

    @post("/tenants/{tenant_id:str}/keys", status_code=201)
    async def create_key(
        self,
        request: Request[Any, Any, Any],
        tenant_id: FromPath[str],
        settings: NamedDependency[Settings],
        directory_sync: NamedDependency[DirectorySync],
        quotas: NamedDependency[QuotaStore],
    ) -> Response[Any]:
        async def create() -> Response[Any]:
            new = await _body_of(request, NewKey)
            served = {m.name for m in settings.models}
            for model in new.models or ():
                if model not in served:
                    raise invalid_request(f"Unknown model {model!r}.", param="models")
            try:
                limits = Limits(**new.limits) if new.limits else None
            except ValueError as exc:
                raise invalid_request(f"Invalid key limits: {exc}", param="limits") from None
            created = await directory_sync.create_key(
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

        # a replay never shows the secret again
        return await once(request, quotas, create, secret_fields=("key",))

    @get("/tenants/{tenant_id:str}/keys")
    async def list_keys(
        self, tenant_id: FromPath[str], directory: NamedDependency[Directory]
    ) -> Response[Any]:
        _tenant_or_404(directory, tenant_id)
        return _json({"data": [k.public() for k in directory.keys_of(tenant_id)]})

    @post("/keys/{key_id:str}/revoke", status_code=200)
    async def revoke_key(
        self,
        request: Request[Any, Any, Any],
        key_id: FromPath[str],
        directory_sync: NamedDependency[DirectorySync],
        quotas: NamedDependency[QuotaStore],
    ) -> Response[Any]:
        async def revoke() -> Response[Any]:
            revoked = await directory_sync.revoke(key_id)  # stored first; 409 for a file key
            if revoked is None:
                raise ApiError(404, f"No key {key_id!r}.", code="key_not_found")
            return _json(revoked.public())

        return await once(request, quotas, revoke)


class BalancesController(Controller):
    """A prepaid tenant's balance: top-ups and the balance now."""

    path = "/admin/tenants/{tenant_id:str}"

    @post("/topup", status_code=200)
    async def topup(
        self,
        request: Request[Any, Any, Any],
        tenant_id: FromPath[str],
        directory: NamedDependency[Directory],
        quotas: NamedDependency[QuotaStore],
    ) -> Response[Any]:
        tenant = _tenant_or_404(directory, tenant_id)
        if not tenant.prepaid:
            raise invalid_request(f"Tenant {tenant_id!r} is not prepaid.")
        amount = (await _body_of(request, TopUp)).amount
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
                    balance, again = await quotas.topup(tenant_id, nanos), False
                else:  # the key is recorded in the same atomic step as the balance change
                    balance, again = await quotas.topup_once(tenant_id, nanos, claim)
            except ValueError as exc:  # the balance would grow past the largest one
                raise invalid_request(f"Invalid top-up: {exc}.", param="amount") from None
            except IdempotencyConflict as exc:
                raise conflict(exc) from None
        response = _json({"tenant": tenant_id, "balance": format_amount(balance)})
        if again:
            response.headers[REPLAYED] = "true"
        return response

    @get("/balance")
    async def balance(
        self,
        tenant_id: FromPath[str],
        directory: NamedDependency[Directory],
        quotas: NamedDependency[QuotaStore],
    ) -> Response[Any]:
        _tenant_or_404(directory, tenant_id)
        with _quota_errors():
            nanos = await quotas.balance(tenant_id)
        value = format_amount(nanos) if nanos is not None else None
        return _json({"tenant": tenant_id, "balance": value})


class UsageController(Controller):
    """`/admin/usage`: every tenant's usage, or one's (`?tenant=`)."""

    path = "/admin/usage"

    @get("/")
    async def admin_usage(
        self,
        request: Request[Any, Any, Any],
        directory: NamedDependency[Directory],
        ledger: NamedDependency[Ledger],
    ) -> Response[Any]:
        tenant = request.query_params.get("tenant")
        zone = _tenant_or_404(directory, tenant).timezone if tenant else "UTC"
        start, end = _dates(request)
        return _json(await _usage(ledger, tenant, start, end, zone))


class TenantUsageController(Controller):
    """`/v1/usage`: a tenant's own usage, with its own API key (no admin key)."""

    path = "/v1/usage"

    @get("/")
    async def tenant_usage(
        self,
        request: Request[Any, Any, Any],
        directory: NamedDependency[Directory],
        ledger: NamedDependency[Ledger],
    ) -> Response[Any]:
        _, tenant = directory.authenticate(request.headers.get("authorization"), datetime.now(UTC))
        start, end = _dates(request)
        return _json(await _usage(ledger, tenant.id, start, end, tenant.timezone))


class InvoicesController(Controller):
    """A tenant's monthly invoice (draft or finalised) and the month's reconciliation."""

    path = "/admin"

    @get("/invoices/{tenant_id:str}/{month:str}")
    async def invoice(
        self,
        request: Request[Any, Any, Any],
        tenant_id: FromPath[str],
        month: FromPath[str],
        directory: NamedDependency[Directory],
        ledger: NamedDependency[Ledger],
    ) -> Response[Any]:
        fmt = request.query_params.get("format", "json")
        if fmt not in _CONTENT_TYPES:
            raise invalid_request("format must be json, csv or html.", param="format")
        tenant = _tenant_or_404(directory, tenant_id)
        month = _month(month)
        await ledger.flush()
        document = await build_invoice(ledger, tenant_billing(tenant), month)
        return Response(render_invoice(document, fmt), media_type=_CONTENT_TYPES[fmt])  # type: ignore[arg-type]

    @post("/invoices/{tenant_id:str}/{month:str}/finalize", status_code=200)
    async def finalize(
        self,
        request: Request[Any, Any, Any],
        tenant_id: FromPath[str],
        month: FromPath[str],
        directory: NamedDependency[Directory],
        ledger: NamedDependency[Ledger],
        quotas: NamedDependency[QuotaStore],
    ) -> Response[Any]:
        async def finalize() -> Response[Any]:
            tenant = _tenant_or_404(directory, tenant_id)
            await ledger.flush()
            try:
                document = await finalize_invoice(ledger, tenant_billing(tenant), _month(month))
            except ValueError as exc:
                raise invalid_request(str(exc), param="month") from None
            return Response(render_invoice(document, "json"), media_type="application/json")

        return await once(request, quotas, finalize)

    @get("/reconcile/{month:str}")
    async def reconcile_month(
        self,
        month: FromPath[str],
        directory: NamedDependency[Directory],
        ledger: NamedDependency[Ledger],
    ) -> Response[Any]:
        month = _month(month)
        await ledger.flush()
        tenants = [tenant_billing(t) for t in directory.tenants.values()]
        report = await reconcile(ledger, tenants, month)
        return _json(report.to_dict())


class DeploymentsController(Controller):
    """`/admin/deployments`: every deployment's health and load."""

    path = "/admin/deployments"

    @get("/")
    async def deployments(self, deployments: NamedDependency[DeploymentRouter]) -> Response[Any]:
        return _json({"data": deployments.health()})


def _new_tenant(
    new: NewTenant, settings: Settings, directory: Directory
) -> tuple[Tenant, int | None]:
    """The tenant a creation request describes and its initial balance (nanos); 4xx if bad."""
    if new.id in directory.tenants:
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
    if new.plan is not None and new.plan not in settings.pricing.plans:
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
    return tenant, balance_nanos


def _tenant_or_404(directory: Directory, tenant_id: str) -> Tenant:
    tenant = directory.tenants.get(tenant_id)
    if tenant is None:
        raise ApiError(404, f"No tenant {tenant_id!r}.", code="tenant_not_found")
    return tenant


async def _body_of(request: Request[Any, Any, Any], kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except msgspec.ValidationError as exc:
        raise invalid_request(str(exc)) from None
    except msgspec.DecodeError:
        raise invalid_request("The request body is not valid JSON.") from None


async def _usage(
    ledger: Ledger, tenant_id: str | None, start: date | None, end: date | None, zone: str
) -> dict[str, Any]:
    tz = ZoneInfo(zone)
    today = datetime.now(tz).date()
    first = start or today.replace(day=1)
    last = end or today
    if last < first:
        raise invalid_request("end is before start.", param="end")
    begin = datetime.combine(first, datetime.min.time(), tz)
    finish = datetime.combine(last + timedelta(days=1), datetime.min.time(), tz)
    await ledger.flush()
    rows = await ledger.usage(tenant_id, begin, finish, zone)
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
