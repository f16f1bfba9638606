"""The console's pages under `/console/`: sign-in, tenant, finance and operator pages.

Every page needs a signed-in session (a server-side row keyed by the sha256 of the cookie);
every form carries the session's CSRF token (the sign-in form a cookie-bound one) and a
POST without the right one is refused with 403. A tenant's user reaches only its own
tenant's pages: any other tenant's URL answers 404, exactly like a tenant that does not
exist. Operator users (admin, finance) may read every tenant's pages.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import time
import zipfile
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.handlers import HTTPRouteHandler
from litestar.response import Redirect, Stream
from litestar.static_files import create_static_files_router

from billing.idempotency import Claim, IdempotencyConflict, check_key, fingerprint
from billing.invoice import (
    Invoice,
    TenantBilling,
    build_invoice,
    finalize_invoice,
    month_of,
    next_month,
    parse_month,
)
from billing.invoice_render import render_invoice
from billing.money import format_amount, to_nanos
from billing.quota import QuotaUnavailable, Scope
from billing.reconcile import reconcile
from billing.store.invoices import invoice_numbers
from billing.store.usage import Sums, first_bucket, rollup_sums
from gateway.auth import Tenant
from gateway.console import charts, data
from gateway.console.render import invoice_html, invoice_pdf, invoice_view, render
from gateway.console.security import LoginLimiter, csrf_ok
from gateway.console.users import Session, User, UserError, UserStore

if TYPE_CHECKING:
    from gateway.lifespan import Gateway

log = logging.getLogger("maas.console")

COOKIE = "maas_console"
LOGIN_COOKIE = "maas_console_login"
STATIC_DIR = Path(__file__).resolve().parent / "static"
DEMO_TENANT_USER = "demo"
DEMO_OPERATOR_USER = "operator"
_DASHBOARDS = (
    ("Overview", "maas-overview"),
    ("Providers", "maas-provider"),
    ("Tenant", "maas-tenant"),
)
AnyRequest = Request[Any, Any, Any]


class Refused(Exception):
    """Stop a console handler with a ready response (a redirect, a 403 or a 404 page)."""

    def __init__(self, response: Response[Any]) -> None:
        super().__init__(response.status_code)
        self.response = response


def _refused(_: AnyRequest, exc: Exception) -> Response[Any]:
    assert isinstance(exc, Refused)
    return exc.response


def _html(body: str, status: int = 200, **headers: str) -> Response[Any]:
    return Response(
        body,
        status_code=status,
        media_type="text/html",
        headers={"cache-control": "no-store", **headers},
    )


class Console:
    """The console's state: its users, sessions and sign-in throttle, over one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.config = gw.settings.console
        self.limiter = LoginLimiter(self.config.login_attempts, self.config.login_window_s)
        self._store: UserStore | None = None
        self._lock = asyncio.Lock()

    async def store(self) -> UserStore:
        """The user store, made on first use (the demo users are then written)."""
        if self._store is None:
            async with self._lock:
                if self._store is None:
                    store = UserStore(self.gw.ledger.engine)
                    await self._create_demo_users(store)
                    self._store = store
        return self._store

    async def _create_demo_users(self, store: UserStore) -> None:
        env = self.config.demo_password_env
        password = os.environ.get(env) if env else None
        if not password or not self.gw.directory.tenants:
            return
        tenant_id = next(iter(self.gw.directory.tenants))
        for username, role, tenant in (
            (DEMO_TENANT_USER, "owner", tenant_id),
            (DEMO_OPERATOR_USER, "admin", None),
        ):
            # Another worker may have written them already: keep theirs (and its sessions).
            if await store.authenticate(username, password) is not None:
                continue
            try:
                await store.create(username, password, role, tenant, replace=True)
            except UserError:  # written by another worker just now
                log.info("demo console user %s was created by another worker", username)

    # -- pages ------------------------------------------------------------------------

    def page(
        self,
        template: str,
        session: Session | None,
        *,
        status: int = 200,
        started: float | None = None,
        **context: Any,
    ) -> Response[Any]:
        user = session.user if session else None
        body = render(
            template,
            user=user,
            csrf=session.csrf if session else "",
            tenants=self._visible_tenants(user),
            grafana=self.config.grafana_url,
            **context,
        )
        headers = {}
        if started is not None:
            headers["server-timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        return _html(body, status, **headers)

    def _visible_tenants(self, user: User | None) -> list[Tenant]:
        if user is None:
            return []
        if user.is_operator:
            return list(self.gw.directory.tenants.values())
        tenant = self.gw.directory.tenants.get(user.tenant_id or "")
        return [tenant] if tenant else []

    def not_found(self, session: Session | None) -> Refused:
        return Refused(
            self.page(
                "message.html",
                session,
                status=404,
                title="Not found",
                message="There is no such page.",
            )
        )

    def forbidden(self, session: Session | None, message: str) -> Refused:
        return Refused(
            self.page("message.html", session, status=403, title="Refused", message=message)
        )

    async def session(self, request: AnyRequest) -> Session:
        """The signed-in session, or a redirect to the sign-in page."""
        store = await self.store()
        found = await store.session(request.cookies.get(COOKIE))
        if found is None:
            raise Refused(Redirect("/console/login", status_code=303))
        return found

    async def form(self, request: AnyRequest, session: Session) -> dict[str, str]:
        """A POSTed form, once its CSRF token matches the session's (else 403)."""
        form = await request.form()
        values = {key: str(value) for key, value in form.items()}
        if not csrf_ok(session.csrf, values.get("csrf_token")):
            raise self.forbidden(session, "The form's CSRF token is missing or wrong.")
        return values

    def tenant_for(
        self, session: Session, tenant_id: str, roles: tuple[str, ...] | None = None
    ) -> Tenant:
        """The tenant if this user may see it (and has one of `roles`), else 404/403."""
        user = session.user
        tenant = self.gw.directory.tenants.get(tenant_id)
        if tenant is None or (not user.is_operator and user.tenant_id != tenant_id):
            raise self.not_found(session)
        if roles is not None and user.role not in roles:
            raise self.forbidden(session, "Your role may not do this.")
        return tenant

    def operator(self, session: Session, roles: tuple[str, ...]) -> User:
        user = session.user
        if not user.is_operator:
            raise self.not_found(session)
        if user.role not in roles:
            raise self.forbidden(session, "Your role may not do this.")
        return user

    def cookie(self, value: str, max_age: int) -> Cookie:
        return Cookie(
            key=COOKIE,
            value=value,
            path="/console",
            httponly=True,
            samesite="lax",
            secure=self.config.secure_cookies,
            max_age=max_age,
        )


def home_of(user: User) -> str:
    if user.tenant_id is not None:
        return f"/console/tenants/{user.tenant_id}/"
    return "/console/finance/" if user.role == "finance" else "/console/ops/"


def console_router(console: Console) -> Router:
    """The console's route handlers, bound to one gateway, under `/console`."""
    gw = console.gw

    @get("/")
    async def index(request: AnyRequest) -> Response[Any]:
        session = await console.session(request)
        return Redirect(home_of(session.user), status_code=303)

    # -- sign-in ----------------------------------------------------------------------

    @get("/login")
    async def login_page(request: AnyRequest) -> Response[Any]:
        token = secrets.token_urlsafe(24)
        response = console.page("login.html", None, login_csrf=token, error=None)
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            path="/console/login",
            httponly=True,
            samesite="strict",
            secure=console.config.secure_cookies,
        )
        return response

    @post("/login", status_code=303)
    async def login(request: AnyRequest) -> Response[Any]:
        form = {key: str(value) for key, value in (await request.form()).items()}
        expected = request.cookies.get(LOGIN_COOKIE)
        if not expected or not csrf_ok(expected, form.get("csrf_token")):
            return console.page(
                "message.html",
                None,
                status=403,
                title="Refused",
                message="The form's CSRF token is missing or wrong: reload the sign-in page.",
            )
        username = form.get("username", "").strip()
        password = form.get("password", "")
        address = request.client.host if request.client else "?"
        wait = console.limiter.retry_after(username, address)
        if wait:
            response = console.page(
                "login.html",
                None,
                status=429,
                login_csrf=expected,
                error=f"Too many failed sign-ins. Try again in {wait} s.",
            )
            response.headers["retry-after"] = str(wait)
            return response
        store = await console.store()
        user = await store.authenticate(username, password)
        if user is None:
            console.limiter.failed(username, address)
            return console.page(
                "login.html",
                None,
                status=401,
                login_csrf=expected,
                error="Wrong username or password.",
            )
        console.limiter.succeeded(username)
        ttl = timedelta(minutes=console.config.session_ttl_minutes)
        token, _ = await store.open_session(user, ttl)
        response = Redirect(home_of(user), status_code=303)
        response.cookies.append(console.cookie(token, int(ttl.total_seconds())))
        return response

    @post("/logout", status_code=303)
    async def logout(request: AnyRequest) -> Response[Any]:
        session = await console.session(request)
        await console.form(request, session)
        store = await console.store()
        await store.close_session(request.cookies.get(COOKIE, ""))
        response = Redirect("/console/login", status_code=303)
        response.cookies.append(console.cookie("", 0))
        return response

    # -- tenant pages -----------------------------------------------------------------

    @get("/tenants/{tenant_id:str}/")
    async def overview(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        started = time.perf_counter()
        session = await console.session(request)
        tenant = console.tenant_for(session, tenant_id)
        month = data.current_month(tenant.timezone)
        usage = await data.tenant_month(gw.ledger, tenant.id, tenant.timezone, month)
        peak = await data.busiest_quarter(gw.ledger, tenant.id, tenant.timezone, month)
        now = datetime.now(UTC)
        balance = remaining = None
        quota_note = None
        try:
            if tenant.prepaid:
                balance = await gw.quotas.balance(tenant.id)
            remaining = await gw.quotas.remaining(
                Scope(f"tenant:{tenant.id}", tenant.limits, tenant.timezone), now
            )
        except QuotaUnavailable:
            quota_note = "The quota service is unavailable: balance and limits are not shown."
        days = data.month_days(month)
        limits = _limit_rows(tenant, remaining, peak)
        models = sorted(usage.by_model.items(), key=lambda kv: -kv[1].cost_nanos)
        day_tokens = [(d.strftime("%d"), usage.by_day.get(d, Sums()).tokens) for d in days]
        day_cost = [(d.strftime("%d"), usage.by_day.get(d, Sums()).cost_nanos / 1e9) for d in days]
        return console.page(
            "overview.html",
            session,
            started=started,
            tenant=tenant,
            month=month,
            usage=usage,
            balance=balance,
            limits=limits,
            budget=tenant.limits.tokens_per_month,
            quota_note=quota_note,
            models=models,
            charts={
                "tokens_day": charts.bar_chart(day_tokens, title="Tokens per day"),
                "cost_day": charts.bar_chart(
                    day_cost, title="Cost per day", unit=tenant.currency, color=charts.ALT
                ),
                "tokens_model": charts.hbar_chart(
                    [(m, t.tokens) for m, t in models], title="Tokens per model"
                ),
                "cost_model": charts.hbar_chart(
                    [(m, t.cost_nanos / 1e9) for m, t in models],
                    title="Cost per model",
                    unit=tenant.currency,
                ),
            },
        )

    @get("/tenants/{tenant_id:str}/keys")
    async def keys_page(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        session = await console.session(request)
        tenant = console.tenant_for(session, tenant_id, ("owner", "member", "admin"))
        return _keys_response(console, session, tenant, created=None)

    @post("/tenants/{tenant_id:str}/keys", status_code=200)
    async def create_key(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        session = await console.session(request)
        form = await console.form(request, session)
        tenant = console.tenant_for(session, tenant_id, ("owner", "admin"))
        served = {m.name for m in gw.settings.models}
        chosen = [m for m in served if form.get(f"model:{m}")]
        expires_at = None
        if form.get("expires"):
            try:
                day = date.fromisoformat(form["expires"])
            except ValueError:
                return _keys_response(console, session, tenant, None, "Expiry must be a date.", 400)
            expires_at = datetime.combine(day, datetime.min.time(), ZoneInfo(tenant.timezone))
            if expires_at <= datetime.now(UTC):
                return _keys_response(
                    console, session, tenant, None, "Expiry must be in the future.", 400
                )
        created = await gw.directory_sync.create_key(
            tenant.id,
            name=form.get("name", "")[:200],
            models=frozenset(chosen) if chosen else None,
            expires_at=expires_at,
            created_at=datetime.now(UTC),
        )
        if created is None:
            raise console.not_found(session)
        return _keys_response(console, session, tenant, created=created)

    @post("/tenants/{tenant_id:str}/keys/{key_id:str}/revoke", status_code=303)
    async def revoke_key(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        key_id = request.path_params["key_id"]
        session = await console.session(request)
        await console.form(request, session)
        tenant = console.tenant_for(session, tenant_id, ("owner", "admin"))
        key = gw.directory.key(key_id)
        if key is None or key.tenant_id != tenant.id:
            raise console.not_found(session)
        if not gw.directory.is_stored_key(key_id):
            return _keys_response(
                console,
                session,
                tenant,
                None,
                "This key is defined in the configuration file; revoke it there.",
                409,
            )
        await gw.directory_sync.revoke(key_id)
        return Redirect(f"/console/tenants/{tenant.id}/keys", status_code=303)

    @get("/tenants/{tenant_id:str}/invoices")
    async def invoices_page(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        session = await console.session(request)
        tenant = console.tenant_for(session, tenant_id, _INVOICE_ROLES)
        months = await _invoice_months(gw, tenant)
        final = await invoice_numbers(gw.ledger.engine, tenant.id)
        return console.page("invoices.html", session, tenant=tenant, months=months, final=final)

    async def tenant_invoice(request: AnyRequest) -> tuple[Session, Tenant, str, Invoice]:
        """The invoice a page asks for, once the session may read that tenant's invoices."""
        month = request.path_params["month"]
        session = await console.session(request)
        tenant = console.tenant_for(session, request.path_params["tenant_id"], _INVOICE_ROLES)
        return session, tenant, month, await _invoice(console, session, tenant, month)

    @get("/tenants/{tenant_id:str}/invoices/{month:str}")
    async def invoice_page(request: AnyRequest) -> Response[Any]:
        session, tenant, month, invoice = await tenant_invoice(request)
        return console.page(
            "invoice.html",
            session,
            tenant=tenant,
            month=month,
            document=invoice_html(invoice_view(invoice, console.config)),
        )

    @get("/tenants/{tenant_id:str}/invoices/{month:str}/pdf")
    async def invoice_pdf_file(request: AnyRequest) -> Response[Any]:
        _, _, _, invoice = await tenant_invoice(request)
        pdf = await asyncio.to_thread(invoice_pdf, invoice_view(invoice, console.config))
        return _download(pdf, "application/pdf", f"{invoice.number}.pdf")

    @get("/tenants/{tenant_id:str}/invoices/{month:str}/csv")
    async def invoice_csv_file(request: AnyRequest) -> Response[Any]:
        _, _, _, invoice = await tenant_invoice(request)
        return _download(
            render_invoice(invoice, "csv").encode(), "text/csv", f"{invoice.number}.csv"
        )

    @get("/tenants/{tenant_id:str}/usage")
    async def usage_page(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        session = await console.session(request)
        tenant = console.tenant_for(session, tenant_id)
        today = datetime.now(ZoneInfo(tenant.timezone)).date()
        return console.page(
            "usage.html", session, tenant=tenant, start=today.replace(day=1), end=today
        )

    @get("/tenants/{tenant_id:str}/usage/export")
    async def usage_export(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        session = await console.session(request)
        tenant = console.tenant_for(session, tenant_id)
        zone = ZoneInfo(tenant.timezone)
        try:
            first = date.fromisoformat(request.query_params.get("start", ""))
            last = date.fromisoformat(request.query_params.get("end", ""))
        except ValueError:
            raise Refused(
                console.page(
                    "message.html",
                    session,
                    status=400,
                    title="Bad dates",
                    message="Give start and end as dates like 2026-11-01.",
                )
            ) from None
        if last < first:
            raise Refused(
                console.page(
                    "message.html",
                    session,
                    status=400,
                    title="Bad dates",
                    message="The end is before the start.",
                )
            )
        await gw.ledger.flush()
        begin = datetime.combine(first, datetime.min.time(), zone)
        finish = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone)
        name = f"usage-{tenant.id}-{first.isoformat()}-{last.isoformat()}.csv"
        return Stream(
            data.usage_csv(gw.ledger, tenant.id, begin, finish),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    @get("/tenants/{tenant_id:str}/prices")
    async def prices_page(request: AnyRequest) -> Response[Any]:
        tenant_id = request.path_params["tenant_id"]
        session = await console.session(request)
        tenant = console.tenant_for(session, tenant_id)
        return console.page("prices.html", session, tenant=tenant, sheet=_price_sheet(gw, tenant))

    # -- finance ----------------------------------------------------------------------

    @get("/finance/")
    async def finance_page(request: AnyRequest) -> Response[Any]:
        session = await console.session(request)
        console.operator(session, _FINANCE_ROLES)
        month = request.query_params.get("month") or month_of(datetime.now(UTC), "UTC")
        try:
            parse_month(month)
        except ValueError:
            raise console.not_found(session) from None
        zones = {t.id: t.timezone for t in gw.directory.tenants.values()}
        breakdown = await data.month_breakdown(gw.ledger, zones, month)
        balances: dict[str, int | None] = {}
        for tenant in gw.directory.tenants.values():
            if tenant.prepaid:
                try:
                    balances[tenant.id] = await gw.quotas.balance(tenant.id)
                except QuotaUnavailable:
                    balances[tenant.id] = None
        previous = _previous_month(month)
        return console.page(
            "finance.html",
            session,
            month=month,
            previous=previous,
            following=next_month(month),
            breakdown=breakdown,
            balances=balances,
            directory=gw.directory.tenants,
            message=request.query_params.get("message"),
            topup_key=secrets.token_urlsafe(18),  # one per form: a resubmission applies once
        )

    @post("/finance/close", status_code=303)
    async def close_month(request: AnyRequest) -> Response[Any]:
        session = await console.session(request)
        form = await console.form(request, session)
        console.operator(session, _FINANCE_ROLES)
        month = form.get("month", "")
        try:
            parse_month(month)
        except ValueError:
            raise console.forbidden(session, "month must look like 2026-11.") from None
        await gw.ledger.flush()
        from gateway.admin import tenant_billing

        problems = []
        for tenant in gw.directory.tenants.values():
            try:
                await finalize_invoice(gw.ledger, tenant_billing(tenant), month)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            return console.page(
                "message.html",
                session,
                status=409,
                title=f"{month} cannot be closed yet",
                message=" ".join(problems),
            )
        return Redirect(f"/console/finance/months/{month}", status_code=303)

    async def month_invoices(
        request: AnyRequest,
    ) -> tuple[Session, str, list[TenantBilling], list[Invoice]]:
        """A finance user's month: the session, the month, every tenant's billing and invoice."""
        month = request.path_params["month"]
        session = await console.session(request)
        console.operator(session, _FINANCE_ROLES)
        from gateway.admin import tenant_billing

        try:
            parse_month(month)
        except ValueError:
            raise console.not_found(session) from None
        await gw.ledger.flush()
        billings = [tenant_billing(t) for t in gw.directory.tenants.values()]
        invoices = [await build_invoice(gw.ledger, billing, month) for billing in billings]
        return session, month, billings, invoices

    @get("/finance/months/{month:str}")
    async def month_page(request: AnyRequest) -> Response[Any]:
        session, month, billings, invoices = await month_invoices(request)
        report = await reconcile(gw.ledger, billings, month)
        return console.page("month.html", session, month=month, invoices=invoices, report=report)

    @get("/finance/months/{month:str}/archive")
    async def month_archive(request: AnyRequest) -> Response[Any]:
        _, month, _, invoices = await month_invoices(request)
        views = [invoice_view(invoice, console.config) for invoice in invoices]

        def pack() -> bytes:
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
                rows = io.StringIO()
                for index, view in enumerate(views):
                    archive.writestr(f"{view.invoice.number}.pdf", invoice_pdf(view))
                    text = render_invoice(view.invoice, "csv")
                    rows.write(text if index == 0 else text.split("\r\n", 1)[1])
                archive.writestr(f"invoices-{month}.csv", rows.getvalue())
            return out.getvalue()

        body = await asyncio.to_thread(pack)
        return _download(body, "application/zip", f"invoices-{month}.zip")

    @post("/finance/topup", status_code=303)
    async def topup(request: AnyRequest) -> Response[Any]:
        session = await console.session(request)
        form = await console.form(request, session)
        console.operator(session, _FINANCE_ROLES)
        tenant = gw.directory.tenants.get(form.get("tenant", ""))
        message: str
        try:
            if tenant is None or not tenant.prepaid:
                raise ValueError("choose a prepaid tenant")
            nanos = to_nanos(Decimal(form.get("amount", "")))
            if nanos <= 0:
                raise ValueError("a top-up must be positive")
            key = form.get("idempotency_key", "")
            if check_key(key) is not None:
                raise ValueError("the form is stale: reload the page")
            what = f"{tenant.id} {nanos}".encode()
            claim = Claim(f"console-topup:{key}", fingerprint("POST", "/console/topup", what))
            balance, replayed = await gw.quotas.topup_once(tenant.id, nanos, claim)
            message = (
                f"That top-up was already applied: the balance of {tenant.id} is"
                f" {format_amount(balance)}."
                if replayed
                else f"Topped up {tenant.id}: the balance is now {format_amount(balance)}."
            )
        except (ValueError, InvalidOperation, ArithmeticError) as exc:
            message = f"No top-up: {exc}."
        except IdempotencyConflict:
            message = "No top-up: this form was already used for another top-up; reload the page."
        except QuotaUnavailable:
            message = "The quota service is unavailable: check the balance before repeating."
        from urllib.parse import urlencode

        return Redirect("/console/finance/?" + urlencode({"message": message}), status_code=303)

    # -- operator ---------------------------------------------------------------------

    @get("/ops/")
    async def ops_page(request: AnyRequest) -> Response[Any]:
        session = await console.session(request)
        console.operator(session, ("admin",))
        await gw.ledger.flush()
        live = await data.live_stats(gw.ledger, list(gw.directory.tenants))
        since = int(time.time()) - 3600
        first = since - since % 900
        groups = await rollup_sums(gw.ledger.engine, by=("deployment",), first=first)
        hour = {g.key[0]: (g.sums.requests, g.sums.error_requests) for g in groups}
        dashboards = []
        if console.config.grafana_url:
            base = console.config.grafana_url.rstrip("/")
            dashboards = [(title, f"{base}/d/{uid}") for title, uid in _DASHBOARDS]
        return console.page(
            "ops.html",
            session,
            deployments=gw.router.health(),
            live=live,
            hour=hour,
            dashboards=dashboards,
        )

    handlers: list[HTTPRouteHandler] = [
        index, login_page, login, logout, overview, keys_page, create_key, revoke_key,
        invoices_page, invoice_page, invoice_pdf_file, invoice_csv_file, usage_page,
        usage_export, prices_page, finance_page, close_month, month_page, month_archive,
        topup, ops_page,
    ]  # fmt: skip
    static = create_static_files_router(
        path="/static",
        directories=[STATIC_DIR],
        send_as_attachment=False,
        include_in_schema=False,
    )
    return Router(
        path="/console",
        route_handlers=[*handlers, static],
        exception_handlers={Refused: _refused},
    )


_INVOICE_ROLES = ("owner", "finance", "admin")
_FINANCE_ROLES = ("admin", "finance")


def _download(body: bytes, media_type: str, filename: str) -> Response[Any]:
    return Response(
        body,
        media_type=media_type,
        headers={
            "content-disposition": f'attachment; filename="{filename}"',
            "cache-control": "no-store",
        },
    )


def _keys_response(
    console: Console,
    session: Session,
    tenant: Tenant,
    created: Any,
    error: str | None = None,
    status: int = 200,
) -> Response[Any]:
    keys = sorted(
        console.gw.directory.keys_of(tenant.id),
        key=lambda k: (k.revoked, -(k.created_at.timestamp() if k.created_at else 0), k.id),
    )
    return console.page(
        "keys.html",
        session,
        status=status,
        tenant=tenant,
        keys=keys,
        created=created,
        error=error,
        models=[m.name for m in console.gw.settings.models],
        stored={k.id for k in keys if console.gw.directory.is_stored_key(k.id)},
        now=datetime.now(UTC),
    )


async def _invoice(console: Console, session: Session, tenant: Tenant, month: str) -> Any:
    from gateway.admin import tenant_billing

    try:
        parse_month(month)
    except ValueError:
        raise console.not_found(session) from None
    await console.gw.ledger.flush()
    return await build_invoice(console.gw.ledger, tenant_billing(tenant), month)


async def _invoice_months(gw: Gateway, tenant: Tenant) -> list[str]:
    """From the tenant's first month with usage (or this one) to this month, newest first."""
    oldest = await first_bucket(gw.ledger.engine, tenant.id)
    now = month_of(datetime.now(UTC), tenant.timezone)
    month = now
    if oldest is not None:
        month = month_of(datetime.fromtimestamp(oldest, UTC), tenant.timezone)
    months: list[str] = []
    while month <= now and len(months) < 120:
        months.append(month)
        month = next_month(month)
    return months[::-1]


def _previous_month(month: str) -> str:
    year, number = parse_month(month)
    return f"{year - 1}-12" if number == 1 else f"{year}-{number - 1:02d}"


def _limit_rows(
    tenant: Tenant, remaining: dict[str, int | None] | None, peak: tuple[int, int]
) -> list[dict[str, Any]]:
    """Each limit: allowed, in use now, and for the per-minute ones the busiest 15 minutes
    of the month as an average per minute."""
    busiest = {"rpm": peak[0] / 15, "tpm": peak[1] / 15}
    labels = {
        "rpm": "Requests per minute",
        "tpm": "Tokens per minute",
        "max_concurrent": "Concurrent requests",
        "tokens_per_day": "Tokens today",
        "tokens_per_month": "Tokens this month",
    }
    rows = []
    for name, label in labels.items():
        limit = getattr(tenant.limits, name)
        left = remaining.get(name) if remaining else None
        used = limit - left if limit is not None and left is not None else None
        percent = 100.0 * used / limit if used is not None and limit else None
        peak_per_minute = busiest.get(name)
        rows.append(
            {
                "name": name,
                "label": label,
                "limit": limit,
                "used": used,
                "percent": percent,
                "busiest": peak_per_minute,
                "busiest_percent": (
                    100.0 * peak_per_minute / limit
                    if peak_per_minute is not None and limit
                    else None
                ),
            }
        )
    return rows


def _price_sheet(gw: Gateway, tenant: Tenant) -> list[dict[str, Any]]:
    """Per model, the price version in force now: list prices and the tenant's plan's."""
    from billing.pricing import PriceVersion

    now = datetime.now(UTC)
    pricing = gw.settings.pricing
    plan = pricing.plans.get(tenant.plan) if tenant.plan else None
    sheet = []

    def in_force(versions: list[PriceVersion]) -> PriceVersion | None:
        current = [v for v in versions if v.effective_from <= now]
        return current[-1] if current else None

    for model in gw.settings.models:
        versions = pricing.models.get(model.name)
        if not versions:
            continue
        version = in_force(versions)
        if version is None:
            continue
        multiplier = Decimal(1)
        own = in_force(plan.prices.get(model.name, [])) if plan else None
        if plan is not None and own is None:
            multiplier = plan.multiplier
        chosen = own or version
        tiers = (
            [(None, chosen.prices)]
            if chosen.prices
            else [(t.max_prompt_tokens, t) for t in chosen.tiers]
        )
        for max_prompt, prices in tiers:
            assert prices is not None
            sheet.append(
                {
                    "model": model.name,
                    "since": chosen.effective_from.date().isoformat(),
                    "max_prompt": max_prompt,
                    "input": (prices.input * multiplier).normalize(),
                    "cached": (prices.cached * multiplier).normalize(),
                    "output": (prices.output * multiplier).normalize(),
                    "own": own is not None,
                    "multiplier": multiplier,
                }
            )
    return sheet


__all__ = ["Console", "UserError", "console_router"]
