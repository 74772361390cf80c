"""A circuit breaker per dependency (Catalog, Redis, Postgres, RabbitMQ).

Why: when a dependency is down, waiting for its timeout on every request turns one
outage into slow requests everywhere. After `threshold` consecutive failures the breaker
*opens* and callers skip the dependency at once (serve from a cache, degrade, or fail
fast). After `cooldown` seconds it *half-opens*: exactly one trial call goes through; its
success closes the breaker, its failure opens it again for another cool-down.

    state      allow()                                  success      failure
    closed     yes                                      failures=0   failures+1; open at threshold
    open       no, until the cool-down has passed,      -            -
               then half_open and this caller is the trial
    half_open  no (the trial is out)                    closed       open (new cool-down)

The breaker is not thread-safe; it lives on the gateway's event loop. The clock is
injected so the table above can be tested without waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("inventory.breaker")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the metric's encoding


@dataclass(frozen=True)
class BreakerSnapshot:
    name: str
    state: str
    failures: int
    opened_at: float | None
    last_error: str


class CircuitBreaker:
    def __init__(self, name: str, threshold: int = 5, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.opened_at: float | None = None
        self.last_error = ""
        self._trial_started = 0.0

    def allow(self) -> bool:
        """May a call go to the dependency now? In half_open, only the one trial may."""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if self.state == OPEN:
            assert self.opened_at is not None
            if now - self.opened_at < self.cooldown:
                return False
            self.state = HALF_OPEN
            self._trial_started = now
            log.info("circuit breaker %s half-open: one trial call", self.name)
            return True
        # half_open with the trial out: a trial that never reported back (cancelled) must
        # not wedge the breaker, so after another cool-down a new trial may go.
        if now - self._trial_started >= self.cooldown:
            self._trial_started = now
            return True
        return False

    def record_success(self) -> None:
        if self.state != CLOSED:
            log.info("circuit breaker %s closed", self.name)
        self.state = CLOSED
        self.failures = 0
        self.opened_at = None

    def record_failure(self, error: str = "") -> None:
        self.failures += 1
        self.last_error = error
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            self.state = OPEN
            self.opened_at = self._clock()
            log.error("circuit breaker %s opened after %d consecutive failures: %s",
                      self.name, self.failures, error)
        elif self.state == OPEN:
            self.opened_at = self._clock()

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(self.name, self.state, self.failures, self.opened_at, self.last_error)


class Breakers(dict[str, CircuitBreaker]):
    """The breakers of one gateway, by dependency name; created on first use with shared settings."""

    def __init__(self, threshold: int = 5, cooldown: float = 30.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.cooldown = cooldown

    def of(self, name: str) -> CircuitBreaker:
        breaker = self.get(name)
        if breaker is None:
            breaker = self[name] = CircuitBreaker(name, self.threshold, self.cooldown)
        return breaker
