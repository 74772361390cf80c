"""actors/keys.py: ids are stable across processes, so a faster way to compute one must give the same text."""

from __future__ import annotations

import uuid

from hypothesis import example, given
from hypothesis import strategies as st

from actors.keys import reservation_id, stock_id, uuid5_text


@given(st.uuids(), st.text(max_size=300))
@example(uuid.NAMESPACE_DNS, "python.org")
@example(uuid.UUID(int=0), "")
@example(uuid.UUID(int=2**128 - 1), "\x00ü😀/")
def test_uuid5_text_is_the_standard_uuid5(namespace: uuid.UUID, name: str) -> None:
    assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))


def test_ids_did_not_change() -> None:
    """Ids already stored in Postgres (reservations, stocks, events) must keep their values."""
    assert reservation_id("org-1", "order-1") == str(
        uuid.uuid5(uuid.UUID("0d7b5d55-2f57-4bb7-9a55-3b1a9c0e6f21"), "org-1/order-1"))
    assert stock_id(("org-1", "v-1", "wh-1")) == str(
        uuid.uuid5(uuid.UUID("5b0e4a3c-51c7-4c5e-9f1e-6c1f0d7e2a10"), "org-1/v-1/wh-1"))
