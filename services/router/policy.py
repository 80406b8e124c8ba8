"""What may go to the API: a circuit breaker, call budgets and a fallback-rate cap.

All clocks are injectable so the policies can be tested without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum

Clock = Callable[[], float]


class BreakerState(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive API failures; after `reset_s` lets one probe through
    (half-open): its success closes the circuit, its failure opens it again."""

    def __init__(self, failures: int, reset_s: float, clock: Clock = time.monotonic) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self._reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def admits(self) -> bool:
        """Whether a call may go to the API now, without taking the half-open probe."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probe_in_flight
        )

    def allow(self) -> bool:
        """Like `admits`, and a call that is let through half-open becomes the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._probe_in_flight or self._consecutive >= self._threshold:
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def abandon(self) -> None:
        """A call let through that ended without a verdict (its client cancelled): it says
        nothing of the API, and a half-open probe is free again for the next call."""
        self._probe_in_flight = False


class CallBudget:
    """At most `per_minute` and `per_day` API calls in any sliding minute and day."""

    def __init__(
        self, per_minute: int | None, per_day: int | None, clock: Clock = time.monotonic
    ) -> None:
        self._per_minute = per_minute
        self._per_day = per_day
        self._clock = clock
        self._calls: deque[float] = deque()

    def _trim(self) -> None:
        horizon = self._clock() - 86400
        while self._calls and self._calls[0] < horizon:
            self._calls.popleft()

    def left(self) -> dict[str, float]:
        self._trim()
        now = self._clock()
        in_minute = sum(1 for t in self._calls if t >= now - 60)
        return {
            "minute": float("inf") if self._per_minute is None else self._per_minute - in_minute,
            "day": float("inf") if self._per_day is None else self._per_day - len(self._calls),
        }

    def has_room(self) -> bool:
        left = self.left()
        return left["minute"] > 0 and left["day"] > 0

    def try_spend(self) -> bool:
        if not self.has_room():
            return False
        self._calls.append(self._clock())
        return True


class FallbackRateCap:
    """Keeps the fraction of the last `window` Predict calls sent to the API at most `cap`."""

    def __init__(self, cap: float, window: int) -> None:
        self._cap = cap
        self._recent: deque[bool] = deque(maxlen=window)

    def allows_fallback(self) -> bool:
        if self._cap >= 1.0:
            return True
        n = len(self._recent) + 1
        return (sum(self._recent) + 1) / n <= self._cap

    def record(self, fell_back: bool) -> None:
        self._recent.append(fell_back)

    @property
    def rate(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 0.0
