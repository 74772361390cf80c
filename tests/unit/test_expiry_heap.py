"""A stock with many open lines finds its overdue ones through a heap: same answers as a scan.

The scan (every line, every time) is the specification; the heap (kept from `HEAP_FROM`
lines on, with entries of closed or confirmed lines dropped lazily) must agree with it
after any sequence of reservations, confirmations, releases and expiries.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.messages import ReservationConfirmed, ReservationExpired, ReservationReleased, StockReserved
from actors.stock import (
    HEAP_FROM,
    Line,
    StockState,
    apply,
    get_line,
    open_lines,
    overdue_lines,
    recompute_next_expiry,
)

T0 = 1_800_000_000.0


def scanned(state: StockState, now: float) -> list[str]:
    lines = [ln for ln in open_lines(state) if not ln.confirmed and ln.expires_at <= now]
    return [ln.reservation_id for ln in sorted(lines, key=lambda x: (x.expires_at, x.reservation_id))]


def earliest(state: StockState) -> float:
    return min((ln.expires_at for ln in open_lines(state) if not ln.confirmed), default=math.inf)


# an operation: (kind, reservation number, seconds after T0)
ops = st.lists(st.tuples(st.sampled_from(["reserve"] * 4 + ["confirm", "release", "expire", "tick"]),
                         st.integers(0, 150), st.integers(0, 120)), min_size=HEAP_FROM, max_size=400)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_overdue_lines_and_the_next_expiry_agree_with_a_scan(operations: list[tuple[str, int, int]]) -> None:
    state = StockState("o", "v", "w")
    for kind, n, dt in operations:
        rid = f"r{n}"
        line = get_line(state, rid)
        if kind == "reserve" and line is None:
            apply(state, StockReserved(rid, "order", 1, T0 + dt, "h"))
        elif kind == "confirm" and line is not None and not line.confirmed:
            apply(state, ReservationConfirmed(rid, 1))
        elif kind == "release" and line is not None:
            apply(state, ReservationReleased(rid, 1))
        elif kind == "expire":
            for ln in overdue_lines(state, T0 + dt):
                apply(state, ReservationExpired(ln.reservation_id, ln.order_id, ln.quantity, ln.expires_at))
        elif kind == "tick":
            recompute_next_expiry(state)  # what the shard does after each committed batch
            assert state.next_expiry == earliest(state)
        # the bound is always safe, with or without a recompute
        assert state.next_expiry <= earliest(state)
        probe = T0 + dt
        assert [ln.reservation_id for ln in overdue_lines(state, probe)] == scanned(state, probe)
    end = T0 + 1_000  # every TTL is over: expiring what is overdue leaves only confirmed lines
    for ln in overdue_lines(state, end):
        apply(state, ReservationExpired(ln.reservation_id, ln.order_id, ln.quantity, ln.expires_at))
    assert all(ln.confirmed for ln in open_lines(state))
    recompute_next_expiry(state)
    assert state.next_expiry == math.inf
    if len(state.lines) >= HEAP_FROM:
        assert state.expiry_heap is not None and isinstance(state.lines, dict)


def test_a_stock_activated_with_many_lines_builds_its_heap() -> None:
    state = StockState("o", "v", "w")
    # as ShardStore.load_variants does: lines put in directly (a dict from HEAP_FROM on), then
    # the bound recomputed
    state.lines = {f"r{i}": Line.of(f"r{i}", "order", 1, T0 + i, "h") for i in range(HEAP_FROM * 2)}
    recompute_next_expiry(state)
    assert state.expiry_heap is not None and state.next_expiry == T0
    assert [ln.reservation_id for ln in overdue_lines(state, T0 + 2)] == ["r0", "r1", "r2"]

