"""Per-organization request quotas: a token bucket per organization_id, so one noisy tenant cannot
starve the others. Off by default (INVENTORY_QUOTA_RPS=0).

A grpc.aio server interceptor: every unary call whose request has an `organization_id` field takes one
token from that organization's bucket (refilled at `rate` per second up to `burst`); an empty bucket
answers RESOURCE_EXHAUSTED at once, before any work. Health and reflection have no organization and
are never limited. The buckets are per gateway process: with N gateways an organization may get up
to N times the rate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.interceptors import UnaryInterceptor

MAX_TRACKED = 100_000
"""Buckets kept (least recently used dropped): random organization ids cannot grow memory without bound.
A dropped bucket comes back full, which only ever favours the caller."""


class TokenBuckets:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = float(burst if burst > 0 else max(1, int(rate)))
        self.clock = clock
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> bool:
        """Take one token of `key`'s bucket; False when it is empty."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        return allowed


class QuotaInterceptor(UnaryInterceptor):
    def __init__(self, rate: float, burst: int) -> None:
        super().__init__()
        self.buckets = TokenBuckets(rate, burst)

    def wrap(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        buckets = self.buckets

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            org = getattr(request, "organization_id", None)
            if isinstance(org, str) and not buckets.take(org):
                shown = org if len(org) <= 100 else org[:100] + "…"  # the message travels in a header
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"request quota of organization {shown!r} exceeded "
                                    f"({buckets.rate:g} requests/s, burst {buckets.burst:g}); retry later")
            return await behavior(request, context)

        return limited
