"""Names for the service's Postgres sessions, so an operator can tell them apart.

In `pg_stat_activity` each connection of the service says what it is: `inventory-shard-N`
(which holds shard N's advisory lock), `inventory-gateway` (its pool), `inventory-relay`,
`inventory-sweep` (each holding its lock while active), `inventory-health`,
`inventory-migrate`, `inventory-reconcile`. An `application_name` in the DSN, or PGAPPNAME
in the environment, is the operator's choice and is kept instead.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit


def settings(dsn: str, name: str, **more: str) -> dict[str, str]:
    """asyncpg `server_settings` for a connection of ours: `more`, and `application_name` = `name`
    unless the DSN or PGAPPNAME already names the application."""
    out = dict(more)
    named = bool(os.environ.get("PGAPPNAME"))
    if not named and "://" in dsn:
        named = "application_name" in parse_qs(urlsplit(dsn).query)
    if not named:
        out["application_name"] = name
    return out
