"""Fault injection: the Catalog server hangs (accepts every call, its health check included, and answers
none) for 8 s under a mixed load, then answers again. The service is a real `inventory serve` validating
variants against the Catalog double (tests/integration/catalog_double.py) with a 1 s Catalog deadline, a
breaker opening after 3 consecutive failures with a 3 s cool-down, and a 1 s variant cache (so the load
keeps needing the Catalog); once with degraded mode on, once off.

- The deadline hits: no receipt waits longer than the deadline (plus scheduling), and the hung calls do
  not pile up at the Catalog (at most one per worker at once, and they end at the deadline).
- The breaker opens (inventory_circuit_breaker_state on /metrics), after which the Catalog sees only the
  breaker's trial calls.
- Degraded mode as configured: on, receipts of uncached variants are allowed with ledger source
  `degraded`; off, they fail UNAVAILABLE and nothing is `degraded`. Reservations never need the Catalog
  and never fail because of it.
- Afterwards the breaker closes by itself and validation is back (source `catalog`): the recovery time.
- The shared invariants hold. A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from conftest import free_port
from fault_load import (
    AUX_PORTS,
    EventOrders,
    EventTap,
    FaultService,
    catalog_for,
    http_get,
    load,
    ordering,
    readiness,
    scenario_database,
    serve_with_events,
    settle_events,
    sources,
    summary,
    violations,
)

from gateway.catalog import CatalogClient, CatalogUnavailable

pytestmark = pytest.mark.timeout(120)
HANG_SECONDS = 8.0
TIMEOUT, THRESHOLD, COOLDOWN = 1.0, 3, 3.0
WORKERS = 4
RECOVERY_LIMIT = COOLDOWN + 5.0


@contextlib.asynccontextmanager
async def hang_service(tmp_path, org: str, degraded: bool,
                       cooldown: float = COOLDOWN) -> AsyncIterator[tuple[FaultService, object, EventTap]]:
    """`inventory serve` validating against a Catalog double, with this test's deadline and breaker,
    events on."""
    url = await scenario_database("catalog")
    async with catalog_for(org) as catalog, serve_with_events(
            url, tmp_path, CATALOG_GRPC_HOST="127.0.0.1", CATALOG_GRPC_PORT=str(catalog.port),
            INVENTORY_CATALOG_TIMEOUT_SECONDS=str(TIMEOUT), INVENTORY_BREAKER_FAILURE_THRESHOLD=str(THRESHOLD),
            INVENTORY_BREAKER_COOLDOWN_SECONDS=str(cooldown), INVENTORY_CATALOG_CACHE_TTL_SECONDS="1",
            INVENTORY_CATALOG_DEGRADED_MODE="true" if degraded else "false",
            INVENTORY_HTTP_PORT=str(free_port(AUX_PORTS, {catalog.port}))) as (svc, tap):
        yield svc, catalog, tap


@pytest.fixture(params=[True, False], ids=["degraded-on", "degraded-off"])
async def setup(request, tmp_path) -> AsyncIterator[tuple[FaultService, object, str, bool, EventTap]]:
    org = f"catalog-hang-{uuid.uuid4()}"
    async with hang_service(tmp_path, org, request.param) as (svc, catalog, tap):
        yield svc, catalog, org, request.param, tap


async def breaker_state(svc: FaultService) -> float | None:
    """The catalog breaker's state from /metrics (0 closed, 1 half-open, 2 open); /metrics runs no check."""
    port = int(svc.env()["INVENTORY_HTTP_PORT"])
    _, _, body = await http_get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    for line in body.decode().splitlines():
        if line.startswith('inventory_circuit_breaker_state{dependency="catalog"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_hanging_catalog_hits_the_deadline_opens_the_breaker_and_degrades_as_configured(setup):
    svc, catalog, org, degraded, tap = setup
    double = catalog.double
    orders = EventOrders(tap.prefix, org)
    async with load(svc.target, org, WORKERS) as run, ordering(orders, run.admin):
        tally = run.tally
        assert await breaker_state(svc) == 0
        before = set(tally.received)
        tally.mark("hang")
        calls_before = double.calls
        double.hang()
        hung_at = time.monotonic()
        opened_after = None
        most_in_flight = 0
        while time.monotonic() - hung_at < HANG_SECONDS:
            most_in_flight = max(most_in_flight, double.in_flight)
            if opened_after is None and await breaker_state(svc) == 2:
                opened_after = time.monotonic() - hung_at
            await asyncio.sleep(0.1)
        await asyncio.sleep(TIMEOUT + 0.5)  # still hanging: what was in flight has met its deadline
        left_hanging = double.in_flight
        catalog_calls = double.calls - calls_before
        during = tally.since("hang")
        during_refs = set(tally.received) - before
        double.resume()
        resumed = time.time()
        deadline = time.monotonic() + RECOVERY_LIMIT
        while await breaker_state(svc) != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # load after the hang
        after_refs = set(tally.received) - before - during_refs
    found = await violations(svc.database_url, org, tally)
    event_found, redelivered, _ = await settle_events(svc.database_url, org, tap, orders, RECOVERY_LIMIT)
    found += event_found
    ledger = await sources(svc.database_url, org)
    by_phase = {phase: dict(collections.Counter(ledger[r][0] for r in refs)) for phase, refs in (
        ("before", before), ("during", during_refs), ("after", after_refs))}
    back = sorted(at for r, (source, at) in ledger.items() if source == "catalog" and at > resumed)
    recovery = back[0] - resumed if back else None
    failed: dict[tuple[str, str], int] = collections.Counter()
    for (op, code, details), n in tally.failures.items():
        if code != "FAILED_PRECONDITION":  # business answers
            failed[(op, code)] += n
    summary(f"catalog-hang[degraded {'on' if degraded else 'off'}]", tally, recovery, found, during_hang=during,
            breaker_open_after=None if opened_after is None else f"{opened_after:.2f} s",
            catalog_calls_during_hang=catalog_calls, most_calls_hanging_at_once=most_in_flight,
            hanging_after_the_deadline=left_hanging, slowest_receipt=f"{tally.slowest_of['receive'] / 1000:.2f} s",
            ledger_sources=by_phase, failed_by_operation=dict(failed),
            events_delivered=len(tap.deliveries), redeliveries=redelivered, orders_via_events=len(orders.orders))
    assert not tally.forbidden, tally.forbidden[:5]
    assert opened_after is not None, "the catalog breaker never opened"
    # The deadline: no receipt waited much longer than it; nothing piles up at the Catalog.
    assert tally.slowest_of["receive"] / 1000 < TIMEOUT + 1.0, tally.slowest_of
    # (one may be the breaker's half-open trial, which started less than a deadline ago)
    assert most_in_flight <= WORKERS and left_hanging <= 1, (most_in_flight, left_hanging)
    trials = int(HANG_SECONDS / COOLDOWN) + 2
    assert catalog_calls <= THRESHOLD + WORKERS + trials, f"{catalog_calls} calls reached a hanging Catalog"
    # Degraded mode as configured; reservations unaffected either way.
    assert {op for op, _ in failed} <= {"receive"}, failed
    assert by_phase["before"].get("catalog", 0) + by_phase["before"].get("cache", 0) > 0, by_phase
    if degraded:
        assert not failed, failed
        assert by_phase["during"].get("degraded", 0) > 0, by_phase
    else:
        assert set(failed) == {("receive", "UNAVAILABLE")}, failed
        assert "degraded" not in {source for source, _ in ledger.values()}, by_phase
    assert recovery is not None and recovery < RECOVERY_LIMIT, f"validation not back after the hang: {by_phase}"
    assert not found, found[:10]


async def test_a_catalog_deadline_under_two_seconds_is_honoured():
    """Regression (gateway/catalog.py): a Catalog deadline of 1 s lets an answering Catalog answer, and ends a
    call to a hanging one after 1 s, all attempts included. With the deadline also in the channel's service
    config, grpcio failed every call at once with DEADLINE_EXCEEDED when it was under about 2 s."""
    org = f"catalog-deadline-{uuid.uuid4()}"
    async with catalog_for(org) as catalog:
        client = CatalogClient(catalog.target, TIMEOUT)
        try:
            assert (await client.validate(org, "v0")).exists
            catalog.double.hang()
            started = time.monotonic()
            with pytest.raises(CatalogUnavailable, match="DEADLINE_EXCEEDED"):
                await client.validate(org, "v0")
            took = time.monotonic() - started
            assert TIMEOUT * 0.9 <= took < TIMEOUT + 0.5, f"a hung call ended after {took:.2f} s"
            assert catalog.double.calls == 2, "the deadline ends the attempts: no retry after it"
        finally:
            catalog.double.resume()
            await client.close()


async def test_readiness_checks_do_not_close_a_breaker_that_validation_opened(tmp_path) -> None:
    """The Catalog's health service answers while its validation calls hang: /readyz (which runs the
    health check) must not close the breaker those calls opened, or every validation would wait for the
    deadline again after each readiness poll. Only the breaker's own trial call closes it."""
    org = f"catalog-half-hang-{uuid.uuid4()}"
    async with hang_service(tmp_path, org, degraded=True, cooldown=30) as (svc, catalog, _):
        port = int(svc.env()["INVENTORY_HTTP_PORT"])
        async with load(svc.target, org, WORKERS):
            catalog.double.hang(health=False)
            deadline = time.monotonic() + 15
            while await breaker_state(svc) != 2:
                assert time.monotonic() < deadline, "the catalog breaker never opened"
                await asyncio.sleep(0.1)
            for _ in range(3):
                ready = await readiness(port)
                assert ready["checks"]["catalog"]["status"] == "healthy", ready  # its health answers
                assert await breaker_state(svc) == 2, "a readiness check closed the breaker"
            catalog.double.resume()
