"""Live lane and backlog lane of a sink after an outage: the split decision and the rate limit.

A sink that finds more than its `backlog_threshold` readings waiting when it
(re)connects sets a split at the newest seq. Its live lane then sends the
readings above the split as they arrive, and its backlog lane sends the older
ones in seq order, paced by a token bucket, until none is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog

from buffer.reading import StoredReading
from buffer.store import LaneState
from config.model import BacklogRate

__all__ = ["BURST_SECONDS", "BacklogBudget", "LaneBufferLike", "TokenBucket", "plan_lanes"]

log = structlog.get_logger(__name__)

BURST_SECONDS = 0.25
"""Seconds of budget a token bucket keeps at most, so an idle lane bursts only that much."""


class LaneBufferLike(Protocol):
    """Buffer methods that a sink with two lanes calls, as provided by `buffer.store.Buffer`."""

    @property
    def last_seq(self) -> int: ...

    async def backlog(self, sink: str) -> LaneState: ...

    async def start_split(self, sink: str, split_seq: int) -> None: ...

    async def end_split(self, sink: str) -> None: ...

    async def ack_range(self, sink: str, first_seq: int, last_seq: int) -> None: ...

    async def read_range(
        self, first_seq: int, last_seq: int, limit: int
    ) -> list[StoredReading]: ...


async def plan_lanes(buffer: LaneBufferLike, sink: str, threshold: int) -> LaneState | None:
    """Decide at (re)connect whether a sink runs two lanes; return their state, or None.

    More than `threshold` readings above the live position set a new split at
    the newest seq, which also takes in an older split. A split left from
    before, or readings acknowledged out of order, keep the two lanes without
    a new split. A split whose backlog is already sent is cleared, and the
    sink goes back to a single lane (None).
    """
    state = await buffer.backlog(sink)
    newest = buffer.last_seq
    behind = newest - state.live_position
    if behind > threshold:
        await buffer.start_split(sink, newest)
        state = await buffer.backlog(sink)
        log.info(
            "lanes_split",
            sink=sink,
            split_seq=newest,
            backlog=state.depth,
            cursor=state.cursor,
            threshold=threshold,
        )
        return state
    if state.pending_ranges:
        log.info(
            "lanes_resumed",
            sink=sink,
            split_seq=state.split,
            backlog=state.depth,
            cursor=state.cursor,
            live_position=state.live_position,
        )
        return state
    if state.split is not None:
        await buffer.end_split(sink)
    return None


class TokenBucket:
    """Token bucket that limits a lane to `rate` units (readings or bytes) per second.

    The bucket starts empty and keeps at most `rate * BURST_SECONDS` tokens. A
    send whose cost exceeds that may go once the bucket is full, and leaves it
    in debt, so over any window of W seconds a lane sends at most
    `rate * W + max(rate * BURST_SECONDS, largest cost)` units.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            message = f"rate is {rate}: expected more than 0 units per second"
            raise ValueError(message)
        self.rate = rate
        self.capacity = rate * BURST_SECONDS
        self._clock = clock
        self._tokens = 0.0
        self._updated = clock()

    def delay(self, cost: float) -> float:
        """Return the seconds until a send of `cost` units may go; 0.0 when it may go now."""
        self._refill()
        needed = min(cost, self.capacity)
        # Refills add rounding errors, so a shortfall below a millionth of a unit counts as none.
        if self._tokens >= needed - 1e-6:
            return 0.0
        return (needed - self._tokens) / self.rate

    def take(self, cost: float) -> None:
        """Spend `cost` units for a send that goes now, whether or not `delay` allowed it."""
        self._refill()
        self._tokens -= cost

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now


class BacklogBudget:
    """The backlog_rate of one backlog lane: a token bucket, and the largest send it allows.

    A send is one MQTT message or one HTTP batch. Each send is kept to about
    one burst of the bucket, so that over any window of W seconds the lane
    sends at most about `rate * (W + BURST_SECONDS)`. With a rate in bytes,
    the readings per send follow the payload bytes per reading of the latest send.
    """

    def __init__(self, rate: BacklogRate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.bucket = TokenBucket(rate.amount, clock)
        self._bytes_per_reading: float | None = None

    def max_readings(self, limit: int) -> int:
        """Return the readings one send may hold, at most `limit` and at least 1."""
        if self.rate.unit == "readings":
            per_send = self.bucket.capacity
        elif self._bytes_per_reading is None:
            # Until a send has measured the bytes per reading, sends are kept small.
            return max(1, min(limit, 100))
        else:
            per_send = self.bucket.capacity / self._bytes_per_reading
        return max(1, min(limit, int(per_send)))

    def cost(self, readings: int, payload_bytes: int) -> float:
        """Return what a send costs in the rate's unit, and learn its bytes per reading."""
        if readings > 0:
            self._bytes_per_reading = payload_bytes / readings
        return float(readings) if self.rate.unit == "readings" else float(payload_bytes)

    def delay(self, cost: float) -> float:
        """Return the seconds until a send of `cost` may go; 0.0 when it may go now."""
        return self.bucket.delay(cost)

    def take(self, cost: float) -> None:
        """Spend `cost` for a send that goes now."""
        self.bucket.take(cost)
