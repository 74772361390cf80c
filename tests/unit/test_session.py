"""Names of the service's Postgres sessions: ours unless the operator chose one."""

from __future__ import annotations

import pytest

from persistence import session


def test_a_session_is_named_for_what_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGAPPNAME", raising=False)
    assert session.settings("postgresql://root@127.0.0.1:5432/test", "inventory-relay") == {
        "application_name": "inventory-relay"}
    assert session.settings("postgresql://h/db?sslmode=require", "inventory-shard-3", plan_cache_mode="auto") == {
        "plan_cache_mode": "auto", "application_name": "inventory-shard-3"}


def test_the_operators_name_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGAPPNAME", raising=False)
    assert session.settings("postgresql://h/db?application_name=shop-inventory", "inventory-gateway") == {}
    monkeypatch.setenv("PGAPPNAME", "shop-inventory")
    assert session.settings("postgresql://h/db", "inventory-gateway", jit="off") == {"jit": "off"}
