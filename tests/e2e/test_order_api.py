"""The Order Service's contract, end to end: CheckAvailability, ReserveStock, ReleaseReservation,
ConfirmReservation over gRPC against a running `inventory serve` (2 shards, real Postgres).

Error codes follow the table at the top of gateway/service.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import grpc
import pytest

from actors.keys import shard_of
from gateway.pb import inventory_pb2 as pb

SHARDS = 2  # the session service's shard count (tests/conftest.py)
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def variants_by_shard(org: str, per_shard: int, prefix: str = "sku") -> dict[int, list[str]]:
    """`per_shard` variant ids owned by each shard, so a request is sure to span every shard."""
    found: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    n = 0
    while any(len(vs) < per_shard for vs in found.values()):
        variant = f"{prefix}-{n}"
        shard = shard_of(org, variant, SHARDS)
        if len(found[shard]) < per_shard:
            found[shard].append(variant)
        n += 1
    return found


async def check(shop: Any, *items: tuple[str, int], preferred: str = "") -> pb.AvailabilityResponse:
    return await shop.inventory.CheckAvailability(pb.AvailabilityRequest(
        organization_id=shop.org, preferred_warehouse_id=preferred,
        items=[pb.AvailabilityItem(variant_id=v, quantity=q) for v, q in items]))


async def reserved_of(shop: Any, variant: str) -> dict[str, tuple[int, int]]:
    """warehouse_id -> (reserved, available) of a variant."""
    return {w: (lv.reserved, lv.available) for w, lv in (await shop.levels(variant)).items()}


# ---------------------------------------------------------------- CheckAvailability


async def test_availability_takes_the_preferred_warehouse_when_it_covers_the_quantity(shop):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 20)

    reply = await check(shop, ("shirt", 5), preferred="north")

    assert reply.all_available
    [result] = reply.results
    got = (result.variant_id, result.requested, result.available, result.sufficient, result.warehouse_id)
    assert got == ("shirt", 5, 10, True, "north")


async def test_availability_takes_the_warehouse_with_most_available_otherwise(shop):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 20)

    no_preference = await check(shop, ("shirt", 5))
    preferred_too_small = await check(shop, ("shirt", 15), preferred="north")

    for reply in (no_preference, preferred_too_small):
        assert [(r.warehouse_id, r.available, r.sufficient) for r in reply.results] == [("south", 20, True)]


async def test_insufficient_availability_names_the_largest_single_warehouse(shop):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 20)
    await shop.receive("socks", "north", 3)

    reply = await check(shop, ("shirt", 25), ("socks", 2), ("hat", 1))

    assert not reply.all_available
    got = [(r.variant_id, r.requested, r.available, r.sufficient, r.warehouse_id) for r in reply.results]
    assert got == [
        ("shirt", 25, 20, False, "south"),  # 30 in total, but no single warehouse holds 25
        ("socks", 2, 3, True, "north"),
        ("hat", 1, 0, False, ""),  # no stock record at all
    ]


async def test_availability_counts_reserved_stock_as_unavailable(shop):
    await shop.receive("shirt", "north", 10)
    await shop.reserve("order-1", ("shirt", 4))

    [result] = (await check(shop, ("shirt", 7))).results

    assert (result.available, result.sufficient) == (6, False)


async def test_an_inactive_warehouse_is_never_chosen(shop, grpc_error):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 20)
    await shop.warehouse("south", active=False)

    [result] = (await check(shop, ("shirt", 15))).results
    error = await grpc_error(shop.reserve("order-1", ("shirt", 15)), FAILED_PRECONDITION)
    reply = await shop.reserve("order-2", ("shirt", 5))

    assert (result.warehouse_id, result.available, result.sufficient) == ("north", 10, False)
    assert "shirt" in error.details()
    assert [(ln.warehouse_id, ln.quantity) for ln in reply.lines] == [("north", 5)]


# ---------------------------------------------------------------- ReserveStock


async def test_reserving_returns_the_lines_and_an_iso_utc_expiry(shop):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 20)
    await shop.receive("socks", "north", 5)
    before = time.time()

    reply = await shop.reserve("order-1", ("shirt", 3), ("socks", 2, "north"), ttl_seconds=600)

    assert reply.success and reply.reservation_id
    assert sorted((ln.variant_id, ln.warehouse_id, ln.quantity) for ln in reply.lines) == [
        ("shirt", "south", 3), ("socks", "north", 2)]
    expires = datetime.fromisoformat(reply.expires_at)
    assert expires.utcoffset() is not None and expires.utcoffset().total_seconds() == 0, reply.expires_at
    assert before + 600 - 1 <= expires.timestamp() <= time.time() + 600 + 1
    assert await reserved_of(shop, "shirt") == {"north": (0, 10), "south": (3, 17)}
    assert await reserved_of(shop, "socks") == {"north": (2, 3)}


async def test_reserving_in_a_named_warehouse_uses_that_warehouse(shop, grpc_error):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 20)

    reply = await shop.reserve("order-1", ("shirt", 4, "north"))
    error = await grpc_error(shop.reserve("order-2", ("shirt", 7, "north")), FAILED_PRECONDITION)

    assert [(ln.warehouse_id, ln.quantity) for ln in reply.lines] == [("north", 4)]
    assert "shirt" in error.details() and "north" in error.details()
    assert await reserved_of(shop, "shirt") == {"north": (4, 6), "south": (0, 20)}


async def test_reserving_more_than_available_is_rejected_naming_only_the_short_items(shop, grpc_error):
    shards = variants_by_shard(shop.org, 2)
    short = [shards[0][0], shards[1][0]]  # one short variant in each shard
    enough = [shards[0][1], shards[1][1]]
    for variant in short + enough:
        await shop.receive(variant, "north", 5)

    error = await grpc_error(
        shop.reserve("order-1", *[(v, 6) for v in short], *[(v, 1) for v in enough]), FAILED_PRECONDITION)

    for variant in short:
        assert variant in error.details()
    for variant in enough:
        assert variant not in error.details()
    for variant in short + enough:
        assert await reserved_of(shop, variant) == {"north": (0, 5)}


async def test_the_same_order_with_other_items_already_exists(shop, grpc_error):
    await shop.receive("shirt", "north", 10)
    first = await shop.reserve("order-1", ("shirt", 2))

    error = await grpc_error(shop.reserve("order-1", ("shirt", 3)), grpc.StatusCode.ALREADY_EXISTS)

    assert first.reservation_id in error.details() or "order" in error.details()
    assert await reserved_of(shop, "shirt") == {"north": (2, 8)}


async def test_a_retried_reservation_returns_the_same_reservation_and_reserves_once(shop):
    await shop.receive("shirt", "north", 10)
    await shop.receive("socks", "north", 10)

    first = await shop.reserve("order-1", ("shirt", 2), ("socks", 1), ttl_seconds=300)
    retry = await shop.reserve("order-1", ("socks", 1), ("shirt", 2), ttl_seconds=300)  # items reordered

    assert retry.reservation_id == first.reservation_id
    assert retry.expires_at == first.expires_at
    assert sorted(map(str, retry.lines)) == sorted(map(str, first.lines))
    assert await reserved_of(shop, "shirt") == {"north": (2, 8)}
    assert await reserved_of(shop, "socks") == {"north": (1, 9)}


@pytest.mark.parametrize(("ttl", "expected"), [
    ({"ttl_seconds": 90}, 90),
    ({"ttl_minutes": 2}, 120),
    ({"ttl_seconds": 30, "ttl_minutes": 100_000}, 30),  # ttl_seconds wins, even over an invalid ttl_minutes
    ({}, 15 * 60),  # the service's default
])
async def test_the_ttl_comes_from_seconds_else_minutes_else_the_default(shop, ttl, expected):
    await shop.receive("shirt", "north", 10)
    before = time.time()

    reply = await shop.inventory.ReserveStock(pb.ReserveStockRequest(
        organization_id=shop.org, order_id="order-1", items=[pb.ReserveItem(variant_id="shirt", quantity=1)],
        **ttl))

    expires = datetime.fromisoformat(reply.expires_at).timestamp()
    assert before + expected - 1 <= expires <= time.time() + expected


async def test_retrying_a_confirmed_reservation_does_not_report_it_expired_in_1970(shop):
    await shop.receive("shirt", "north", 10)
    first = await shop.reserve("order-1", ("shirt", 2), ttl_seconds=300)
    await shop.confirm(first.reservation_id)

    retry = await shop.reserve("order-1", ("shirt", 2), ttl_seconds=300)

    assert retry.reservation_id == first.reservation_id
    assert (await shop.level("shirt", "north")).reserved == 2
    # Either the original expiry or none at all ("" : confirmed, no TTL); never a time long past.
    assert retry.expires_at in (first.expires_at, ""), retry.expires_at


async def test_the_same_variant_twice_in_one_order_reserves_the_sum(shop):
    await shop.receive("shirt", "north", 10)

    reply = await shop.reserve("order-1", ("shirt", 2, "north"), ("shirt", 3), ("shirt", 1))

    assert sum(ln.quantity for ln in reply.lines) == 6
    assert await reserved_of(shop, "shirt") == {"north": (6, 4)}
    await shop.release(reply.reservation_id)
    assert await reserved_of(shop, "shirt") == {"north": (0, 10)}


async def test_different_orders_get_different_reservations(shop):
    await shop.receive("shirt", "north", 10)

    one = await shop.reserve("order-1", ("shirt", 1))
    two = await shop.reserve("order-2", ("shirt", 1))

    assert one.reservation_id != two.reservation_id
    assert await reserved_of(shop, "shirt") == {"north": (2, 8)}


@pytest.mark.parametrize("short_shard", range(SHARDS))
async def test_a_reservation_across_shards_is_all_or_nothing(shop, grpc_error, short_shard):
    shards = variants_by_shard(shop.org, 3)
    variants = [v for s in sorted(shards) for v in shards[s]]
    short = shards[short_shard][-1]
    for variant in variants:
        await shop.receive(variant, "north", 5)
    items = [(v, 6 if v == short else 2) for v in variants]

    error = await grpc_error(shop.reserve("order-1", *items), FAILED_PRECONDITION)

    assert short in error.details()
    for variant in variants:
        assert await reserved_of(shop, variant) == {"north": (0, 5)}, variant
    # The failed call left no trace: once the stock is there, the same order reserves.
    await shop.receive(short, "north", 1)
    reply = await shop.reserve("order-1", *items)
    assert sorted((ln.variant_id, ln.quantity) for ln in reply.lines) == sorted(items)
    for variant in variants:
        assert (await reserved_of(shop, variant))["north"][0] == (6 if variant == short else 2)


# ---------------------------------------------------------------- ReleaseReservation


async def test_releasing_returns_the_quantity_and_is_idempotent(shop):
    shards = variants_by_shard(shop.org, 1)
    variants = [shards[s][0] for s in sorted(shards)]
    for variant in variants:
        await shop.receive(variant, "north", 10)
    reservation = await shop.reserve("order-1", *[(v, 4) for v in variants])

    first = await shop.release(reservation.reservation_id, reason="order cancelled")
    after_first = {v: await reserved_of(shop, v) for v in variants}
    second = await shop.release(reservation.reservation_id)

    assert first.success and second.success
    assert after_first == {v: {"north": (0, 10)} for v in variants}
    assert {v: await reserved_of(shop, v) for v in variants} == after_first


async def test_releasing_an_unknown_reservation_is_not_found(shop, grpc_error):
    await grpc_error(shop.release("00000000-0000-0000-0000-000000000000"), NOT_FOUND)


async def test_releasing_another_organizations_reservation_is_not_found(shop, shop_on, clients, grpc_error):
    await shop.receive("shirt", "north", 10)
    reservation = await shop.reserve("order-1", ("shirt", 3))
    intruder = shop_on(clients, "another-" + shop.org)

    await grpc_error(intruder.release(reservation.reservation_id), NOT_FOUND)

    assert await reserved_of(shop, "shirt") == {"north": (3, 7)}


# ---------------------------------------------------------------- ConfirmReservation


async def test_a_confirmed_reservation_outlives_its_ttl(shop, eventually):
    shards = variants_by_shard(shop.org, 1)
    variants = [shards[s][0] for s in sorted(shards)]  # the reservation spans every shard
    for variant in variants:
        await shop.receive(variant, "north", 10)
    started = time.monotonic()
    confirmed = await shop.reserve("order-confirmed", *[(v, 2) for v in variants], ttl_seconds=2)
    await shop.reserve("order-control", *[(v, 3) for v in variants], ttl_seconds=2)
    assert (await shop.confirm(confirmed.reservation_id)).success

    # The unconfirmed control expiring shows that expiry has run for these stocks ...
    for variant in variants:
        await eventually(lambda v=variant: _reserved_is(shop, v, "north", 2), timeout=8,
                         what="the control expires")
    # ... and past twice the TTL the confirmed one must still hold its stock (nothing to poll for:
    # this waits out the time in which a wrong expiry would have happened).
    await asyncio.sleep(max(0.0, 4.0 - (time.monotonic() - started)))
    for variant in variants:
        level = await shop.level(variant, "north")
        assert (level.reserved, level.available) == (2, 8), variant
    assert (await shop.confirm(confirmed.reservation_id)).success  # confirming again changes nothing
    assert (await shop.release(confirmed.reservation_id)).success  # a confirmed reservation can be released
    for variant in variants:
        assert (await shop.level(variant, "north")).reserved == 0


async def test_confirming_an_expired_reservation_is_a_failed_precondition(shop, eventually, grpc_error):
    await shop.receive("shirt", "north", 10)
    reservation = await shop.reserve("order-1", ("shirt", 2), ttl_seconds=1)
    await eventually(lambda: _reserved_is(shop, "shirt", "north", 0), timeout=6,
                     what="the reservation expires")

    error = await grpc_error(shop.confirm(reservation.reservation_id), FAILED_PRECONDITION)

    assert "expired" in error.details()
    assert (await shop.release(reservation.reservation_id)).success  # releasing it is a no-op
    assert (await shop.level("shirt", "north")).reserved == 0


async def test_confirming_a_released_reservation_is_a_failed_precondition(shop, grpc_error):
    await shop.receive("shirt", "north", 10)
    reservation = await shop.reserve("order-1", ("shirt", 2))
    await shop.release(reservation.reservation_id)

    await grpc_error(shop.confirm(reservation.reservation_id), FAILED_PRECONDITION)

    assert (await shop.level("shirt", "north")).reserved == 0


async def test_confirming_an_unknown_reservation_is_not_found(shop, grpc_error):
    await grpc_error(shop.confirm("00000000-0000-0000-0000-000000000000"), NOT_FOUND)


async def test_confirming_another_organizations_reservation_is_not_found(shop, shop_on, clients, grpc_error):
    await shop.receive("shirt", "north", 10)
    reservation = await shop.reserve("order-1", ("shirt", 3))
    intruder = shop_on(clients, "another-" + shop.org)

    await grpc_error(intruder.confirm(reservation.reservation_id), NOT_FOUND)

    # Still unconfirmed: the owner can release it.
    await shop.release(reservation.reservation_id)
    assert (await shop.level("shirt", "north")).reserved == 0


# ---------------------------------------------------------------- expiry


async def _reserved_is(shop: Any, variant: str, warehouse: str, reserved: int) -> pb.StockLevel | None:
    level = await shop.level(variant, warehouse)
    return level if level.reserved == reserved else None


async def test_an_unconfirmed_reservation_expires_after_its_ttl(shop, eventually):
    await shop.receive("shirt", "north", 10)
    reservation = await shop.reserve("order-1", ("shirt", 4), ttl_seconds=2)
    expires_at = datetime.fromisoformat(reservation.expires_at).timestamp()
    assert (await shop.level("shirt", "north")).available == 6

    level = await eventually(lambda: _reserved_is(shop, "shirt", "north", 0), timeout=6,
                             what="the reservation expires")
    seen = time.time()

    assert level.available == 10
    assert seen >= expires_at - 0.1, f"expired {expires_at - seen:.2f} s early"
    assert seen <= expires_at + 1.5, f"expiry became visible only {seen - expires_at:.2f} s after expires_at"


# ---------------------------------------------------------------- invalid requests

ORG = "{org}"
Build = Callable[[str], tuple[str, Any]]


def _avail(org: str, items: list[tuple[str, int]]) -> tuple[str, Any]:
    return "CheckAvailability", pb.AvailabilityRequest(
        organization_id=org, items=[pb.AvailabilityItem(variant_id=v, quantity=q) for v, q in items])


def _reserve(org: str, order: str = "order-1", items: list[tuple[str, int, str]] | None = None,
             **ttl: int) -> tuple[str, Any]:
    items = [("shirt", 1, "")] if items is None else items
    return "ReserveStock", pb.ReserveStockRequest(
        organization_id=org, order_id=order, **ttl,
        items=[pb.ReserveItem(variant_id=v, quantity=q, warehouse_id=w) for v, q, w in items])


INVALID: dict[str, tuple[Build, str]] = {
    "availability without organization": (lambda o: _avail("", [("shirt", 1)]), "organization_id"),
    "availability without items": (lambda o: _avail(o, []), "items"),
    "availability with an empty variant": (lambda o: _avail(o, [("shirt", 1), ("", 1)]),
                                           "items[1].variant_id"),
    "availability of zero": (lambda o: _avail(o, [("shirt", 0)]), "items[0].quantity"),
    "availability of a negative quantity": (lambda o: _avail(o, [("shirt", -3)]), "items[0].quantity"),
    "reserve without organization": (lambda o: _reserve(""), "organization_id"),
    "reserve with a blank organization": (lambda o: _reserve("   "), "organization_id"),
    "reserve without order": (lambda o: _reserve(o, order=""), "order_id"),
    "reserve without items": (lambda o: _reserve(o, items=[]), "items"),
    "reserve with an empty variant": (lambda o: _reserve(o, items=[("shirt", 1, ""), ("", 1, "")]),
                                      "items[1].variant_id"),
    "reserve zero": (lambda o: _reserve(o, items=[("shirt", 0, "")]), "items[0].quantity"),
    "reserve a negative quantity": (lambda o: _reserve(o, items=[("shirt", -1, "")]), "items[0].quantity"),
    "reserve with a negative ttl": (lambda o: _reserve(o, ttl_seconds=-1), "ttl_seconds"),
    "reserve for more than 24 h in seconds": (lambda o: _reserve(o, ttl_seconds=86_401), "ttl_seconds"),
    "reserve for more than 24 h in minutes": (lambda o: _reserve(o, ttl_minutes=24 * 60 + 1), "ttl_minutes"),
    "reserve in an unknown warehouse": (lambda o: _reserve(o, items=[("shirt", 1, "nowhere")]),
                                        "items[0].warehouse_id"),
    "release without organization": (lambda o: ("ReleaseReservation", pb.ReleaseRequest(reservation_id="r")),
                                     "organization_id"),
    "release without reservation": (lambda o: ("ReleaseReservation", pb.ReleaseRequest(organization_id=o)),
                                    "reservation_id"),
    "confirm without organization": (lambda o: ("ConfirmReservation", pb.ConfirmRequest(reservation_id="r")),
                                     "organization_id"),
    "confirm without reservation": (lambda o: ("ConfirmReservation", pb.ConfirmRequest(organization_id=o)),
                                    "reservation_id"),
}


@pytest.mark.parametrize("case", INVALID)
async def test_an_invalid_request_is_rejected_naming_the_field(shop, grpc_error, case):
    build, field = INVALID[case]
    await shop.receive("shirt", "north", 10)
    method, request = build(shop.org)

    error = await grpc_error(getattr(shop.inventory, method)(request), INVALID_ARGUMENT)

    assert error.details().startswith(field + ":"), error.details()
    assert (await shop.level("shirt", "north")).reserved == 0


@pytest.mark.parametrize("method", ["CheckAvailability", "ReserveStock"])
async def test_more_than_500_items_are_rejected_but_500_are_accepted(shop, grpc_error, method):
    variants = [f"v-{i}" for i in range(501)]
    await shop.warehouse("north")
    await asyncio.gather(*(shop.receive(v, "north", 1) for v in variants[:500]))
    build = _avail if method == "CheckAvailability" else (
        lambda org, items: _reserve(org, items=[(v, q, "") for v, q in items]))

    _, too_many = build(shop.org, [(v, 1) for v in variants])
    error = await grpc_error(getattr(shop.inventory, method)(too_many), INVALID_ARGUMENT)
    _, just_enough = build(shop.org, [(v, 1) for v in variants[:500]])
    reply = await getattr(shop.inventory, method)(just_enough)

    assert error.details().startswith("items:") and "500" in error.details(), error.details()
    if method == "CheckAvailability":
        assert reply.all_available and len(reply.results) == 500
    else:
        assert len(reply.lines) == 500
        assert (await shop.level("v-499", "north")).available == 0


async def test_a_reservation_with_500_short_items_is_a_failed_precondition(shop, grpc_error):
    await shop.receive("v-0", "north", 1)

    error = await grpc_error(shop.reserve("order-1", *[(f"v-{i}", 2) for i in range(500)]))

    assert error.code() == FAILED_PRECONDITION, f"{error.code().name}: {error.details()[:200]}"
    assert "v-0" in error.details()


async def test_a_ttl_of_exactly_24_hours_is_accepted(shop):
    await shop.receive("shirt", "north", 10)

    reply = await shop.reserve("order-1", ("shirt", 1), ttl_seconds=24 * 3600)

    assert abs(datetime.fromisoformat(reply.expires_at).timestamp() - (time.time() + 24 * 3600)) < 5


async def test_a_message_over_the_4_mb_receive_limit_is_refused(shop, grpc_error):
    await shop.receive("shirt", "north", 10)
    huge = "x" * (5 * 1024 * 1024)
    big = "x" * (3 * 1024 * 1024)

    refused = await grpc_error(check(shop, (huge, 1)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # Under the limit the message is read, and the id is refused for its length instead.
    too_long = await grpc_error(check(shop, (big, 1)), INVALID_ARGUMENT)

    assert "items[0].variant_id" in too_long.details()
    assert str(4 * 1024 * 1024) in refused.details(), refused.details()  # the server's limit, not ours
    assert (await check(shop, ("shirt", 1))).all_available  # the service is still fine
