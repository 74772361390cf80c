"""Property tests (hypothesis) of the pure stock core (`actors/stock.py`).

A scenario is one variant stocked in 1-3 warehouses and a random sequence of commands
sent at increasing `now`. `simulate` plays it the way a shard does: `decide` against the
working states, then `apply` every event of the decision in place (creating a blank
`StockState` for a key first seen in a `StockCreated`). Each test states one property
of the resulting trace. Stocks start with random levels and policies; now and then one is
missing, archived or in an inactive warehouse. A close command generated with an empty
reservation_id targets the latest successful reservation, so releases, confirmations and
shipments often find something open.

The number of scenarios per property is `STOCK_PROPERTY_EXAMPLES` (default 40, which
keeps the file within a few seconds); set it to a few thousand for a deeper hunt.

The generated commands stay clear of int32 overflow through transfers and of
non-positive ReceiveTransfer quantities (both rejected; examples in test_stock_core.py).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.messages import (
    MOVEMENT_KINDS,
    AbortReservation,
    Command,
    ConfirmReservation,
    DoneResult,
    Event,
    ExpireReservation,
    ReadStock,
    ReceiveTransfer,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    ReservationExpired,
    ReservationResult,
    ReserveLine,
    ReserveStock,
    SetStockPolicy,
    ShipReservation,
    ShipTransfer,
    StockKey,
    StockLevelsResult,
    ThresholdCrossed,
    decode_batch,
    decode_replies,
    encode_batch,
    encode_replies,
)
from actors.stock import (
    Decision,
    StockState,
    apply,
    choose_warehouse,
    decide,
    evolve,
    level,
    open_lines,
    replay,
)

ORG = "org"
V = "var"
WAREHOUSES = ("w0", "w1", "w2")
RESERVATION_IDS = ("r0", "r1", "r2")
T0 = 1_000.0
LATEST = ""
"""As the reservation_id of a generated command: the latest reservation that succeeded."""

EXAMPLES = int(os.environ.get("STOCK_PROPERTY_EXAMPLES", "40"))
"""Scenarios per property (about 15 ms each on an idle core). Raise it for a deeper run, e.g. 2000."""


def _settings(share: float = 1.0) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES * share)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SETTINGS = _settings()
EXTRA = _settings(2 / 3)


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Step:
    """One command after `dt` seconds. A ReserveStock's expires_at holds its TTL here;
    `retry_after` re-sends a successful ReserveStock unchanged that many seconds later."""

    dt: float
    command: Command
    retry_after: float | None = None


@dataclass(frozen=True)
class Scenario:
    initial: dict[StockKey, StockState]
    steps: list[Step]


def _reserve_step(
    dt: float,
    rid: str,
    lines: tuple[ReserveLine, ...],
    other_items: bool,
    ttl: float,
    retry_after: float | None,
) -> Step:
    items_hash = repr([msgspec.structs.astuple(line) for line in lines]) + ("#other" if other_items else "")
    return Step(dt, ReserveStock(ORG, rid, f"order-{rid}", items_hash, ttl, lines), retry_after)


def _pinned_lines(warehouse_ids: list[str], quantities: list[int]) -> tuple[ReserveLine, ...]:
    return tuple(ReserveLine(V, w, q) for w, q in zip(warehouse_ids, quantities, strict=False))


@functools.cache
def _reserve_steps(warehouses: tuple[str, ...], dt: st.SearchStrategy[float]) -> st.SearchStrategy[Step]:
    """One line (pinned or not), or lines pinned to distinct warehouses; now and then other
    items under a known id (a conflict); often a retry of the same command later."""
    quantity = st.integers(1, 8)
    one_line = st.builds(lambda w, q: (ReserveLine(V, w, q),), st.sampled_from(("", *warehouses)), quantity)
    pinned = st.builds(
        _pinned_lines,
        st.lists(st.sampled_from(warehouses), min_size=1, unique=True),
        st.lists(quantity, min_size=len(warehouses), max_size=len(warehouses)),
    )
    return st.builds(
        _reserve_step,
        dt,
        st.sampled_from(RESERVATION_IDS),
        one_line | pinned,
        st.sampled_from((False, False, False, True)),
        st.sampled_from((1.0, 5.0, 30.0, 120.0, 600.0)),
        st.sampled_from((None, None, 0.0, 1.0, 5.0, 60.0)),
    )


@functools.cache
def _ship_transfers(warehouses: tuple[str, ...]) -> st.SearchStrategy[ShipTransfer]:
    """Mostly between two warehouses; now and then to itself (invalid) or non-positive."""
    pairs = [(a, b) for a in warehouses for b in warehouses if a != b] or [(warehouses[0], warehouses[0])]
    pairs.append((warehouses[-1], warehouses[-1]))
    quantity = st.sampled_from((-1, 0) + (1, 2, 3, 5, 8, 13, 20) * 2)
    return st.builds(
        lambda pair, q, create: ShipTransfer(ORG, V, pair[0], pair[1], q, "t", create_if_missing=create),
        st.sampled_from(pairs),
        quantity,
        st.booleans(),
    )


@functools.cache
def _steps(warehouses: tuple[str, ...]) -> st.SearchStrategy[Step]:
    """Built once per warehouse count: building strategies per draw is what makes hypothesis slow."""
    dt = st.sampled_from((0.0, 0.5, 1.0, 3.0, 10.0, 25.0))
    wid = st.sampled_from(warehouses)
    rid = st.sampled_from((LATEST, LATEST, LATEST, *RESERVATION_IDS))
    variants = st.just((V,))

    def step(command: st.SearchStrategy[Command]) -> st.SearchStrategy[Step]:
        return st.builds(Step, dt, command)

    return st.one_of(
        _reserve_steps(warehouses, dt),
        _reserve_steps(warehouses, dt),
        _reserve_steps(warehouses, dt),
        step(st.builds(ReleaseReservation, st.just(ORG), rid, variants)),
        step(st.builds(ConfirmReservation, st.just(ORG), rid, variants)),
        step(st.builds(AbortReservation, st.just(ORG), rid, variants)),
        step(st.builds(ShipReservation, st.just(ORG), rid, variants)),
        step(st.builds(ExpireReservation, st.just(ORG), rid, st.just(V))),
        step(
            st.builds(
                RecordMovement,
                organization_id=st.just(ORG),
                variant_id=st.just(V),
                warehouse_id=wid,
                kind=st.sampled_from((*MOVEMENT_KINDS, "bogus")),
                quantity=st.integers(-15, 25),
                create_if_missing=st.booleans(),
            )
        ),
        step(
            st.builds(
                SetStockPolicy,
                st.just(ORG),
                st.just(V),
                wid,
                st.integers(0, 10),
                st.sampled_from((0, 0, 5, 10, 20)),
                st.integers(0, 10),
            )
        ),
        step(_ship_transfers(warehouses)),
        step(st.builds(ReceiveTransfer, st.just(ORG), st.just(V), wid, st.integers(1, 20), st.just("t"))),
        step(st.builds(ReadStock, st.just(ORG), st.just(V), st.sampled_from(("", *warehouses)))),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    warehouses = WAREHOUSES[: draw(st.integers(1, 3))]
    present = list(warehouses)
    if len(present) > 1 and draw(st.integers(0, 3)) == 3:  # now and then one stock is still missing
        present.remove(draw(st.sampled_from(present)))
    initial: dict[StockKey, StockState] = {}
    for wid in sorted(present):
        min_stock = draw(st.integers(0, 8))
        reorder_point = draw(st.integers(0, 8))
        state = StockState(
            ORG,
            V,
            wid,
            on_hand=draw(st.sampled_from((0, 3, 10, 20, 30, 40))),
            in_transit=draw(st.integers(0, 5)),
            min_stock=min_stock,
            max_stock=draw(st.sampled_from((0, 20))),
            reorder_point=reorder_point,
            status="archived" if draw(st.integers(0, 15)) == 15 else "active",
            warehouse_active=draw(st.integers(0, 5)) != 5,
            version=draw(st.integers(0, 5)),
        )
        initial[state.key] = state
    steps = draw(st.lists(_steps(warehouses), min_size=10, max_size=40))
    return Scenario(initial, steps)


# ---------------------------------------------------------------- simulating a shard


@dataclass
class Record:
    """One decision as a shard saw it: the states before, the decision, the states after."""

    command: Command
    now: float
    before: dict[StockKey, StockState]
    decision: Decision
    after: dict[StockKey, StockState]
    mutated_input: bool
    retry_of: Record | None = None


@dataclass
class Trace:
    initial: dict[StockKey, StockState]
    records: list[Record] = field(default_factory=list)
    final: dict[StockKey, StockState] = field(default_factory=dict)

    def events_of(self, key: StockKey) -> list[Event]:
        return [event for r in self.records for k, event in r.decision.events if k == key]


def _copy_all(states: dict[StockKey, StockState]) -> dict[StockKey, StockState]:
    return {key: state.copy() for key, state in states.items()}


def _send(states: dict[StockKey, StockState], command: Command, now: float) -> Record:
    before = _copy_all(states)
    decision = decide(states, command, now)
    mutated = states != before
    for key, event in decision.events:
        state = states.get(key)
        if state is None:
            state = states[key] = StockState(*key)
        apply(state, event)
    return Record(command, now, before, decision, _copy_all(states), mutated)


def simulate(scenario: Scenario) -> Trace:
    trace = Trace(_copy_all(scenario.initial))
    states = _copy_all(scenario.initial)
    now = T0
    latest = RESERVATION_IDS[0]
    for step in scenario.steps:
        now += step.dt
        command = step.command
        if isinstance(command, ReserveStock):
            command = msgspec.structs.replace(command, expires_at=now + command.expires_at)
        elif getattr(command, "reservation_id", None) == LATEST:
            command = msgspec.structs.replace(command, reservation_id=latest)
        record = _send(states, command, now)
        trace.records.append(record)
        reply = record.decision.reply
        if isinstance(reply, ReservationResult):
            latest = reply.reservation_id
        if step.retry_after is not None and isinstance(reply, ReservationResult) and not reply.replayed:
            now += step.retry_after
            retry = _send(states, command, now)
            retry.retry_of = record
            trace.records.append(retry)
    trace.final = states
    return trace


def _open_quantity(state: StockState) -> int:
    return sum(line.quantity for line in open_lines(state))


def _conditions(state: StockState | None, available: int | None = None) -> dict[str, bool]:
    """Which thresholds hold; `state is None` is a stock not created yet (zero, no policy)."""
    if state is None:
        return {"depleted": True, "low_level": False, "reorder_needed": False}
    avail = state.available if available is None else available
    return {
        "depleted": avail <= 0,
        "low_level": state.min_stock > 0 and avail <= state.min_stock,
        "reorder_needed": state.reorder_point > 0 and avail <= state.reorder_point,
    }


# ---------------------------------------------------------------- properties


@SETTINGS
@given(scenarios())
def test_available_never_goes_negative_and_on_hand_never_below_zero(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        for key, state in record.after.items():
            assert 0 <= state.reserved <= state.on_hand, (key, state, record.command)
            assert state.in_transit >= 0, (key, state, record.command)


@SETTINGS
@given(scenarios())
def test_reserved_always_equals_the_sum_of_the_open_lines(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        for key, state in record.after.items():
            assert state.reserved == _open_quantity(state), (key, state, record.command)


@SETTINGS
@given(scenarios())
def test_replaying_every_event_from_the_initial_states_rebuilds_the_final_states(scenario: Scenario) -> None:
    trace = simulate(scenario)
    for key, final in trace.final.items():
        start = trace.initial.get(key) or StockState(*key)
        rebuilt = replay(start, trace.events_of(key))
        assert msgspec.structs.asdict(rebuilt) == msgspec.structs.asdict(final)
        evolved = start
        for event in trace.events_of(key):
            evolved = evolve(evolved, event)
        assert msgspec.structs.asdict(evolved) == msgspec.structs.asdict(final)
    assert trace.initial == scenario.initial


@SETTINGS
@given(scenarios())
def test_a_retried_reserve_stock_with_the_same_id_changes_nothing(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        original = record.retry_of
        if original is None:
            continue
        command, first = record.command, original.decision.reply
        assert isinstance(command, ReserveStock) and isinstance(first, ReservationResult)
        expiries = [e for _, e in record.decision.events if isinstance(e, ReservationExpired)]
        assert len(expiries) == len(record.decision.events)
        reply = record.decision.reply
        if record.now < command.expires_at:
            assert isinstance(reply, ReservationResult) and reply.replayed
            assert reply.expires_at == first.expires_at
            assert Counter(reply.lines) == Counter(first.lines)
            assert all(e.reservation_id != command.reservation_id for e in expiries)
        else:
            assert isinstance(reply, Rejected) and reply.code == "closed"


@SETTINGS
@given(scenarios())
def test_version_grows_by_exactly_one_per_state_changing_event(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        changes = Counter(k for k, e in record.decision.events if not isinstance(e, ThresholdCrossed))
        for key, state in record.after.items():
            previous = record.before[key].version if key in record.before else 0
            assert state.version == previous + changes[key], (key, record.command)


@EXTRA
@given(scenarios())
def test_deciding_never_mutates_the_states_it_is_given(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        assert not record.mutated_input, record.command


@EXTRA
@given(scenarios())
def test_a_rejection_emits_nothing_but_the_expiries_it_found(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        if isinstance(record.decision.reply, Rejected):
            assert all(isinstance(e, ReservationExpired) for _, e in record.decision.events), record.command
            assert set(record.after) == set(record.before)


@EXTRA
@given(scenarios())
def test_the_levels_in_a_reply_are_the_states_after_its_events(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        reply = record.decision.reply
        if isinstance(reply, (DoneResult, StockLevelsResult)):
            for lv in reply.levels:
                key = (lv.organization_id, lv.variant_id, lv.warehouse_id)
                assert lv == level(record.after[key]), record.command


@EXTRA
@given(scenarios())
def test_no_overdue_line_survives_a_command_that_touches_the_whole_variant(scenario: Scenario) -> None:
    whole_variant = (
        ReserveStock,
        ReleaseReservation,
        ConfirmReservation,
        AbortReservation,
        ShipReservation,
        ExpireReservation,
    )
    for record in simulate(scenario).records:
        command = record.command
        if isinstance(command, whole_variant) or (
            isinstance(command, ReadStock) and not command.warehouse_id
        ):
            for state in record.after.values():
                overdue = [
                    ln for ln in open_lines(state) if not ln.confirmed and ln.expires_at <= record.now
                ]
                assert overdue == [], (command, state)


@EXTRA
@given(scenarios())
def test_reading_stock_never_counts_an_overdue_line(scenario: Scenario) -> None:
    for record in simulate(scenario).records:
        if not isinstance(record.command, ReadStock):
            continue
        reply = record.decision.reply
        assert isinstance(reply, StockLevelsResult)
        for lv in reply.levels:
            before = record.before[(lv.organization_id, lv.variant_id, lv.warehouse_id)]
            live = sum(
                ln.quantity for ln in open_lines(before) if ln.confirmed or ln.expires_at > record.now
            )
            assert lv.reserved == live and lv.available == lv.on_hand - live


@SETTINGS
@given(scenarios())
def test_thresholds_fire_only_on_a_crossing(scenario: Scenario) -> None:
    """Exactly the crossings when nothing expired; with expiries, never a spurious one
    (a crossing right after an expiry is measured from the state the expiry left)."""
    for record in simulate(scenario).records:
        emitted: dict[StockKey, list[str]] = {}
        expired: Counter[StockKey] = Counter()
        for key, event in record.decision.events:
            if isinstance(event, ThresholdCrossed):
                emitted.setdefault(key, []).append(event.kind)
                assert event.available == record.after[key].available
            elif isinstance(event, ReservationExpired):
                expired[key] += event.quantity
        for key, after in record.after.items():
            kinds = emitted.get(key, [])
            assert len(kinds) == len(set(kinds)), (key, kinds)
            before = record.before.get(key)
            logical_before = (
                _conditions(before, before.available + expired[key])
                if before is not None
                else _conditions(None)
            )
            now_true = _conditions(after)
            crossings = {kind for kind, holds in now_true.items() if holds and not logical_before[kind]}
            if expired[key]:
                assert set(kinds) <= crossings, (key, kinds, record.command)
            else:
                assert set(kinds) == crossings, (key, kinds, record.command)


@_settings(1 / 3)
@given(scenarios())
def test_every_command_and_reply_survives_a_msgpack_batch(scenario: Scenario) -> None:
    trace = simulate(scenario)
    commands = [r.command for r in trace.records]
    replies = [r.decision.reply for r in trace.records]
    assert decode_batch(encode_batch(commands)) == commands
    assert decode_replies(encode_replies(replies)) == replies


# ---------------------------------------------------------------- choosing a warehouse

candidates_strategy = st.lists(
    st.tuples(st.sampled_from(("a", "b", "c", "d", "e")), st.integers(-5, 30)),
    max_size=5,
    unique_by=lambda c: c[0],
)


@settings(max_examples=max(300, EXAMPLES), deadline=None)
@given(candidates_strategy, st.integers(1, 30), st.sampled_from(("", "a", "b", "z")))
def test_choose_warehouse_covers_the_quantity_whenever_one_warehouse_can(
    candidates: list[tuple[str, int]], quantity: int, preferred: str
) -> None:
    choice = choose_warehouse(candidates, quantity, preferred)
    available = dict(candidates)
    assert choice.sufficient == any(avail >= quantity for avail in available.values())
    if not candidates:
        assert (choice.warehouse_id, choice.available) == ("", 0)
        return
    assert choice.warehouse_id in available
    assert choice.available == max(available[choice.warehouse_id], 0)
    if available.get(preferred, -1) >= quantity:
        assert choice.warehouse_id == preferred
    else:
        most = max(available.values())
        assert available[choice.warehouse_id] == most
        assert choice.warehouse_id == min(w for w, a in available.items() if a == most)
