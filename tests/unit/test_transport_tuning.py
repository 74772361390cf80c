"""Thespian's TCP transport selects with poll in our processes (actors/transport.py)."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest
from thespian.system.transport import TCPTransport

from actors.transport import use_poll_selector


@pytest.fixture
def transport_module_restored() -> Iterator[None]:
    saved = TCPTransport.selectors
    yield
    TCPTransport.selectors = saved


@pytest.mark.usefixtures("transport_module_restored")
def test_the_transport_selects_with_poll_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    stdlib_default = selectors.DefaultSelector
    TCPTransport.selectors = selectors
    monkeypatch.setenv("INVENTORY_THESPIAN_SELECTOR", "default")
    use_poll_selector()
    assert TCPTransport.selectors.DefaultSelector is stdlib_default
    monkeypatch.delenv("INVENTORY_THESPIAN_SELECTOR")
    use_poll_selector()
    swapped = TCPTransport.selectors
    assert swapped.DefaultSelector is selectors.PollSelector
    assert (swapped.EVENT_READ, swapped.EVENT_WRITE) == (selectors.EVENT_READ, selectors.EVENT_WRITE)
    assert selectors.DefaultSelector is stdlib_default  # only the transport's namespace changed
    # what the transport does with it on each pass, on a real socket pair
    a, b = socket.socketpair()
    try:
        b.send(b"x")
        sel = swapped.DefaultSelector()
        sel.register(a.fileno(), swapped.EVENT_READ)
        sel.register(b.fileno(), swapped.EVENT_WRITE)
        ready = sorted((key.fd, ev) for key, ev in sel.select(1.0))
        sel.close()
        assert ready == sorted([(a.fileno(), swapped.EVENT_READ), (b.fileno(), swapped.EVENT_WRITE)])
    finally:
        a.close()
        b.close()
