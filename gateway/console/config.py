"""The `console:` section of the configuration: the web console under `/console/`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Party(BaseModel):
    """Who an invoice is from or to: the lines printed in its header."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    address: list[str] = Field(default_factory=list, description="postal address, one line each")
    tax_id: str = ""
    email: str = ""


class ConsoleConfig(BaseModel):
    """Console settings. Users are created through the admin API or `maas-gateway users`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    demo_password_env: str | None = Field(
        None,
        description="Create the demo console users (tenant owner `demo`, operator admin "
        "`operator`) with the password in this environment variable, or a fresh one printed "
        "at start-up when it is unset",
    )
    session_ttl_minutes: int = Field(480, ge=1, description="a session's lifetime")
    login_attempts: int = Field(5, ge=1, description="failed sign-ins allowed per window")
    login_window_s: int = Field(300, ge=1, description="the window failed sign-ins count in")
    secure_cookies: bool = Field(False, description="mark the session cookie Secure (HTTPS)")
    seller: Party = Field(
        default_factory=lambda: Party(name="MaaS Gateway operator"),
        description="the seller on every invoice",
    )
    buyers: dict[str, Party] = Field(
        default_factory=dict, description="tenant id -> the buyer's invoice details"
    )
    payment_terms_days: int = Field(30, ge=0, description="due date = issue date + this")
    grafana_url: str | None = Field(
        None, description="Grafana's base URL, for links to the shipped dashboards"
    )
