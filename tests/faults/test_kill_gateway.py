"""Fault injection: `kill -9` of the gateway under a mixed load, with the actor system and the gateway as
separate processes (the Procfile). A new gateway is started on the same port against the same actor
system (which keeps running); the load resumes through the same client channel. Events are on: the
gateway killed was also the outbox relay and the consumer of orders placed and shipped through events.

Every call acknowledged OK before the kill is durable (in Postgres, in the state it answered); calls
cut by the kill fail UNAVAILABLE (the connection went away), never INTERNAL/UNKNOWN; the invariants
hold; every committed outbox event is published and seen by a consumer once per event_id (copies from
the relay's kill between confirm and mark are counted), and every order sent as events is shipped.
A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from fault_load import (
    EventOrders,
    EventTap,
    Procfile,
    load,
    ordering,
    procfile_with_events,
    served_again,
    settle_events,
    summary,
    violations,
)

pytestmark = pytest.mark.timeout(120)
RECOVERY_LIMIT = 15.0
ALLOWED = {"OK", "UNAVAILABLE", "FAILED_PRECONDITION"}


@pytest.fixture
async def node(tmp_path) -> AsyncIterator[tuple[Procfile, EventTap]]:
    async with procfile_with_events(tmp_path, "gateway") as running_node:
        yield running_node


async def test_kill_9_of_the_gateway_under_load(node: tuple[Procfile, EventTap]):
    node, tap = node
    org = f"kill-gateway-{uuid.uuid4()}"
    orders = EventOrders(tap.prefix, org)
    actors = sorted(node.pids("actors"))
    async with load(node.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        killed_pids = node.kill("gateway")
        assert len(killed_pids) == 1, killed_pids
        killed = time.monotonic()
        acknowledged = (dict(tally.reserved), dict(tally.received))  # every OK so far
        tally.mark("killed")
        await asyncio.sleep(1)  # calls against no gateway
        while_down = tally.since("killed")
        started_in = await node.start_gateway()
        tally.restored = time.monotonic()
        pending = await served_again(run.admin, org, tally.restored + RECOVERY_LIMIT)
        assert not pending, f"variants {sorted(pending)} not served by the new gateway\n{node.log_tail()}"
        recovery = time.monotonic() - killed
        tally.mark("recovered")
        await asyncio.sleep(3)  # the load on the new gateway
        after = tally.since("recovered")
    found = await violations(node.database_url, org, tally)
    event_found, redelivered, drain = await settle_events(node.database_url, org, tap, orders, RECOVERY_LIMIT)
    found += event_found
    summary("kill-9-gateway", tally, recovery, found, gateway_started_in=f"{started_in:.2f} s",
            while_down=while_down, after_recovery=after,
            acknowledged_before_kill=len(acknowledged[0]) + len(acknowledged[1]),
            events_delivered=len(tap.deliveries), redeliveries=redelivered, orders_via_events=len(orders.orders),
            events_settled_in=f"{drain:.2f} s")
    assert not tally.forbidden, tally.forbidden[:5]
    assert set(tally.outcomes) <= ALLOWED, f"{tally.outcomes}: {tally.details}"
    assert while_down.get("UNAVAILABLE", 0) > 0, while_down  # (an OK here: a reply read just before the kill)
    assert after.get("OK", 0) > 0 and tally.service_failures(since="recovered") == {}, (after, tally.failures)
    assert sorted(node.pids("actors")) == actors, "the actor system was not supposed to change"
    # Durable: whatever was OK before the kill is in Postgres (violations() checks every OK of the run;
    # these are the ones answered before the kill, which must all be among them).
    assert set(acknowledged[0]) <= set(tally.reserved) and set(acknowledged[1]) <= set(tally.received)
    assert not found, found[:10]
