"""Admin API routes for console users: `/admin/console-users` (list, create, delete)."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.handlers import HTTPRouteHandler

from gateway.console.routes import Console
from gateway.console.users import UserError, generate_password
from gateway.errors import ApiError, invalid_request


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    role: str
    tenant_id: str | None = None
    password: str | None = None


def _json(body: Any, status: int = 200) -> Response[Any]:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def user_admin_routes(console: Console) -> list[HTTPRouteHandler]:
    """Create, list and delete console users with the admin key (like API keys)."""
    gw = console.gw

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

    @get("/admin/console-users")
    async def list_users(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        store = await console.store()
        return _json({"data": [user.public() for user in await store.list()]})

    @post("/admin/console-users", status_code=201)
    async def create_user(request: Request[Any, Any, Any]) -> Response[Any]:
        """The password is generated when not given, and shown once in the answer."""
        require_admin(request)
        try:
            new = msgspec.json.decode(await request.body(), type=NewUser)
        except msgspec.ValidationError as exc:
            raise invalid_request(str(exc)) from None
        except msgspec.DecodeError:
            raise invalid_request("The request body is not valid JSON.") from None
        if new.tenant_id is not None and new.tenant_id not in gw.directory.tenants:
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
        return _json(answer, 201)

    @delete("/admin/console-users/{username:str}", status_code=200)
    async def delete_user(request: Request[Any, Any, Any]) -> Response[Any]:
        require_admin(request)
        username = request.path_params["username"]
        store = await console.store()
        if not await store.delete(username):
            raise ApiError(404, f"No console user {username!r}.", code="user_not_found")
        return _json({"username": username, "deleted": True})

    return [list_users, create_user, delete_user]
