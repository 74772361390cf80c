"""One tuning of Thespian's TCP transport, applied in every process that runs it.

thespian 4.0.1's `TCPTransport._runWithExpiry` builds a new `selectors.DefaultSelector()` on
every pass of its loop ("creates selector on each loop, perhaps this could be optimized", says
its source): on Linux an epoll instance, so each pass costs an epoll_create, one epoll_ctl per
socket, the wait and a close. The gateway's bridge thread passes through it for every batch
sent and every reply; under a hot-stock load the selector's construction, registrations and
close were about a tenth of the gateway's samples (py-spy, bench/reserve.py --profile).
`PollSelector` does the same job with one poll() call per pass and no set-up syscalls.

The transport reads only `DefaultSelector`, `EVENT_READ` and `EVENT_WRITE` from the module;
they are swapped in its namespace only. A descriptor closed under it is reported by poll as
readable (POLLNVAL) instead of failing the registration: the transport then fails the read on
it, which it handles as a closed connection.

Applied where this project creates an actor system (`actors.system.join` in a gateway,
`run_node` in a node, whose actor processes inherit it when Thespian forks them) and, for a
shard started otherwise, in `StockShard.__init__`.
"""

from __future__ import annotations

import os
import selectors
import types

from thespian.system.transport import TCPTransport

_POLL = types.SimpleNamespace(
    DefaultSelector=selectors.PollSelector,
    EVENT_READ=selectors.EVENT_READ,
    EVENT_WRITE=selectors.EVENT_WRITE,
)


def use_poll_selector() -> None:
    """Make Thespian's TCP transport in this process select with poll (idempotent), unless
    INVENTORY_THESPIAN_SELECTOR=default asks for Thespian's own choice."""
    if os.environ.get("INVENTORY_THESPIAN_SELECTOR", "poll") == "default":
        return
    TCPTransport.selectors = _POLL  # type: ignore[attr-defined]
