"""Fault injection: `kill -9` of the whole actor system of a node under a mixed load, then the same
`inventory actors` command again (what the Procfile's supervisor does). The gateway, a process of its
own as in the Procfile, is not restarted: it must serve every variant again by itself. Events are on:
orders placed and shipped through events meanwhile are retried by the gateway's consumer until the shards
are back, and every committed outbox event is published and seen once per event_id.

Calls in flight get their committed answer or UNAVAILABLE (never INTERNAL/UNKNOWN, never a client
deadline: INVENTORY_SHARD_REPLY_TIMEOUT_SECONDS is 2 s, and a call waits at most for the batch in flight
and its own, 4 s, under the client's 5 s); every OK is in Postgres in the state it answered; the
invariants hold. A summary line is printed (pytest -s shows it).

The gateway finds the new registrar by itself (commit fcbf792; before it, it kept asking the dead one's
address for the shard map and never served again: this test showed it).
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
    async with procfile_with_events(tmp_path, "actor_system", INVENTORY_SHARD_REPLY_TIMEOUT_SECONDS="2") as running_node:
        yield running_node


async def test_kill_9_of_the_whole_actor_system_under_load(node: tuple[Procfile, EventTap]):
    node, tap = node
    org = f"kill-actors-{uuid.uuid4()}"
    orders = EventOrders(tap.prefix, org)
    gateway_pid = node.procs["gateway"].pid
    async with load(node.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        killed_pids = node.kill("actors")
        assert len(killed_pids) >= node.shards + 2, f"actor system processes killed: {killed_pids}"
        killed = time.monotonic()
        assert node.pids("actors") == []
        await asyncio.sleep(1)  # calls against a node without actors
        restart = await node.start_actors()
        tally.restored = time.monotonic()
        # Every variant (on every shard) answers again through the same gateway.
        pending = await served_again(run.admin, org, tally.restored + RECOVERY_LIMIT)
        assert not pending, (f"variants {sorted(pending)} not served {RECOVERY_LIMIT:.0f} s after `inventory actors` "
                             f"was started again (the gateway was not restarted)\n{node.log_tail()}")
        recovery = time.monotonic() - killed
        tally.mark("recovered")
        await asyncio.sleep(3)  # load on the recovered node
        after = tally.since("recovered")
    found = await violations(node.database_url, org, tally)
    event_found, redelivered, drain = await settle_events(node.database_url, org, tap, orders, 20.0)
    found += event_found
    summary("kill-9-actor-system", tally, recovery, found, processes_killed=len(killed_pids),
            actors_restarted_in=f"{restart:.2f} s", after_recovery=after, events_delivered=len(tap.deliveries),
            redeliveries=redelivered, orders_via_events=len(orders.orders), events_settled_in=f"{drain:.2f} s")
    assert node.procs["gateway"].pid == gateway_pid and node.procs["gateway"].poll() is None
    assert not tally.forbidden, tally.forbidden[:5]
    assert set(tally.outcomes) <= ALLOWED, f"{tally.outcomes}: {tally.details}"
    assert not found, found[:10]
    assert after.get("OK", 0) > 0 and tally.service_failures(since="recovered") == {}, (
        after, tally.failures)
