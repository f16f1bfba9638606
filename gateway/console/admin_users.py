"""Admin API routes for console users: `/admin/console-users` (list, create, delete),
behind the admin API's guard (`gateway.admin.AdminGuard`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Controller, Request, Response, Router, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from gateway.admin import AdminGuard, decode_body, json_response
from gateway.console.routes import Console
from gateway.console.users import UserError, generate_password
from gateway.errors import ApiError
from gateway.state import AppState


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    role: str
    tenant_id: str | None = None
    password: str | None = None


def user_admin_routes(console: Console, state: Callable[[], AppState]) -> list[Router]:
    """Create, list and delete console users with the admin key (like API keys)."""

    def the_console() -> Console:
        return console

    return [
        Router(
            path="/",
            route_handlers=[ConsoleUsersController],
            guards=[AdminGuard(state)],
            dependencies={"console": Provide(the_console, sync_to_thread=False)},
        )
    ]


class ConsoleUsersController(Controller):
    """`/admin/console-users`: list, create and delete console users."""

    path = "/admin/console-users"

    @get("/")
    async def list_users(self, console: NamedDependency[Console]) -> Response[Any]:
        store = await console.store()
        return json_response({"data": [user.public() for user in await store.list()]})

    @post("/", status_code=201)
    async def create_user(
        self, request: Request[Any, Any, Any], console: NamedDependency[Console]
    ) -> Response[Any]:
        """The password is generated when not given, and shown once in the answer."""
        new = await decode_body(request, NewUser)
        if new.tenant_id is not None and new.tenant_id not in console.gw.directory.tenants:
            raise ApiError(404, f"No tenant {new.tenant_id!r}.", code="tenant_not_found")
        password = new.password or generate_password()
        store = await console.store()
        try:
            user = await store.create(
                new.username, password, new.role, new.tenant_id, replace=False
            )
        except UserError as exc:
            field = str(exc).split(":", 1)[0]
            status = 409 if "taken" in str(exc) else 400
            raise ApiError(status, str(exc), param=field, code="invalid_user") from None
        answer = user.public()
        if new.password is None:
            answer["password"] = password
        return json_response(answer, 201)

    @delete("/{username:str}", status_code=200)
    async def delete_user(
        self, username: FromPath[str], console: NamedDependency[Console]
    ) -> Response[Any]:
        store = await console.store()
        if not await store.delete(username):
            raise ApiError(404, f"No console user {username!r}.", code="user_not_found")
        return json_response({"username": username, "deleted": True})
