"""Supervised tasks: a driver or sink that fails is logged and restarted with backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import structlog

__all__ = ["full_jitter_delay", "supervise"]

log = structlog.get_logger(__name__)

RESTART_BASE_DELAY = 1.0
RESTART_MAX_DELAY = 60.0
HEALTHY_RUN_SECONDS = 60.0
"""A task that ran this long before failing restarts with the backoff reset."""


def full_jitter_delay(attempt: int, base: float, cap: float) -> float:
    """Return a full-jitter exponential backoff delay for the given attempt (0-based)."""
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography


async def supervise(
    kind: str,
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    base_delay: float = RESTART_BASE_DELAY,
    max_delay: float = RESTART_MAX_DELAY,
) -> None:
    """Run `body` until cancelled, restarting it with backoff whenever it fails or returns."""
    structlog.contextvars.bind_contextvars(**{kind: name})
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            log.warning("task_returned")

        if time.monotonic() - started >= HEALTHY_RUN_SECONDS:
            attempt = 0
        delay = full_jitter_delay(attempt, base_delay, max_delay)
        attempt += 1
        log.info("task_restart_scheduled", delay_s=round(delay, 2), attempt=attempt)
        await asyncio.sleep(delay)
