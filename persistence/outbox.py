"""Outgoing events as outbox rows, written in the same transaction as the change.

Every event is an envelope `{"event", "event_id", "occurred_at", "organization_id",
"data"}`; stock events also carry `sequence`, the stock's version after the change, so
consumers can drop duplicates and reorderings. Payload names follow
shared/spec/integrations.md. A relay (gateway) publishes unsent rows in id order with
publisher confirms and marks them sent: at-least-once, deduplicated by `event_id`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from actors.keys import stock_id
from actors.messages import (
    Event,
    ReservationExpired,
    ReservationReleased,
    ReservationShipped,
    StockKey,
    StockMoved,
    ThresholdCrossed,
    VariantArchived,
    VariantArchiveRefused,
    VariantInitialized,
)
from actors.stock import StockState

OutboxRow = tuple[str, str, str, str]
"""(event_id, event_name, organization_id, payload JSON)"""

_json = msgspec.json.Encoder()

MOVEMENT_EVENT = {
    "receipt": "inventory.movement.in",
    "return": "inventory.movement.in",
    "transfer_receive": "inventory.movement.in",
    "purchase_received": "inventory.movement.in",
    "issue": "inventory.movement.out",
    "adjustment": "inventory.movement.adjustment",
    "transfer_out": "inventory.movement.transfer_out",
    "transfer_in_transit": "inventory.movement.transfer_in",
}


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")


def envelope(name: str, organization_id: str, data: dict[str, Any], now: float,
             sequence: int | None = None) -> OutboxRow:
    event_id = str(uuid.uuid4())
    body: dict[str, Any] = {"event": name, "event_id": event_id, "occurred_at": iso(now),
                            "organization_id": organization_id}
    if sequence is not None:
        body["sequence"] = sequence
    body["data"] = data
    return (event_id, name, organization_id, _json.encode(body).decode())


def stock_updated(key: StockKey, s: StockState, now: float) -> OutboxRow:
    return envelope("inventory.stock.updated", key[0], {
        "stock_id": stock_id(key), "variant_id": key[1], "warehouse_id": key[2],
        "on_hand": s.on_hand, "reserved": s.reserved, "available": s.available,
        "in_transit": s.in_transit, "version": s.version, "status": s.status,
    }, now, sequence=s.version)


def threshold(key: StockKey, ev: ThresholdCrossed, s: StockState, now: float) -> OutboxRow:
    org, variant, warehouse = key
    if ev.kind == "reorder_needed":
        data: dict[str, Any] = {
            "stock_id": stock_id(key), "variant_id": variant, "warehouse_id": warehouse,
            "current_stock": ev.available, "reorder_point": s.reorder_point, "max_stock": s.max_stock,
            "suggested_order_quantity": max(s.max_stock - ev.available, 0),
            "last_supplier_id": None, "average_lead_time_days": None,
        }
    elif ev.kind == "low_level":
        data = {
            "stock_id": stock_id(key), "variant_id": variant, "warehouse_id": warehouse,
            "product_name": "", "sku": "", "available_quantity": ev.available,
            "min_stock": s.min_stock, "reorder_point": s.reorder_point,
            "shortage": max(s.min_stock - ev.available, 0),
            "alert_level": "critical" if ev.available <= 0 else "warning", "warehouse_name": "",
        }
    else:
        data = {"stock_id": stock_id(key), "variant_id": variant, "warehouse_id": warehouse,
                "available_quantity": ev.available, "on_hand": s.on_hand, "reserved": s.reserved}
    row = envelope(f"inventory.stock.{ev.kind}", org, data, now, sequence=s.version)
    if ev.kind == "low_level":
        body = msgspec.json.decode(row[3])
        body["notification_config"] = {"channels": ["email", "in_app"], "priority": "high",
                                       "recipients": ["inventory_manager", "purchasing_manager"]}
        row = (row[0], row[1], row[2], _json.encode(body).decode())
    return row


def notification(key: StockKey, ev: Event, now: float) -> OutboxRow:
    """The catalog lifecycle answers: initialized, validation_failed, archived (spec payloads)."""
    org, variant = key[0], key[1]
    if isinstance(ev, VariantInitialized):
        return envelope("inventory.stock.initialized", org, {
            "variant_id": variant,
            "warehouses": [{"warehouse_id": wh, "stock_id": stock_id((org, variant, wh)), "initial_quantity": 0}
                           for wh in ev.warehouse_ids],
            "status": "success"}, now)
    if isinstance(ev, VariantArchiveRefused):
        return envelope("inventory.stock.validation_failed", org, {
            "variant_id": variant, "reason": "stock_not_zero",
            "details": {"total_stock": ev.total_stock,
                        "warehouses_affected": [{"warehouse_id": wh, "quantity": q} for wh, q in ev.warehouses]},
            "action_required": "Clear all stock before deleting variant"}, now)
    if isinstance(ev, VariantArchived):
        return envelope("inventory.stock.archived", org, {
            "variant_id": variant, "warehouses": [{"warehouse_id": wh, "stock_id": stock_id((org, variant, wh))}
                                                  for wh in ev.warehouse_ids]}, now)
    raise TypeError(f"not a notification: {type(ev).__name__}")


def released(events: Sequence[tuple[StockKey, Event]], now: float) -> list[OutboxRow]:
    """One inventory.stock.released per reservation released or expired in the batch, with its
    lines (the spec lists it for the Order Service as "Reservation expired/released"; an expiry
    also has its own inventory.reservation.expired, once per reservation)."""
    groups: dict[tuple[str, str], list[tuple[StockKey, ReservationReleased | ReservationExpired]]] = {}
    for key, ev in events:
        if isinstance(ev, (ReservationReleased, ReservationExpired)):
            groups.setdefault((key[0], ev.reservation_id), []).append((key, ev))
    return [
        envelope("inventory.stock.released", org, {
            "reservation_id": rid,
            "reason": items[0][1].reason if isinstance(items[0][1], ReservationReleased) else "expired",
            "lines": [{"variant_id": k[1], "warehouse_id": k[2], "quantity": e.quantity} for k, e in items],
        }, now)
        for (org, rid), items in groups.items()
    ]


def movements(events: Sequence[tuple[StockKey, Event]], after: dict[StockKey, StockState],
              now: float) -> list[OutboxRow]:
    rows = []
    for key, ev in events:
        if isinstance(ev, StockMoved):
            name = MOVEMENT_EVENT.get(ev.kind, "inventory.movement." + ev.kind)
            data = {"movement_type": ev.kind, "on_hand_delta": ev.on_hand_delta,
                    "in_transit_delta": ev.in_transit_delta, "reason": ev.reason,
                    "reference_id": ev.reference_id}
        elif isinstance(ev, ReservationShipped):
            name = "inventory.movement.out"
            data = {"movement_type": "ship", "on_hand_delta": -ev.quantity, "in_transit_delta": 0,
                    "reason": "order shipped", "reference_id": ev.reservation_id, "order_id": ev.order_id}
        else:
            continue
        data = {"stock_id": stock_id(key), "variant_id": key[1], "warehouse_id": key[2],
                "quantity": abs(data["on_hand_delta"]) or abs(data["in_transit_delta"]), **data,
                "on_hand": after[key].on_hand if key in after else None}
        rows.append(envelope(name, key[0], data, now))
    return rows


def reservation_expired(headers: Iterable[asyncpg.Record], lines: Iterable[asyncpg.Record],
                        now: float) -> list[OutboxRow]:
    by_rid: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for ln in lines:
        by_rid.setdefault((ln["organization_id"], ln["reservation_id"]), []).append(
            {"variant_id": ln["variant_id"], "warehouse_id": ln["warehouse_id"], "quantity": ln["quantity"]})
    return [
        envelope("inventory.reservation.expired", h["organization_id"], {
            "reservation_id": h["reservation_id"], "order_id": h["order_id"],
            "expires_at": iso(h["expires_at"]), "lines": by_rid.get((h["organization_id"], h["reservation_id"]), []),
        }, now)
        for h in headers
    ]


INSERT = """
INSERT INTO outbox (event_id, event_name, organization_id, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[])
"""


def columns(rows: Sequence[OutboxRow]) -> list[list[object]]:
    cols: list[list[object]] = [[], [], [], []]
    for row in rows:
        for i in range(4):
            cols[i].append(row[i])
    return cols


async def insert(conn: asyncpg.Connection, rows: Sequence[OutboxRow]) -> None:
    await conn.execute(INSERT, *columns(rows))
