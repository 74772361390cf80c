"""The back office's contract, end to end: warehouses, movements, stock policy, stock levels,
the ledger and transfers, over gRPC against a running `inventory serve`.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.pb import inventory_pb2 as pb

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

RECEIPT, ISSUE, ADJUSTMENT, RETURN = (pb.MOVEMENT_TYPE_RECEIPT, pb.MOVEMENT_TYPE_ISSUE,
                                      pb.MOVEMENT_TYPE_ADJUSTMENT, pb.MOVEMENT_TYPE_RETURN)


async def move(shop: Any, variant: str, warehouse: str, kind: int, quantity: int,
               **extra: Any) -> pb.StockLevel:
    reply = await shop.admin.RecordMovement(pb.MovementRequest(
        organization_id=shop.org, variant_id=variant, warehouse_id=warehouse, type=kind, quantity=quantity,
        **extra))
    return reply.stock


def counts(level: pb.StockLevel) -> tuple[int, int, int, int]:
    return level.on_hand, level.reserved, level.available, level.in_transit


async def movements(shop: Any, variant: str, warehouse: str = "", page_size: int = 0) -> list[pb.Movement]:
    """Every movement of the variant, newest first, following next_page_token to the end."""
    found: list[pb.Movement] = []
    token = ""
    for _ in range(1000):
        page = await shop.admin.ListMovements(pb.ListMovementsRequest(
            organization_id=shop.org, variant_id=variant, warehouse_id=warehouse, page_size=page_size,
            page_token=token))
        found.extend(page.movements)
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("ListMovements never ended")


# ---------------------------------------------------------------- warehouses


async def test_upserted_warehouses_are_listed_and_updated_in_place(shop, shop_on, clients):
    await shop.warehouse("south", name="South")
    created = await shop.warehouse("north", name="North")
    updated = await shop.warehouse("north", name="North (closed)", active=False)

    listed = await shop.admin.ListWarehouses(pb.ListWarehousesRequest(organization_id=shop.org))
    others = await clients.admin.ListWarehouses(pb.ListWarehousesRequest(organization_id="other-" + shop.org))

    assert (created.organization_id, created.warehouse_id, created.name, created.active) == (
        shop.org, "north", "North", True)
    assert (updated.name, updated.active) == ("North (closed)", False)
    assert [(w.warehouse_id, w.name, w.active) for w in listed.warehouses] == [
        ("north", "North (closed)", False), ("south", "South", True)]
    assert list(others.warehouses) == []


@pytest.mark.parametrize(("request_", "field"), [
    ({"warehouse_id": "north"}, "organization_id"),
    ({"organization_id": "{org}"}, "warehouse_id"),
    ({"organization_id": "{org}", "warehouse_id": "north", "name": "n" * 501}, "name"),
])
async def test_an_invalid_warehouse_is_rejected_naming_the_field(shop, grpc_error, request_, field):
    request = pb.Warehouse(**{k: v.format(org=shop.org) for k, v in request_.items()})

    error = await grpc_error(shop.admin.UpsertWarehouse(request), INVALID_ARGUMENT)

    assert error.details().startswith(field + ":"), error.details()
    listed = await shop.admin.ListWarehouses(pb.ListWarehousesRequest(organization_id=shop.org))
    assert list(listed.warehouses) == []


# ---------------------------------------------------------------- movements


async def test_a_receipt_creates_the_stock(shop, grpc_error):
    await shop.warehouse("north")
    assert await shop.levels("shirt") == {}
    await grpc_error(shop.level("shirt", "north"), NOT_FOUND)

    level = await shop.receive("shirt", "north", 10)

    assert (level.organization_id, level.variant_id, level.warehouse_id) == (shop.org, "shirt", "north")
    assert counts(level) == (10, 0, 10, 0)
    assert level.status == "active" and level.version > 0
    assert counts(await shop.level("shirt", "north")) == (10, 0, 10, 0)


@pytest.mark.parametrize("kind", [ISSUE, RETURN, ADJUSTMENT])
async def test_a_movement_other_than_a_receipt_needs_an_existing_stock(shop, grpc_error, kind):
    await shop.warehouse("north")

    await grpc_error(move(shop, "shirt", "north", kind, 1), NOT_FOUND)

    assert await shop.levels("shirt") == {}


async def test_issues_returns_and_adjustments_move_on_hand(shop):
    await shop.receive("shirt", "north", 10)

    after = [counts(await move(shop, "shirt", "north", kind, q)) for kind, q in
             [(ISSUE, 3), (RETURN, 2), (ADJUSTMENT, -4), (ADJUSTMENT, 1), (RECEIPT, 5)]]

    assert [c[0] for c in after] == [7, 9, 5, 6, 11]
    assert counts(await shop.level("shirt", "north")) == (11, 0, 11, 0)


@pytest.mark.parametrize(("kind", "quantity"), [(ISSUE, 11), (ADJUSTMENT, -11)])
async def test_on_hand_may_never_go_negative(shop, grpc_error, kind, quantity):
    await shop.receive("shirt", "north", 10)

    await grpc_error(move(shop, "shirt", "north", kind, quantity), FAILED_PRECONDITION)

    assert counts(await shop.level("shirt", "north")) == (10, 0, 10, 0)


async def test_on_hand_may_not_overflow_int32(shop, grpc_error):
    await shop.receive("shirt", "north", 10)

    error = await grpc_error(move(shop, "shirt", "north", ADJUSTMENT, 2**31 - 1), INVALID_ARGUMENT)

    assert error.details().startswith("quantity:")
    assert counts(await shop.level("shirt", "north")) == (10, 0, 10, 0)


@pytest.mark.parametrize(("kind", "quantity"), [(ISSUE, 5), (ADJUSTMENT, -5)])
async def test_on_hand_may_never_go_below_reserved(shop, grpc_error, kind, quantity):
    await shop.receive("shirt", "north", 10)
    await shop.reserve("order-1", ("shirt", 6))

    error = await grpc_error(move(shop, "shirt", "north", kind, quantity), FAILED_PRECONDITION)
    unchanged = counts(await shop.level("shirt", "north"))
    allowed = await move(shop, "shirt", "north", kind, quantity + (1 if quantity < 0 else -1))

    assert "shirt" in error.details()
    assert unchanged == (10, 6, 4, 0)
    assert counts(allowed) == (6, 6, 0, 0)


async def test_a_movement_retried_with_its_idempotency_key_has_no_second_effect(shop):
    await shop.receive("shirt", "north", 10)

    first = await move(shop, "shirt", "north", ISSUE, 3, idempotency_key="pick-1", reference_id="order-9")
    retry = await move(shop, "shirt", "north", ISSUE, 3, idempotency_key="pick-1", reference_id="order-9")
    other = await move(shop, "shirt", "north", ISSUE, 3, idempotency_key="pick-2")

    assert counts(first) == counts(retry) == (7, 0, 7, 0)
    assert retry.version == first.version
    assert counts(other) == (4, 0, 4, 0)
    issues = [m for m in await movements(shop, "shirt") if m.type == "issue"]
    assert [(m.on_hand_delta, m.reference_id) for m in issues] == [(-3, ""), (-3, "order-9")]


async def test_a_retried_receipt_that_created_the_stock_has_no_second_effect(shop):
    await shop.warehouse("north")

    first = await shop.receive("shirt", "north", 5, idempotency_key="delivery-1")
    retry = await shop.receive("shirt", "north", 5, idempotency_key="delivery-1")

    assert counts(first) == counts(retry) == (5, 0, 5, 0)
    assert counts(await shop.level("shirt", "north")) == (5, 0, 5, 0)


@pytest.mark.parametrize(("change", "field"), [
    ({"organization_id": ""}, "organization_id"),
    ({"variant_id": ""}, "variant_id"),
    ({"type": pb.MOVEMENT_TYPE_UNSPECIFIED}, "type"),
    ({"quantity": 0}, "quantity"),
    ({"quantity": -2}, "quantity"),
    ({"type": ADJUSTMENT, "quantity": 0}, "quantity"),
    ({"warehouse_id": ""}, "warehouse_id"),
    ({"warehouse_id": "nowhere"}, "warehouse_id"),
])
async def test_an_invalid_movement_is_rejected_naming_the_field(shop, grpc_error, change, field):
    await shop.receive("shirt", "north", 10)
    request = {"organization_id": shop.org, "variant_id": "shirt", "warehouse_id": "north", "type": RECEIPT,
               "quantity": 1}
    request.update(change)

    error = await grpc_error(shop.admin.RecordMovement(pb.MovementRequest(**request)), INVALID_ARGUMENT)

    assert error.details().startswith(field + ":"), error.details()
    assert counts(await shop.level("shirt", "north")) == (10, 0, 10, 0)


# ---------------------------------------------------------------- policy and levels


async def test_a_stock_policy_is_set_and_read_back(shop):
    await shop.receive("shirt", "north", 10)

    reply = await shop.admin.SetStockPolicy(pb.StockPolicyRequest(
        organization_id=shop.org, variant_id="shirt", warehouse_id="north", min_stock=2, max_stock=50,
        reorder_point=5))
    level = await shop.level("shirt", "north")

    assert (reply.stock.min_stock, reply.stock.max_stock, reply.stock.reorder_point) == (2, 50, 5)
    assert (level.min_stock, level.max_stock, level.reorder_point) == (2, 50, 5)
    assert counts(level) == (10, 0, 10, 0)


@pytest.mark.parametrize(("policy", "code"), [
    ({"min_stock": 10, "max_stock": 5}, INVALID_ARGUMENT),
    ({"min_stock": -1}, INVALID_ARGUMENT),
    ({"warehouse_id": "south", "min_stock": 1}, NOT_FOUND),
    ({"variant_id": "hat", "min_stock": 1}, NOT_FOUND),
])
async def test_an_impossible_stock_policy_is_rejected(shop, grpc_error, policy, code):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")
    request = {"organization_id": shop.org, "variant_id": "shirt", "warehouse_id": "north"}
    request.update(policy)

    await grpc_error(shop.admin.SetStockPolicy(pb.StockPolicyRequest(**request)), code)

    level = await shop.level("shirt", "north")
    assert (level.min_stock, level.max_stock, level.reorder_point) == (0, 0, 0)


async def test_stock_is_read_for_all_warehouses_or_one(shop, grpc_error, shop_on, clients):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 4)
    await shop.warehouse("east")
    await shop.reserve("order-1", ("shirt", 3, "south"))

    every = await shop.levels("shirt")
    one = await shop.level("shirt", "south")
    await grpc_error(shop.level("shirt", "east"), NOT_FOUND)  # a warehouse without a record of it
    foreign = await shop_on(clients, "other-" + shop.org).levels("shirt")

    assert {w: counts(lv) for w, lv in every.items()} == {"north": (10, 0, 10, 0), "south": (4, 3, 1, 0)}
    assert counts(one) == (4, 3, 1, 0) and one.warehouse_id == "south"
    assert foreign == {}


# ---------------------------------------------------------------- the ledger


async def test_movements_list_every_change_newest_first_with_versions_growing_by_one(shop):
    await shop.receive("shirt", "north", 10)
    await shop.receive("shirt", "south", 3)
    await move(shop, "shirt", "north", ISSUE, 2)
    first = await shop.reserve("order-1", ("shirt", 4, "north"))
    await shop.reserve("order-2", ("shirt", 1, "south"))
    await shop.release(first.reservation_id)
    await move(shop, "shirt", "north", ADJUSTMENT, -1)
    await shop.admin.SetStockPolicy(pb.StockPolicyRequest(
        organization_id=shop.org, variant_id="shirt", warehouse_id="north", min_stock=1))
    await shop.admin.TransferStock(pb.TransferRequest(
        organization_id=shop.org, variant_id="shirt", from_warehouse_id="north", to_warehouse_id="south",
        quantity=2, transfer_id="t-1"))

    paged = await movements(shop, "shirt", page_size=2)
    whole = await movements(shop, "shirt", page_size=500)
    levels = await shop.levels("shirt")

    assert [m.movement_id for m in paged] == [m.movement_id for m in whole]
    ids = [m.movement_id for m in paged]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    types = {m.type for m in paged}
    assert {"receipt", "issue", "reserve", "release", "adjustment", "transfer_out",
            "transfer_in_transit"} <= types
    for warehouse, level in levels.items():
        mine = [m for m in paged if m.warehouse_id == warehouse]
        assert mine == list(await movements(shop, "shirt", warehouse=warehouse, page_size=3))
        assert [m.version for m in mine] == list(range(level.version, 0, -1)), warehouse
        assert sum(m.on_hand_delta for m in mine) == level.on_hand
        assert sum(m.reserved_delta for m in mine) == level.reserved
        assert sum(m.in_transit_delta for m in mine) == level.in_transit
        assert all(m.organization_id == shop.org and m.variant_id == "shirt" and m.occurred_at for m in mine)
    assert {w: counts(lv) for w, lv in levels.items()} == {"north": (5, 0, 5, 0), "south": (3, 1, 2, 2)}


async def test_a_page_of_movements_says_whether_more_follow(shop):
    await shop.receive("shirt", "north", 1)
    count = len(await movements(shop, "shirt"))

    exact = await shop.admin.ListMovements(pb.ListMovementsRequest(
        organization_id=shop.org, variant_id="shirt", page_size=count))
    short = await shop.admin.ListMovements(pb.ListMovementsRequest(
        organization_id=shop.org, variant_id="shirt", page_size=count - 1))

    assert len(exact.movements) == count and exact.next_page_token == ""
    assert len(short.movements) == count - 1 and short.next_page_token != ""


@pytest.mark.parametrize(("change", "field"), [
    ({"page_size": 501}, "page_size"),
    ({"page_size": -1}, "page_size"),
    ({"page_token": "not-a-token"}, "page_token"),
    ({"variant_id": ""}, "variant_id"),
])
async def test_an_invalid_movement_listing_is_rejected_naming_the_field(shop, grpc_error, change, field):
    request = {"organization_id": shop.org, "variant_id": "shirt"}
    request.update(change)

    error = await grpc_error(shop.admin.ListMovements(pb.ListMovementsRequest(**request)), INVALID_ARGUMENT)

    assert error.details().startswith(field + ":"), error.details()


@pytest.mark.parametrize("token", ["99999999999999999999", "\u00b2"])
async def test_a_page_token_that_no_page_could_have_given_is_invalid(shop, grpc_error, token):
    await shop.receive("shirt", "north", 1)

    error = await grpc_error(shop.admin.ListMovements(pb.ListMovementsRequest(
        organization_id=shop.org, variant_id="shirt", page_token=token)))

    assert error.code() == INVALID_ARGUMENT, f"{error.code().name}: {error.details()}"
    assert error.details().startswith("page_token:")


# ---------------------------------------------------------------- transfers


async def transfer(shop: Any, quantity: int, transfer_id: str = "", source: str = "north",
                   destination: str = "south") -> pb.TransferResponse:
    return await shop.admin.TransferStock(pb.TransferRequest(
        organization_id=shop.org, variant_id="shirt", from_warehouse_id=source, to_warehouse_id=destination,
        quantity=quantity, transfer_id=transfer_id, reason="rebalance"))


async def receive_transfer(shop: Any, transfer_id: str) -> pb.TransferResponse:
    return await shop.admin.ReceiveTransfer(pb.ReceiveTransferRequest(
        organization_id=shop.org, transfer_id=transfer_id))


async def test_a_transfer_is_in_transit_until_received(shop):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")

    shipped = await transfer(shop, 4, "t-1")
    in_transit = await shop.levels("shirt")
    received = await receive_transfer(shop, "t-1")
    after = await shop.levels("shirt")

    assert shipped.transfer_id == "t-1"
    assert counts(shipped.source) == (6, 0, 6, 0) and counts(shipped.destination) == (0, 0, 0, 4)
    assert {w: counts(lv) for w, lv in in_transit.items()} == {"north": (6, 0, 6, 0), "south": (0, 0, 0, 4)}
    assert counts(received.destination) == (4, 0, 4, 0)
    assert {w: counts(lv) for w, lv in after.items()} == {"north": (6, 0, 6, 0), "south": (4, 0, 4, 0)}


async def test_a_transfer_and_its_receipt_retried_have_no_second_effect(shop):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")

    first = await transfer(shop, 4, "t-1")
    retried = await transfer(shop, 4, "t-1")
    shipped = await shop.levels("shirt")
    received = await receive_transfer(shop, "t-1")
    received_again = await receive_transfer(shop, "t-1")
    after = await shop.levels("shirt")

    assert counts(retried.source) == counts(first.source) and counts(retried.destination) == counts(
        first.destination)
    assert {w: counts(lv) for w, lv in shipped.items()} == {"north": (6, 0, 6, 0), "south": (0, 0, 0, 4)}
    assert counts(received_again.destination) == counts(received.destination) == (4, 0, 4, 0)
    assert {w: counts(lv) for w, lv in after.items()} == {"north": (6, 0, 6, 0), "south": (4, 0, 4, 0)}
    kinds = [m.type for m in await movements(shop, "shirt")]
    assert [kinds.count(k) for k in ("transfer_out", "transfer_in_transit", "transfer_receive")] == [1, 1, 1]


async def test_a_transfer_without_an_id_gets_one(shop):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")

    shipped = await transfer(shop, 1)
    received = await receive_transfer(shop, shipped.transfer_id)

    assert shipped.transfer_id
    assert counts(received.destination) == (1, 0, 1, 0)


async def test_a_transfer_may_not_take_reserved_stock(shop, grpc_error):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")
    await shop.reserve("order-1", ("shirt", 7))

    await grpc_error(transfer(shop, 4, "t-1"), FAILED_PRECONDITION)

    assert {w: counts(lv) for w, lv in (await shop.levels("shirt")).items()} == {"north": (10, 7, 3, 0)}


@pytest.mark.parametrize(("args", "code", "field"), [
    ({"quantity": 0}, INVALID_ARGUMENT, "quantity"),
    ({"quantity": 1, "destination": "north"}, INVALID_ARGUMENT, "to_warehouse_id"),
    ({"quantity": 1, "destination": "nowhere"}, INVALID_ARGUMENT, "to_warehouse_id"),
    ({"quantity": 1, "source": "nowhere"}, INVALID_ARGUMENT, "from_warehouse_id"),
    ({"quantity": 1, "source": "south", "destination": "north"}, NOT_FOUND, ""),  # no stock in south
])
async def test_an_impossible_transfer_is_rejected(shop, grpc_error, args, code, field):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")

    error = await grpc_error(transfer(shop, **args), code)

    assert error.details().startswith(field), error.details()
    assert {w: counts(lv) for w, lv in (await shop.levels("shirt")).items()} == {"north": (10, 0, 10, 0)}


async def test_receiving_an_unknown_or_foreign_transfer_is_not_found(shop, shop_on, clients, grpc_error):
    await shop.receive("shirt", "north", 10)
    await shop.warehouse("south")
    await transfer(shop, 2, "t-1")

    await grpc_error(receive_transfer(shop, "t-unknown"), NOT_FOUND)
    await grpc_error(receive_transfer(shop_on(clients, "other-" + shop.org), "t-1"), NOT_FOUND)

    assert counts(await shop.level("shirt", "south")) == (0, 0, 0, 2)
