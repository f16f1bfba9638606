"""Configuration files are validated at start with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_settings, parse_settings
from gateway.defaults import default_settings
from tests.harness import PROJECT_ROOT


def test_the_example_and_the_embedded_default_are_valid() -> None:
    settings = load_settings(PROJECT_ROOT / "examples" / "gateway.yaml")
    assert {m.name for m in settings.models} == {"chat-large", "chat-small", "embed"}
    assert settings.tenants[1].balance is not None
    assert default_settings().tenants[0].id == "demo"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"tenants": [{"id": "t", "timezone": "Mars/Olympus"}]}, "tenants.0.timezone"),
        ({"tenants": [{"id": "t", "plan": "gold"}]}, "plan"),
        ({"tenants": [{"id": "t", "keys": [{"id": "k", "hash": "plain-secret"}]}]}, "hash"),
        ({"providers": [{"name": "x", "type": "magic"}]}, "providers.0"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_errors_name_the_field(change: dict, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(change)
    assert named in str(info.value)


def test_cli_reports_a_bad_file_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: -1\n")
    assert main(["invoice", "--config", str(bad), "--tenant", "t", "--month", "2026-11"]) == 2
    assert "server.port" in capsys.readouterr().err


def test_keys_new_prints_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.auth import hash_key

    assert main(["keys", "new", "--id", "k1"]) == 0
    out = capsys.readouterr().out
    key = out.split("API key (shown once): ")[1].split()[0]
    assert key.startswith("sk-") and len(key) > 40
    assert hash_key(key) in out


def test_help_explains_each_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["serve"], ["simulate"], ["keys", "new"], ["invoice"], ["reconcile"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "usage: maas-gateway" in capsys.readouterr().out
