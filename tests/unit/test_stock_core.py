"""Example-based tests of the pure stock core (`actors/stock.py`).

Every test drives `decide` through `ShardFake`, which applies each decision's events to
its working states with `apply`, the way a shard does, so a test reads as a conversation:
send a command at some `now`, look at the reply, the events and the resulting levels.
"""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

import msgspec
import pytest

from actors.messages import (
    AbortReservation,
    Command,
    ConfirmReservation,
    DoneResult,
    Event,
    ExpireReservation,
    PolicyChanged,
    ReadStock,
    ReceiveTransfer,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    ReservationAborted,
    ReservationConfirmed,
    ReservationExpired,
    ReservationReleased,
    ReservationResult,
    ReservationShipped,
    ReservedLine,
    ReserveLine,
    ReserveStock,
    SetStockPolicy,
    SetWarehouseActive,
    ShipReservation,
    ShipTransfer,
    Shortage,
    StockCreated,
    StockKey,
    StockLevelsResult,
    StockMoved,
    StockReserved,
    ThresholdCrossed,
)
from actors.stock import (
    MAX_QUANTITY,
    Choice,
    Decision,
    PriorLine,
    PriorReservation,
    StockState,
    apply,
    choose_warehouse,
    decide,
    evolve,
    get_line,
    level,
    line_ids,
    open_lines,
    prior_of,
    replay,
)

ORG = "org-1"
V = "variant-a"
V2 = "variant-b"
TTL = 600.0
T0 = 1_000.0
E = TypeVar("E")


class ShardFake:
    """The working states of one shard: decide, then apply every event in place."""

    def __init__(self, *states: StockState) -> None:
        self.states: dict[StockKey, StockState] = {s.key: s for s in states}
        self.log: list[tuple[StockKey, Event]] = []

    def send(self, command: Command, now: float = T0, prior: PriorReservation | None = None) -> Decision:
        decision = decide(self.states, command, now, prior)
        for key, event in decision.events:
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = StockState(*key)
            apply(state, event)
        self.log.extend(decision.events)
        return decision

    def stock(self, warehouse_id: str, variant_id: str = V) -> StockState:
        return self.states[(ORG, variant_id, warehouse_id)]


def stock(warehouse_id: str, on_hand: int = 0, variant_id: str = V, **fields: object) -> StockState:
    return StockState(ORG, variant_id, warehouse_id, on_hand=on_hand, **fields)  # type: ignore[arg-type]


def reserve(
    reservation_id: str,
    *lines: tuple[str, str, int],
    expires_at: float = T0 + TTL,
    items_hash: str | None = None,
) -> ReserveStock:
    """lines are (variant_id, warehouse_id, quantity); the hash defaults to the lines' text."""
    return ReserveStock(
        organization_id=ORG,
        reservation_id=reservation_id,
        order_id=f"order-of-{reservation_id}",
        items_hash=items_hash if items_hash is not None else repr(lines),
        expires_at=expires_at,
        lines=tuple(ReserveLine(v, w, q) for v, w, q in lines),
    )


def movement(warehouse_id: str, kind: str, quantity: int, *, create: bool = False) -> RecordMovement:
    return RecordMovement(ORG, V, warehouse_id, kind, quantity, create_if_missing=create)


def events(decision: Decision) -> list[Event]:
    return [event for _, event in decision.events]


def of_type(decision: Decision, kind: type[E]) -> list[E]:
    return [event for event in events(decision) if isinstance(event, kind)]


def thresholds(decision: Decision) -> list[str]:
    return [event.kind for event in events(decision) if isinstance(event, ThresholdCrossed)]


def read(shard: ShardFake, now: float, variant_id: str = V) -> dict[str, tuple[int, int, int]]:
    """(on_hand, reserved, available) per warehouse as a ReadStock at `now` reports it."""
    reply = shard.send(ReadStock(ORG, variant_id), now).reply
    assert isinstance(reply, StockLevelsResult)
    return {lv.warehouse_id: (lv.on_hand, lv.reserved, lv.available) for lv in reply.levels}


# ---------------------------------------------------------------- reserving


def test_reserving_within_available_succeeds_and_emits_stock_reserved() -> None:
    shard = ShardFake(stock("w1", 10))
    decision = shard.send(reserve("r1", (V, "", 4)))
    assert decision.reply == ReservationResult("r1", T0 + TTL, (ReservedLine(V, "w1", 4),))
    assert decision.events == [
        ((ORG, V, "w1"), StockReserved("r1", "order-of-r1", 4, T0 + TTL, repr(((V, "", 4),))))
    ]
    assert (shard.stock("w1").on_hand, shard.stock("w1").reserved) == (10, 4)
    assert get_line(shard.stock("w1"), "r1").quantity == 4


def test_reserving_exactly_the_available_quantity_succeeds() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 3)))
    decision = shard.send(reserve("r2", (V, "", 7)))
    assert isinstance(decision.reply, ReservationResult)
    assert shard.stock("w1").available == 0


def test_reserving_more_than_available_is_rejected_as_insufficient_stock() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 4)))
    decision = shard.send(reserve("r2", (V, "", 7)))
    reply = decision.reply
    assert isinstance(reply, Rejected)
    assert reply.code == "insufficient_stock"
    assert V in reply.message
    assert reply.shortages == (Shortage(V, "w1", 7, 6),)
    assert of_type(decision, StockReserved) == []
    assert shard.stock("w1").reserved == 4
    assert get_line(shard.stock("w1"), "r2") is None


def test_a_rejected_reservation_emits_no_events_at_all_when_nothing_expired() -> None:
    shard = ShardFake(stock("w1", 1))
    decision = shard.send(reserve("r1", (V, "", 2)))
    assert decision.events == []
    assert shard.stock("w1").version == 0


def test_a_reservation_across_several_variants_reserves_every_line() -> None:
    shard = ShardFake(stock("w1", 5), stock("w1", 5, V2))
    decision = shard.send(reserve("r1", (V, "", 2), (V2, "", 3)))
    assert isinstance(decision.reply, ReservationResult)
    assert Counter(decision.reply.lines) == Counter([ReservedLine(V, "w1", 2), ReservedLine(V2, "w1", 3)])
    assert shard.stock("w1").reserved == 2
    assert shard.stock("w1", V2).reserved == 3


def test_a_reservation_with_one_short_line_reserves_none_of_its_lines() -> None:
    shard = ShardFake(stock("w1", 5), stock("w1", 1, V2))
    decision = shard.send(reserve("r1", (V, "", 2), (V2, "", 3)))
    reply = decision.reply
    assert isinstance(reply, Rejected) and reply.code == "insufficient_stock"
    assert reply.shortages == (Shortage(V2, "w1", 3, 1),)
    assert V2 in reply.message and V not in reply.message.replace(V2, "")
    assert decision.events == []
    assert shard.stock("w1").reserved == 0 and shard.stock("w1", V2).reserved == 0


def test_every_short_line_of_a_reservation_is_reported() -> None:
    shard = ShardFake(stock("w1", 1), stock("w1", 1, V2))
    reply = shard.send(reserve("r1", (V, "", 2), (V2, "", 3))).reply
    assert isinstance(reply, Rejected)
    assert set(reply.shortages) == {Shortage(V, "w1", 2, 1), Shortage(V2, "w1", 3, 1)}
    assert V in reply.message and V2 in reply.message


def test_a_later_line_of_a_reservation_sees_what_an_earlier_line_took() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 8))
    reply = shard.send(reserve("r1", (V, "w1", 5), (V, "", 3))).reply
    assert isinstance(reply, ReservationResult)
    assert reply.lines == (ReservedLine(V, "w1", 5), ReservedLine(V, "w2", 3))


def test_reserving_an_unknown_variant_is_insufficient_in_no_warehouse() -> None:
    shard = ShardFake(stock("w1", 5))
    reply = shard.send(reserve("r1", ("nope", "", 1))).reply
    assert isinstance(reply, Rejected) and reply.code == "insufficient_stock"
    assert reply.shortages == (Shortage("nope", "", 1, 0),)
    assert "nope" in reply.message


@pytest.mark.parametrize("quantity", [0, -1, MAX_QUANTITY + 1])
def test_reserving_a_non_positive_or_huge_quantity_is_invalid(quantity: int) -> None:
    shard = ShardFake(stock("w1", 5))
    decision = shard.send(reserve("r1", (V, "", quantity)))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert "quantity" in decision.reply.message
    assert decision.events == []


def test_reserving_no_lines_or_an_empty_variant_is_invalid() -> None:
    shard = ShardFake(stock("w1", 5))
    for command in (reserve("r1"), reserve("r2", ("", "", 1))):
        reply = shard.send(command).reply
        assert isinstance(reply, Rejected) and reply.code == "invalid"


@pytest.mark.parametrize("expires_at", [T0, T0 - 1, 0.0])
def test_a_reservation_that_would_already_be_expired_is_invalid(expires_at: float) -> None:
    shard = ShardFake(stock("w1", 5))
    decision = shard.send(reserve("r1", (V, "", 1), expires_at=expires_at), T0)
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []


# ---------------------------------------------------------------- choosing the warehouse


def test_an_unpinned_line_goes_to_the_warehouse_with_the_most_available() -> None:
    shard = ShardFake(stock("w1", 5), stock("w2", 9), stock("w3", 7))
    reply = shard.send(reserve("r1", (V, "", 3))).reply
    assert isinstance(reply, ReservationResult)
    assert reply.lines == (ReservedLine(V, "w2", 3),)


def test_available_not_on_hand_decides_the_warehouse() -> None:
    shard = ShardFake(stock("w1", 8), stock("w2", 9))
    shard.send(reserve("r1", (V, "w2", 5)))
    reply = shard.send(reserve("r2", (V, "", 1))).reply
    assert isinstance(reply, ReservationResult) and reply.lines[0].warehouse_id == "w1"


def test_a_pinned_line_uses_only_its_warehouse() -> None:
    shard = ShardFake(stock("w1", 2), stock("w2", 100))
    ok = shard.send(reserve("r1", (V, "w1", 2))).reply
    assert isinstance(ok, ReservationResult) and ok.lines == (ReservedLine(V, "w1", 2),)
    short = shard.send(reserve("r2", (V, "w1", 1))).reply
    assert isinstance(short, Rejected) and short.shortages == (Shortage(V, "w1", 1, 0),)
    assert "w1" in short.message


def test_an_insufficient_unpinned_line_names_the_largest_single_warehouse() -> None:
    shard = ShardFake(stock("w1", 4), stock("w2", 6), stock("w3", 5))
    reply = shard.send(reserve("r1", (V, "", 8))).reply
    assert isinstance(reply, Rejected) and reply.code == "insufficient_stock"
    assert reply.shortages == (Shortage(V, "w2", 8, 6),)
    assert "w2" in reply.message


def test_inactive_warehouses_are_skipped() -> None:
    shard = ShardFake(stock("w1", 3), stock("w2", 50, warehouse_active=False))
    reply = shard.send(reserve("r1", (V, "", 2))).reply
    assert isinstance(reply, ReservationResult) and reply.lines == (ReservedLine(V, "w1", 2),)
    short = shard.send(reserve("r2", (V, "", 5))).reply
    assert isinstance(short, Rejected) and short.shortages == (Shortage(V, "w1", 5, 1),)


def test_a_line_pinned_to_an_inactive_warehouse_is_short() -> None:
    shard = ShardFake(stock("w1", 50, warehouse_active=False))
    reply = shard.send(reserve("r1", (V, "w1", 1))).reply
    assert isinstance(reply, Rejected) and reply.shortages == (Shortage(V, "w1", 1, 0),)


def test_archived_stocks_are_skipped_while_another_is_active() -> None:
    shard = ShardFake(stock("w1", 3), stock("w2", 50, status="archived"))
    reply = shard.send(reserve("r1", (V, "", 2))).reply
    assert isinstance(reply, ReservationResult) and reply.lines == (ReservedLine(V, "w1", 2),)


def test_reserving_a_variant_archived_everywhere_is_rejected_as_archived() -> None:
    shard = ShardFake(stock("w1", 3), stock("w1", 50, V2, status="archived"))
    decision = shard.send(reserve("r1", (V, "", 2), (V2, "", 1)))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "archived"
    assert V2 in decision.reply.message
    assert decision.events == []


def test_choose_warehouse_prefers_the_preferred_warehouse_when_it_covers_the_quantity() -> None:
    candidates = [("w1", 10), ("w2", 3)]
    assert choose_warehouse(candidates, 3, "w2") == Choice("w2", 3, True)


def test_choose_warehouse_ignores_a_preferred_warehouse_that_cannot_cover() -> None:
    candidates = [("w1", 10), ("w2", 3)]
    assert choose_warehouse(candidates, 4, "w2") == Choice("w1", 10, True)


def test_choose_warehouse_takes_the_most_available_and_breaks_ties_on_the_id() -> None:
    assert choose_warehouse([("w3", 5), ("w1", 9), ("w2", 9)], 2) == Choice("w1", 9, True)


def test_choose_warehouse_names_the_largest_warehouse_when_none_covers() -> None:
    assert choose_warehouse([("w1", 4), ("w2", 6)], 8) == Choice("w2", 6, False)


def test_choose_warehouse_without_candidates_is_insufficient_nowhere() -> None:
    assert choose_warehouse([], 1) == Choice("", 0, False)


def test_choose_warehouse_never_reports_negative_available() -> None:
    assert choose_warehouse([("w1", -3)], 1) == Choice("w1", 0, False)


# ---------------------------------------------------------------- idempotency


def test_the_same_reserve_stock_again_returns_the_same_reservation_replayed_without_events() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 10))
    command = reserve("r1", (V, "w1", 2), (V, "w2", 3))
    first = shard.send(command).reply
    before = [msgspec.structs.asdict(s) for s in shard.states.values()]
    again = shard.send(command, T0 + 5)
    assert again.events == []
    assert isinstance(first, ReservationResult) and isinstance(again.reply, ReservationResult)
    assert again.reply.replayed is True and first.replayed is False
    assert again.reply.reservation_id == "r1" and again.reply.expires_at == first.expires_at
    assert Counter(again.reply.lines) == Counter(first.lines)
    assert again.reply.status == "active"
    assert [msgspec.structs.asdict(s) for s in shard.states.values()] == before


def test_a_retry_is_replayed_even_when_the_stock_is_now_exhausted() -> None:
    shard = ShardFake(stock("w1", 5))
    command = reserve("r1", (V, "", 5))
    shard.send(command)
    again = shard.send(command).reply
    assert isinstance(again, ReservationResult) and again.replayed


def test_a_retry_with_other_items_under_the_same_id_is_a_conflict() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 2)))
    decision = shard.send(reserve("r1", (V, "", 3)))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "conflict"
    assert decision.events == []
    assert shard.stock("w1").reserved == 2


def test_a_retry_of_a_confirmed_reservation_reports_it_confirmed() -> None:
    shard = ShardFake(stock("w1", 10))
    command = reserve("r1", (V, "", 2))
    shard.send(command)
    shard.send(ConfirmReservation(ORG, "r1", (V,)))
    reply = shard.send(command, T0 + 10 * TTL).reply
    assert isinstance(reply, ReservationResult) and reply.replayed and reply.status == "confirmed"


@pytest.mark.parametrize("status", ["released", "expired"])
def test_a_retry_of_a_reservation_the_store_remembers_as_closed_is_closed(status: str) -> None:
    shard = ShardFake(stock("w1", 10))
    command = reserve("r1", (V, "", 2))
    prior = PriorReservation(status, command.items_hash, command.expires_at, (ReservedLine(V, "w1", 2),))
    decision = shard.send(command, prior=prior)
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "closed"
    assert status in decision.reply.message
    assert decision.events == []


def test_a_retry_of_a_shipped_reservation_replays_its_success() -> None:
    shard = ShardFake(stock("w1", 10))
    command = reserve("r1", (V, "", 2))
    prior = PriorReservation("shipped", command.items_hash, command.expires_at, (ReservedLine(V, "w1", 2),))
    decision = shard.send(command, prior=prior)
    assert decision.reply == ReservationResult(
        "r1", command.expires_at, (ReservedLine(V, "w1", 2),), replayed=True, status="shipped"
    )
    assert decision.events == []


def test_a_retry_with_other_items_than_a_remembered_reservation_is_a_conflict() -> None:
    shard = ShardFake(stock("w1", 10))
    prior = PriorReservation("shipped", "other-hash", T0, (ReservedLine(V, "w1", 2),))
    reply = shard.send(reserve("r1", (V, "", 2)), prior=prior).reply
    assert isinstance(reply, Rejected) and reply.code == "conflict"


def test_a_retry_after_the_reservation_expired_is_closed() -> None:
    shard = ShardFake(stock("w1", 10))
    command = reserve("r1", (V, "", 2), expires_at=T0 + 10)
    shard.send(command)
    decision = shard.send(command, T0 + 11)
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "closed"
    assert events(decision) == [ReservationExpired("r1", "order-of-r1", 2, T0 + 10)]
    assert shard.stock("w1").reserved == 0


def test_a_shipped_reservation_replayed_from_the_store_wins_over_nothing_open() -> None:
    shard = ShardFake(stock("w1", 10))
    command = reserve("r1", (V, "", 2))
    shard.send(command)
    shard.send(ShipReservation(ORG, "r1", (V,)))
    prior = PriorReservation("shipped", command.items_hash, command.expires_at, (ReservedLine(V, "w1", 2),))
    reply = shard.send(command, prior=prior).reply
    assert isinstance(reply, ReservationResult) and reply.status == "shipped"
    assert shard.stock("w1").on_hand == 8 and shard.stock("w1").reserved == 0


# ---------------------------------------------------------------- expiry


def test_an_overdue_line_is_expired_first_by_the_next_command_touching_the_stock() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 5), expires_at=T0 + 10))
    decision = shard.send(reserve("r2", (V, "", 5)), T0 + 20)
    assert isinstance(decision.reply, ReservationResult)
    assert isinstance(events(decision)[0], ReservationExpired)
    assert events(decision)[0] == ReservationExpired("r1", "order-of-r1", 5, T0 + 10)
    assert isinstance(events(decision)[1], StockReserved)
    assert line_ids(shard.stock("w1")) == ["r2"]
    assert shard.stock("w1").reserved == 5


def test_a_line_is_still_reserved_just_before_it_expires() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3), expires_at=T0 + 10))
    assert read(shard, T0 + 9.999) == {"w1": (5, 3, 2)}


def test_a_line_is_expired_at_exactly_its_expiry_time() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3), expires_at=T0 + 10))
    assert read(shard, T0 + 10) == {"w1": (5, 0, 5)}


def test_reading_stock_after_expiry_shows_the_quantity_available_again() -> None:
    shard = ShardFake(stock("w1", 5), stock("w2", 5))
    shard.send(reserve("r1", (V, "w1", 3), (V, "w2", 1), expires_at=T0 + 10))
    assert read(shard, T0 + 1) == {"w1": (5, 3, 2), "w2": (5, 1, 4)}
    decision = shard.send(ReadStock(ORG, V), T0 + 11)
    assert sorted(type(e).__name__ for e in events(decision)) == ["ReservationExpired"] * 2
    assert read(shard, T0 + 11) == {"w1": (5, 0, 5), "w2": (5, 0, 5)}


def test_reading_one_warehouse_expires_only_that_warehouse() -> None:
    shard = ShardFake(stock("w1", 5), stock("w2", 5))
    shard.send(reserve("r1", (V, "w1", 3), (V, "w2", 1), expires_at=T0 + 10))
    decision = shard.send(ReadStock(ORG, V, "w1"), T0 + 11)
    assert [key[2] for key, _ in decision.events] == ["w1"]
    assert isinstance(decision.reply, StockLevelsResult)
    assert [lv.available for lv in decision.reply.levels] == [5]


def test_a_rejected_command_still_keeps_the_expiries_it_found() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3), expires_at=T0 + 10))
    decision = shard.send(reserve("r2", (V, "", 6)), T0 + 20)
    assert isinstance(decision.reply, Rejected) and decision.reply.shortages == (Shortage(V, "w1", 6, 5),)
    assert events(decision) == [ReservationExpired("r1", "order-of-r1", 3, T0 + 10)]
    assert shard.stock("w1").reserved == 0


def test_confirming_after_expiry_is_rejected_as_closed() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3), expires_at=T0 + 10))
    decision = shard.send(ConfirmReservation(ORG, "r1", (V,)), T0 + 10)
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "closed"
    assert "expired" in decision.reply.message
    assert of_type(decision, ReservationConfirmed) == []
    assert of_type(decision, ReservationExpired) == [ReservationExpired("r1", "order-of-r1", 3, T0 + 10)]


def test_shipping_after_expiry_is_rejected_as_closed_and_leaves_on_hand_alone() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3), expires_at=T0 + 10))
    decision = shard.send(ShipReservation(ORG, "r1", (V,)), T0 + 11)
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "closed"
    assert shard.stock("w1").on_hand == 5 and shard.stock("w1").reserved == 0


def test_a_confirmed_line_never_expires() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3), expires_at=T0 + 10))
    shard.send(ConfirmReservation(ORG, "r1", (V,)), T0 + 5)
    assert get_line(shard.stock("w1"), "r1").confirmed
    decision = shard.send(ExpireReservation(ORG, "r1", V), T0 + 1e9)
    assert decision.events == [] and decision.reply == DoneResult(changed=False)
    assert read(shard, T0 + 1e9) == {"w1": (5, 3, 2)}


def test_expire_reservation_expires_the_overdue_lines_of_the_variant() -> None:
    shard = ShardFake(stock("w1", 5), stock("w2", 5))
    shard.send(reserve("r1", (V, "w1", 1), expires_at=T0 + 10))
    shard.send(reserve("r2", (V, "w2", 2), expires_at=T0 + 20))
    shard.send(reserve("r3", (V, "w2", 1), expires_at=T0 + 30))
    decision = shard.send(ExpireReservation(ORG, "r1", V), T0 + 25)
    assert decision.reply == DoneResult(changed=True)
    assert sorted(e.reservation_id for e in of_type(decision, ReservationExpired)) == ["r1", "r2"]
    assert line_ids(shard.stock("w2")) == ["r3"]


def test_expire_reservation_with_nothing_overdue_changes_nothing() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 1), expires_at=T0 + 10))
    decision = shard.send(ExpireReservation(ORG, "r1", V), T0 + 9)
    assert decision.events == [] and decision.reply == DoneResult(changed=False)


def test_a_movement_expires_overdue_lines_before_checking_reserved() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 5), expires_at=T0 + 10))
    rejected = shard.send(movement("w1", "issue", 5), T0 + 5).reply
    assert isinstance(rejected, Rejected) and rejected.code == "insufficient_stock"
    decision = shard.send(movement("w1", "issue", 5), T0 + 10)
    assert isinstance(decision.reply, DoneResult)
    assert [type(e) for e in events(decision)][:2] == [ReservationExpired, StockMoved]
    assert (shard.stock("w1").on_hand, shard.stock("w1").reserved) == (0, 0)


# ---------------------------------------------------------------- release, abort, confirm, ship


def test_releasing_returns_the_reserved_quantity_to_available() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3)))
    decision = shard.send(ReleaseReservation(ORG, "r1", (V,), reason="customer"))
    assert events(decision) == [ReservationReleased("r1", 3, "customer")]
    assert decision.reply == DoneResult(changed=True)
    assert shard.stock("w1").available == 5 and line_ids(shard.stock("w1")) == []


def test_releasing_twice_changes_nothing_the_second_time() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(ReleaseReservation(ORG, "r1", (V,)))
    second = shard.send(ReleaseReservation(ORG, "r1", (V,)))
    assert second.reply == DoneResult(changed=False) and second.events == []
    assert shard.stock("w1").available == 5


def test_releasing_an_unknown_reservation_changes_nothing() -> None:
    shard = ShardFake(stock("w1", 5))
    decision = shard.send(ReleaseReservation(ORG, "nope", (V,)))
    assert decision.reply == DoneResult(changed=False) and decision.events == []


def test_releasing_touches_only_the_named_variants() -> None:
    shard = ShardFake(stock("w1", 5), stock("w1", 5, V2))
    shard.send(reserve("r1", (V, "", 1), (V2, "", 2)))
    shard.send(ReleaseReservation(ORG, "r1", (V2,)))
    assert shard.stock("w1").reserved == 1 and shard.stock("w1", V2).reserved == 0


def test_releasing_a_reservation_spread_over_warehouses_releases_every_line() -> None:
    shard = ShardFake(stock("w1", 5), stock("w2", 5))
    shard.send(reserve("r1", (V, "w1", 1), (V, "w2", 2)))
    decision = shard.send(ReleaseReservation(ORG, "r1", (V, V)))
    assert sorted(e.quantity for e in of_type(decision, ReservationReleased)) == [1, 2]
    assert shard.stock("w1").reserved == 0 and shard.stock("w2").reserved == 0


def test_aborting_undoes_a_reservation_once() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3)))
    first = shard.send(AbortReservation(ORG, "r1", (V,)))
    assert events(first) == [ReservationAborted("r1", 3)] and first.reply == DoneResult(changed=True)
    second = shard.send(AbortReservation(ORG, "r1", (V,)))
    assert second.reply == DoneResult(changed=False) and second.events == []
    assert shard.stock("w1").reserved == 0


def test_confirming_removes_the_ttl_and_keeps_the_quantity_reserved() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3)))
    decision = shard.send(ConfirmReservation(ORG, "r1", (V,)))
    assert events(decision) == [ReservationConfirmed("r1", 3)]
    assert decision.reply == DoneResult(changed=True)
    assert shard.stock("w1").reserved == 3 and get_line(shard.stock("w1"), "r1").confirmed


def test_confirming_twice_changes_nothing_the_second_time() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(ConfirmReservation(ORG, "r1", (V,)))
    second = shard.send(ConfirmReservation(ORG, "r1", (V,)))
    assert second.reply == DoneResult(changed=False) and second.events == []


def test_confirming_an_unknown_reservation_is_closed() -> None:
    shard = ShardFake(stock("w1", 5))
    reply = shard.send(ConfirmReservation(ORG, "nope", (V,))).reply
    assert isinstance(reply, Rejected) and reply.code == "closed"


def test_shipping_deducts_on_hand_and_reserved() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(reserve("r2", (V, "", 2)))
    decision = shard.send(ShipReservation(ORG, "r1", (V,)))
    assert events(decision) == [ReservationShipped("r1", "order-of-r1", 3)]
    assert isinstance(decision.reply, DoneResult) and decision.reply.changed
    assert decision.reply.levels == (level(shard.stock("w1")),)
    assert (shard.stock("w1").on_hand, shard.stock("w1").reserved, shard.stock("w1").available) == (7, 2, 5)
    assert line_ids(shard.stock("w1")) == ["r2"]


def test_shipping_a_confirmed_reservation_deducts_it() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(ConfirmReservation(ORG, "r1", (V,)))
    shard.send(ShipReservation(ORG, "r1", (V,)), T0 + 10 * TTL)
    assert (shard.stock("w1").on_hand, shard.stock("w1").reserved) == (7, 0)


def test_shipping_twice_is_rejected_as_closed_the_second_time() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(ShipReservation(ORG, "r1", (V,)))
    second = shard.send(ShipReservation(ORG, "r1", (V,)))
    assert isinstance(second.reply, Rejected) and second.reply.code == "closed"
    assert second.events == [] and shard.stock("w1").on_hand == 7


def test_releasing_after_shipping_changes_nothing() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(ShipReservation(ORG, "r1", (V,)))
    decision = shard.send(ReleaseReservation(ORG, "r1", (V,)))
    assert decision.reply == DoneResult(changed=False)
    assert (shard.stock("w1").on_hand, shard.stock("w1").reserved) == (7, 0)


# ---------------------------------------------------------------- movements


def test_a_receipt_adds_to_on_hand() -> None:
    shard = ShardFake(stock("w1", 2))
    decision = shard.send(movement("w1", "receipt", 5))
    assert events(decision) == [StockMoved("receipt", on_hand_delta=5)]
    assert isinstance(decision.reply, DoneResult)
    assert decision.reply.levels == (level(shard.stock("w1")),)
    assert shard.stock("w1").on_hand == 7 and shard.stock("w1").version == 1


def test_a_return_adds_to_on_hand() -> None:
    shard = ShardFake(stock("w1", 2))
    shard.send(movement("w1", "return", 1))
    assert shard.stock("w1").on_hand == 3


def test_a_receipt_for_a_missing_stock_is_not_found_without_create_if_missing() -> None:
    shard = ShardFake()
    decision = shard.send(movement("w1", "receipt", 5))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "not_found"
    assert decision.events == [] and shard.states == {}


def test_a_receipt_with_create_if_missing_creates_the_stock() -> None:
    shard = ShardFake()
    decision = shard.send(movement("w1", "receipt", 5, create=True))
    assert events(decision) == [StockCreated(), StockMoved("receipt", on_hand_delta=5)]
    assert isinstance(decision.reply, DoneResult)
    assert decision.reply.levels == (level(shard.stock("w1")),)
    assert (shard.stock("w1").on_hand, shard.stock("w1").version) == (5, 2)


@pytest.mark.parametrize(
    "kind, quantity", [("issue", 1), ("adjustment", 3), ("adjustment", -1), ("return", 1)]
)
def test_only_a_receipt_creates_a_missing_stock(kind: str, quantity: int) -> None:
    shard = ShardFake()
    decision = shard.send(movement("w1", kind, quantity, create=True))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "not_found"
    assert decision.events == []


def test_an_issue_within_available_reduces_on_hand() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 4)))
    shard.send(movement("w1", "issue", 6))
    assert (shard.stock("w1").on_hand, shard.stock("w1").reserved) == (4, 4)


def test_an_issue_may_never_take_on_hand_below_reserved() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 4)))
    decision = shard.send(movement("w1", "issue", 7))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "insufficient_stock"
    assert decision.reply.shortages == (Shortage(V, "w1", 7, 6),)
    assert decision.events == [] and shard.stock("w1").on_hand == 10


def test_an_issue_may_never_take_on_hand_below_zero() -> None:
    shard = ShardFake(stock("w1", 3))
    reply = shard.send(movement("w1", "issue", 4)).reply
    assert isinstance(reply, Rejected) and reply.code == "insufficient_stock"
    assert shard.stock("w1").on_hand == 3


def test_a_negative_adjustment_may_never_take_on_hand_below_reserved() -> None:
    shard = ShardFake(stock("w1", 10))
    shard.send(reserve("r1", (V, "", 4)))
    rejected = shard.send(movement("w1", "adjustment", -7)).reply
    assert isinstance(rejected, Rejected) and rejected.code == "insufficient_stock"
    shard.send(movement("w1", "adjustment", -6))
    assert (shard.stock("w1").on_hand, shard.stock("w1").available) == (4, 0)


def test_a_positive_adjustment_adds_to_on_hand() -> None:
    shard = ShardFake(stock("w1", 1))
    shard.send(movement("w1", "adjustment", 4))
    assert shard.stock("w1").on_hand == 5


def test_an_adjustment_of_zero_is_invalid() -> None:
    shard = ShardFake(stock("w1", 10))
    decision = shard.send(movement("w1", "adjustment", 0))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []


@pytest.mark.parametrize("kind", ["receipt", "issue", "return"])
@pytest.mark.parametrize("quantity", [0, -1])
def test_a_non_positive_receipt_issue_or_return_is_invalid(kind: str, quantity: int) -> None:
    shard = ShardFake(stock("w1", 10))
    reply = shard.send(movement("w1", kind, quantity)).reply
    assert isinstance(reply, Rejected) and reply.code == "invalid"


def test_an_unknown_movement_kind_is_invalid() -> None:
    shard = ShardFake(stock("w1", 10))
    decision = shard.send(movement("w1", "theft", 1))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert "theft" in decision.reply.message
    assert decision.events == []


def test_a_receipt_beyond_the_int32_range_is_invalid() -> None:
    shard = ShardFake(stock("w1", MAX_QUANTITY - 1))
    reply = shard.send(movement("w1", "receipt", 2)).reply
    assert isinstance(reply, Rejected) and reply.code == "invalid"
    assert shard.stock("w1").on_hand == MAX_QUANTITY - 1


def test_a_movement_on_an_archived_stock_is_rejected_as_archived() -> None:
    shard = ShardFake(stock("w1", 10, status="archived"))
    reply = shard.send(movement("w1", "receipt", 1)).reply
    assert isinstance(reply, Rejected) and reply.code == "archived"


# ---------------------------------------------------------------- transfers


def test_shipping_a_transfer_moves_on_hand_of_the_source_into_in_transit_of_the_destination() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 1))
    decision = shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1"))
    assert decision.events == [
        ((ORG, V, "w1"), StockMoved("transfer_out", on_hand_delta=-4, reference_id="t1")),
        ((ORG, V, "w2"), StockMoved("transfer_in_transit", in_transit_delta=4, reference_id="t1")),
    ]
    assert isinstance(decision.reply, DoneResult)
    assert decision.reply.levels == (level(shard.stock("w1")), level(shard.stock("w2")))
    assert (shard.stock("w1").on_hand, shard.stock("w1").in_transit) == (6, 0)
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit) == (1, 4)


def test_receiving_a_transfer_moves_in_transit_into_on_hand() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 1))
    shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1"))
    decision = shard.send(ReceiveTransfer(ORG, V, "w2", 4, "t1"))
    assert events(decision) == [
        StockMoved("transfer_receive", on_hand_delta=4, in_transit_delta=-4, reference_id="t1")
    ]
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit) == (5, 0)
    assert shard.stock("w1").on_hand + shard.stock("w2").on_hand == 11


def test_shipping_a_transfer_larger_than_the_source_available_is_rejected() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 0))
    shard.send(reserve("r1", (V, "w1", 7)))
    decision = shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1"))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "insufficient_stock"
    assert decision.reply.shortages == (Shortage(V, "w1", 4, 3),)
    assert decision.events == []
    assert shard.stock("w1").on_hand == 10 and shard.stock("w2").in_transit == 0


def test_shipping_a_transfer_to_a_missing_stock_needs_create_if_missing() -> None:
    shard = ShardFake(stock("w1", 10))
    rejected = shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1")).reply
    assert isinstance(rejected, Rejected) and rejected.code == "not_found" and "w2" in rejected.message
    decision = shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1", create_if_missing=True))
    assert isinstance(decision.reply, DoneResult)
    assert [type(e) for e in events(decision)] == [StockCreated, StockMoved, StockMoved]
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit, shard.stock("w2").version) == (0, 4, 2)


def test_shipping_a_transfer_from_a_missing_stock_is_not_found() -> None:
    shard = ShardFake(stock("w2", 10))
    reply = shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1", create_if_missing=True)).reply
    assert isinstance(reply, Rejected) and reply.code == "not_found" and "w1" in reply.message


def test_shipping_a_transfer_to_the_same_warehouse_is_invalid() -> None:
    shard = ShardFake(stock("w1", 10))
    reply = shard.send(ShipTransfer(ORG, V, "w1", "w1", 4, "t1")).reply
    assert isinstance(reply, Rejected) and reply.code == "invalid"


@pytest.mark.parametrize("quantity", [0, -4])
def test_shipping_a_non_positive_transfer_is_invalid(quantity: int) -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 0))
    decision = shard.send(ShipTransfer(ORG, V, "w1", "w2", quantity, "t1"))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []


def test_receiving_more_than_in_transit_is_rejected() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 0))
    shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1"))
    decision = shard.send(ReceiveTransfer(ORG, V, "w2", 5, "t1"))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == [] and shard.stock("w2").in_transit == 4


def test_receiving_a_transfer_at_a_missing_stock_is_not_found() -> None:
    reply = ShardFake().send(ReceiveTransfer(ORG, V, "w2", 1, "t1")).reply
    assert isinstance(reply, Rejected) and reply.code == "not_found"


def test_receiving_a_negative_transfer_quantity_is_invalid() -> None:
    shard = ShardFake(stock("w1", 2))
    decision = shard.send(ReceiveTransfer(ORG, V, "w1", -5, "t1"))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []
    assert shard.stock("w1").on_hand == 2 and shard.stock("w1").in_transit == 0


def test_receiving_a_transfer_may_never_take_on_hand_below_reserved() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 5)))
    shard.send(ReceiveTransfer(ORG, V, "w1", -3, "t1"))
    assert shard.stock("w1").on_hand >= shard.stock("w1").reserved


def test_receiving_a_transfer_of_zero_is_invalid() -> None:
    shard = ShardFake(stock("w1", 2))
    decision = shard.send(ReceiveTransfer(ORG, V, "w1", 0, "t1"))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []


# ---------------------------------------------------------------- thresholds and policy


def policy(
    warehouse_id: str, min_stock: int = 0, max_stock: int = 0, reorder_point: int = 0
) -> SetStockPolicy:
    return SetStockPolicy(ORG, V, warehouse_id, min_stock, max_stock, reorder_point)


def test_low_level_fires_once_on_the_crossing_and_again_after_recovery() -> None:
    shard = ShardFake(stock("w1", 10, min_stock=5))
    assert thresholds(shard.send(reserve("r1", (V, "", 4)))) == []  # available 6
    crossing = shard.send(reserve("r2", (V, "", 1)))  # available 5
    assert [e for e in events(crossing) if isinstance(e, ThresholdCrossed)] == [
        ThresholdCrossed("low_level", 5)
    ]
    assert thresholds(shard.send(reserve("r3", (V, "", 2)))) == []  # available 3, still low
    assert thresholds(shard.send(ReleaseReservation(ORG, "r3", (V,)))) == []  # 5: still low
    assert thresholds(shard.send(ReleaseReservation(ORG, "r2", (V,)))) == []  # 6: recovered
    assert thresholds(shard.send(reserve("r4", (V, "", 1)))) == ["low_level"]  # 5 again


def test_reorder_needed_fires_once_on_the_crossing_and_again_after_recovery() -> None:
    shard = ShardFake(stock("w1", 10, reorder_point=3))
    assert thresholds(shard.send(movement("w1", "issue", 7))) == ["reorder_needed"]
    assert thresholds(shard.send(movement("w1", "issue", 1))) == []
    assert thresholds(shard.send(movement("w1", "receipt", 5))) == []
    assert thresholds(shard.send(movement("w1", "adjustment", -4))) == ["reorder_needed"]


def test_depleted_fires_when_available_reaches_zero_and_again_after_recovery() -> None:
    shard = ShardFake(stock("w1", 3))
    assert thresholds(shard.send(reserve("r1", (V, "", 3)))) == ["depleted"]
    assert thresholds(shard.send(movement("w1", "receipt", 1))) == []
    assert thresholds(shard.send(reserve("r2", (V, "", 1)))) == ["depleted"]
    assert thresholds(shard.send(ShipReservation(ORG, "r2", (V,)))) == []  # still 0, no new crossing


def test_one_decision_may_cross_several_thresholds() -> None:
    shard = ShardFake(stock("w1", 10, min_stock=4, reorder_point=6))
    assert sorted(thresholds(shard.send(movement("w1", "issue", 10)))) == [
        "depleted",
        "low_level",
        "reorder_needed",
    ]


def test_thresholds_fire_per_stock_of_a_transfer() -> None:
    shard = ShardFake(stock("w1", 4), stock("w2", 0))
    decision = shard.send(ShipTransfer(ORG, V, "w1", "w2", 4, "t1"))
    assert [(key[2], e.kind) for key, e in decision.events if isinstance(e, ThresholdCrossed)] == [
        ("w1", "depleted")
    ]


def test_raising_min_stock_above_available_fires_low_level() -> None:
    shard = ShardFake(stock("w1", 5))
    decision = shard.send(policy("w1", min_stock=8, max_stock=20, reorder_point=2))
    assert events(decision) == [PolicyChanged(8, 20, 2), ThresholdCrossed("low_level", 5)]
    assert isinstance(decision.reply, DoneResult)
    assert decision.reply.levels == (level(shard.stock("w1")),)
    assert (shard.stock("w1").min_stock, shard.stock("w1").max_stock, shard.stock("w1").reorder_point) == (
        8,
        20,
        2,
    )
    assert thresholds(shard.send(policy("w1", min_stock=9))) == []


def test_threshold_events_do_not_change_the_version() -> None:
    shard = ShardFake(stock("w1", 5, version=7))
    decision = shard.send(policy("w1", min_stock=8))
    assert len(decision.events) == 2
    assert shard.stock("w1").version == 8


def test_a_stock_without_policy_only_reports_depletion() -> None:
    shard = ShardFake(stock("w1", 5))
    assert thresholds(shard.send(movement("w1", "issue", 4))) == []
    assert thresholds(shard.send(movement("w1", "issue", 1))) == ["depleted"]


def test_depleted_fires_when_a_new_reservation_drains_stock_after_the_expiry_timer_ran() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 5), expires_at=T0 + 10))
    shard.send(ExpireReservation(ORG, "r1", V), T0 + 11)
    assert thresholds(shard.send(reserve("r2", (V, "", 5)), T0 + 12)) == ["depleted"]


def test_depleted_fires_when_a_new_reservation_drains_stock_freed_by_an_expiry_in_the_same_decision() -> None:
    shard = ShardFake(stock("w1", 5))
    shard.send(reserve("r1", (V, "", 5), expires_at=T0 + 10))
    decision = shard.send(reserve("r2", (V, "", 5)), T0 + 12)
    assert [type(e) for e in events(decision)][:2] == [ReservationExpired, StockReserved]
    assert thresholds(decision) == ["depleted"]


@pytest.mark.parametrize(
    "min_stock, max_stock, reorder_point", [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (5, 4, 0), (0, 4, 5)]
)
def test_an_inconsistent_policy_is_invalid(min_stock: int, max_stock: int, reorder_point: int) -> None:
    shard = ShardFake(stock("w1", 5))
    decision = shard.send(policy("w1", min_stock, max_stock, reorder_point))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []


def test_a_policy_for_a_missing_stock_is_not_found() -> None:
    reply = ShardFake().send(policy("w1", 1, 2, 1)).reply
    assert isinstance(reply, Rejected) and reply.code == "not_found"


# ---------------------------------------------------------------- reading and the rest


def test_reading_a_variant_lists_every_warehouse_in_order() -> None:
    shard = ShardFake(stock("w2", 2), stock("w1", 1), stock("w1", 9, V2))
    reply = shard.send(ReadStock(ORG, V)).reply
    assert isinstance(reply, StockLevelsResult)
    assert [(lv.warehouse_id, lv.on_hand) for lv in reply.levels] == [("w1", 1), ("w2", 2)]


def test_reading_an_unknown_variant_lists_nothing() -> None:
    decision = ShardFake(stock("w1", 1)).send(ReadStock(ORG, "nope"))
    assert decision.reply == StockLevelsResult(()) and decision.events == []


def test_set_warehouse_active_is_left_to_the_shard() -> None:
    decision = ShardFake(stock("w1", 1)).send(SetWarehouseActive(ORG, "w1", False))
    assert isinstance(decision.reply, Rejected) and decision.reply.code == "invalid"
    assert decision.events == []


def test_deciding_never_mutates_the_states_it_is_given() -> None:
    shard = ShardFake(stock("w1", 10), stock("w2", 3))
    shard.send(reserve("r1", (V, "w1", 2), expires_at=T0 + 5))
    frozen = {k: msgspec.structs.asdict(s) | {"lines": list(open_lines(s))} for k, s in shard.states.items()}
    for command in (
        reserve("r2", (V, "", 4)),
        ReleaseReservation(ORG, "r1", (V,)),
        ShipReservation(ORG, "r1", (V,)),
        movement("w1", "issue", 1),
        ShipTransfer(ORG, V, "w1", "w3", 1, "t", create_if_missing=True),
        policy("w2", 5),
        ReadStock(ORG, V),
    ):
        decide(shard.states, command, T0 + 10)
        assert {
            k: msgspec.structs.asdict(s) | {"lines": list(open_lines(s))} for k, s in shard.states.items()
        } == frozen


def test_evolve_returns_a_new_state_and_leaves_the_old_one_alone() -> None:
    old = stock("w1", 5)
    new = evolve(old, StockReserved("r1", "o", 2, T0, "h"))
    assert (old.reserved, old.version, line_ids(old)) == (0, 0, [])
    assert (new.reserved, new.version, line_ids(new)) == (2, 1, ["r1"])
    assert new.next_expiry == T0


def test_replay_rebuilds_a_state_from_its_events_without_touching_the_initial_state() -> None:
    shard = ShardFake(stock("w1", 10))
    initial = stock("w1", 10)
    shard.send(reserve("r1", (V, "", 3)))
    shard.send(reserve("r2", (V, "", 2), expires_at=T0 + 1))
    shard.send(movement("w1", "issue", 1), T0 + 2)
    shard.send(ShipReservation(ORG, "r1", (V,)), T0 + 3)
    rebuilt = replay(initial, [e for _, e in shard.log])
    assert msgspec.structs.asdict(rebuilt) == msgspec.structs.asdict(shard.stock("w1"))
    assert initial.version == 0 and line_ids(initial) == []


# ---------------------------------------------------------------- known bugs


def test_two_lines_of_one_variant_in_one_warehouse_keep_reserved_equal_to_the_open_lines() -> None:
    shard = ShardFake(stock("w1", 10))
    decision = shard.send(reserve("r1", (V, "", 3), (V, "", 3)))
    state = shard.stock("w1")
    assert state.reserved == sum(line.quantity for line in open_lines(state))
    if isinstance(decision.reply, ReservationResult):
        shard.send(ReleaseReservation(ORG, "r1", (V,)))
        assert shard.stock("w1").reserved == 0


def test_receiving_a_transfer_beyond_the_int32_range_is_invalid() -> None:
    shard = ShardFake(stock("w1", MAX_QUANTITY - 1, in_transit=5))
    reply = shard.send(ReceiveTransfer(ORG, V, "w1", 5, "t1")).reply
    assert isinstance(reply, Rejected) and reply.code == "invalid"
    assert shard.stock("w1").on_hand <= MAX_QUANTITY


def test_shipping_a_transfer_beyond_the_destination_int32_range_is_invalid() -> None:
    shard = ShardFake(stock("w1", 5), stock("w2", 0, in_transit=MAX_QUANTITY - 1))
    reply = shard.send(ShipTransfer(ORG, V, "w1", "w2", 5, "t1")).reply
    assert isinstance(reply, Rejected) and reply.code == "invalid"
    assert shard.stock("w2").in_transit <= MAX_QUANTITY


# ---------------------------------------------------------------- what a retried order is decided against


def _pl(variant: str, status: str, items_hash: str = "h") -> PriorLine:
    return PriorLine(variant, "w1", 1, status, items_hash, 100.0)


@pytest.mark.parametrize(("lines", "expected"), [
    ([], None),  # never made
    ([_pl("b", "active")], None),  # another shard's part, open: this part is new
    ([_pl("a", "released"), _pl("b", "active")], "released"),  # this part closed, the other open
    ([_pl("a", "expired")], "expired"),
    ([_pl("a", "shipped"), _pl("b", "shipped")], "shipped"),
    ([_pl("b", "expired")], "expired"),  # closed everywhere, though none of it here
    ([_pl("b", "active", "other")], "conflict"),  # the order holds other items
    ([_pl("a", "released", "other")], "conflict"),
])
def test_a_reserve_not_open_in_memory_is_decided_against_what_postgres_remembers(
        lines: list[PriorLine], expected: str | None) -> None:
    prior = prior_of(lines, "h", {"a"})
    assert (prior.status if prior else None) == expected
    if prior is not None and expected != "conflict":
        here = [ln for ln in lines if ln.variant_id == "a"] or lines
        assert [ln.variant_id for ln in prior.lines] == [ln.variant_id for ln in here]
    if expected == "conflict":
        assert prior is not None and prior.items_hash == "other"


def test_an_abort_leaves_confirmed_lines() -> None:
    shard = ShardFake(stock("w1", on_hand=10))
    for rid in ("r1", "r2"):
        assert isinstance(shard.send(reserve(rid, (V, "w1", 2))).reply, ReservationResult)
    shard.send(ConfirmReservation(ORG, "r1", (V,)))
    d = shard.send(AbortReservation(ORG, "r1", (V,)))
    assert d.events == [] and d.reply == DoneResult(changed=False)
    d = shard.send(AbortReservation(ORG, "r2", (V,)))
    assert [type(e).__name__ for _, e in d.events] == ["ReservationAborted"] and d.reply == DoneResult(changed=True)
    assert shard.stock("w1").reserved == 2


def test_an_archived_variant_gets_no_new_stock_in_another_warehouse() -> None:
    """Archiving (the variant deleted in the Catalog) closes every warehouse, also those where it
    had no stock yet: a receipt or a purchase order there must not open a fresh, active stock."""
    shard = ShardFake(stock("w1", on_hand=0, status="archived"))
    for kind in ("receipt", "purchase_ordered", "purchase_received"):
        d = shard.send(RecordMovement(ORG, V, "w2", kind, 5, create_if_missing=True))
        assert isinstance(d.reply, Rejected) and d.reply.code == "archived", (kind, d.reply)
        assert d.events == []
    assert (ORG, V, "w2") not in shard.states
    # a variant never archived still gets its first stock anywhere
    d = shard.send(RecordMovement(ORG, V2, "w2", "receipt", 5, create_if_missing=True))
    assert not isinstance(d.reply, Rejected)


def test_a_purchase_receipt_takes_out_of_in_transit_at_most_its_limit_and_pending_ends_with_the_last_arrival() -> None:
    shard = ShardFake(stock("w1", on_hand=30), stock("w2", on_hand=0))
    shard.send(ShipTransfer(ORG, V, "w1", "w2", 10, "t1"))  # w2: 10 in transit from a transfer
    shard.send(RecordMovement(ORG, V, "w2", "purchase_ordered", 20))
    assert (shard.stock("w2").in_transit, shard.stock("w2").status) == (30, "pending_purchase")
    d = shard.send(RecordMovement(ORG, V, "w2", "purchase_received", 25, in_transit_limit=20))
    (moved,) = [e for _, e in d.events if isinstance(e, StockMoved)]
    assert (moved.on_hand_delta, moved.in_transit_delta) == (25, -20)
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit) == (25, 10)
    assert shard.stock("w2").status == "pending_purchase"  # the transfer is still on its way
    shard.send(RecordMovement(ORG, V, "w2", "purchase_received", 4, in_transit_limit=0))  # an order never seen
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit) == (29, 10)
    shard.send(ReceiveTransfer(ORG, V, "w2", 10, "t1"))
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit, shard.stock("w2").status) == (39, 0, "active")
    # without a limit (-1, the default) a receipt takes what it can, as before
    shard.send(RecordMovement(ORG, V, "w2", "purchase_ordered", 5))
    shard.send(RecordMovement(ORG, V, "w2", "purchase_received", 8))
    assert (shard.stock("w2").on_hand, shard.stock("w2").in_transit, shard.stock("w2").status) == (47, 0, "active")
