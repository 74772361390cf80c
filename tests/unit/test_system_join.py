"""A gateway joins an actor system that runs; it never starts one of its own (actors/system.py)."""

from __future__ import annotations

import socket
import time

import pytest

from actors.system import join_existing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_gateway_started_before_the_actor_system_waits_and_starts_no_admin_of_its_own() -> None:
    """Started first, a gateway used to start a Thespian admin on the leader's port (with a
    stand-in registrar), and `inventory actors` then could not start there."""
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"no actor system on port {port}"):
        join_existing(port, timeout=0.6)
    assert 0.5 < time.monotonic() - started < 5
    with socket.socket() as s:  # still free: nothing was started on it
        s.bind(("127.0.0.1", port))
