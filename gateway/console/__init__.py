"""The web console under `/console/`: tenants, finance and operators, server-rendered.

`console_routes(gw)` gives the app the console's router and the admin API routes for
console users; settings are the configuration's `console:` section (`ConsoleConfig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.lifespan import Gateway


def console_routes(gw: Gateway) -> list[Any]:
    """The console router (when enabled) and the console-user admin routes."""
    from gateway.console.admin_users import user_admin_routes
    from gateway.console.routes import Console, console_router

    console = Console(gw)
    routes: list[Any] = user_admin_routes(console)
    if gw.settings.console.enabled:
        routes.append(console_router(console))
    return routes
