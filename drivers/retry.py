"""Retry helpers shared by the drivers: jittered backoff, outage logging, cancel checks."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

__all__ = ["Backoff", "Outage", "cancelling", "raise_if_cancelled"]


@dataclass
class Outage:
    """Failure state of one connection, device or request, for rate-limited logging."""

    failures: int = 0
    since: float = 0.0

    @property
    def active(self) -> bool:
        """Whether the last attempt failed."""
        return self.failures > 0

    def fail(self, logger: FilteringBoundLogger, event: str, **fields: object) -> None:
        """Log the first failure at WARNING and repeats at DEBUG with a count."""
        self.failures += 1
        if self.failures == 1:
            self.since = time.monotonic()
            logger.warning(event, **fields)
        else:
            logger.debug(event, failures=self.failures, **fields)

    def recover(self, logger: FilteringBoundLogger, event: str, **fields: object) -> bool:
        """Log the end of an outage at INFO with its length, and return True if there was one."""
        if self.failures == 0:
            return False
        outage_s = round(time.monotonic() - self.since, 3)
        logger.info(event, outage_s=outage_s, failures=self.failures, **fields)
        self.failures = 0
        return True


@dataclass
class Backoff:
    """Jittered exponential wait between retries, in seconds."""

    minimum: float
    maximum: float
    attempts: int = 0
    _random: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Return the wait before the next retry: up to double the previous ceiling."""
        ceiling = min(self.maximum, self.minimum * 2**self.attempts)
        self.attempts += 1
        # Jitter spreads the retries of many gateways after a shared outage.
        return self._random.uniform(self.minimum, max(self.minimum, ceiling))

    def reset(self) -> None:
        self.attempts = 0


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled but a library call swallowed it.

    On Python 3.11, `asyncio.wait_for`, which pymodbus uses for connects and
    responses, returns the inner result and drops the CancelledError when the
    cancel arrives just as that result completes. Without this check, a
    driver would keep polling and never stop.
    """
    if cancelling():
        raise asyncio.CancelledError


def cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
