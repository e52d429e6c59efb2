"""Batches readings from the drivers into few buffer transactions, with back-pressure."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence

import structlog

from buffer.reading import Reading
from buffer.store import Buffer, check_readings

__all__ = ["BufferWriter"]

log = structlog.get_logger(__name__)

RETRY_BACKOFF_MIN = 0.1
"""Seconds before the first retry of a failed append; each further failure doubles it."""
RETRY_BACKOFF_MAX = 5.0


class BufferWriter:
    """Collects readings in memory and appends them to the buffer in batches.

    `run` commits everything pending in one transaction, at most once per
    `commit_interval` seconds, and `flush` commits at once. A reading stays
    pending until the append that contains it has returned, so an append that
    raises is retried. The buffer itself drops a batch when the disk is full or
    short of space (the append then returns no seq range), and such readings
    are counted in `dropped`, not retried. `put` waits while `max_pending`
    readings are pending.

    Shutdown: stop the producers, `await flush()`, then cancel `run`.
    """

    def __init__(
        self, buffer: Buffer, commit_interval: float, max_pending: int = 1_000_000
    ) -> None:
        if commit_interval < 0:
            message = f"commit_interval is {commit_interval}: expected 0 or more seconds"
            raise ValueError(message)
        if max_pending < 1:
            message = f"max_pending is {max_pending}: expected at least 1"
            raise ValueError(message)
        self._buffer = buffer
        self._commit_interval = commit_interval
        self._max_pending = max_pending
        # The first `count` readings of a running append are still pending: they are
        # removed only when the append returns, stored or dropped by the buffer.
        self._pending: list[Reading] = []
        self._committed = 0
        self._dropped = 0
        self._has_pending = asyncio.Event()
        self._has_space = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._in_flight: asyncio.Task[tuple[int, int]] | None = None
        self._last_commit = -math.inf

    @property
    def pending(self) -> int:
        """Number of readings accepted by `put` and not yet committed."""
        return len(self._pending)

    @property
    def committed(self) -> int:
        """Total readings this writer has committed to the buffer."""
        return self._committed

    @property
    def dropped(self) -> int:
        """Total readings the buffer did not store for lack of disk space."""
        return self._dropped

    async def put(self, readings: Sequence[Reading]) -> None:
        """Accept readings for the next commit, waiting while `max_pending` are pending.

        Either all readings are accepted or, if the call is cancelled or raises, none.
        Raises TypeError for a reading whose fields the buffer cannot store.
        """
        check_readings(readings)
        while len(self._pending) >= self._max_pending:
            self._has_space.clear()
            await self._has_space.wait()
        if readings:
            self._pending.extend(readings)
            self._has_pending.set()

    async def run(self) -> None:
        """Commit pending readings until cancelled, retrying failed appends with backoff."""
        loop = asyncio.get_running_loop()
        failures = 0
        failing_since = 0.0
        while True:
            while not self._pending:
                self._has_pending.clear()
                await self._has_pending.wait()
            delay = self._last_commit + self._commit_interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

            try:
                await self._commit()
            except Exception as exc:  # any failure is retried and the readings stay pending
                failures += 1
                if failures == 1:
                    failing_since = loop.time()
                backoff = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_MIN * 2 ** (failures - 1))
                level = log.warning if failures == 1 else log.debug
                level(
                    "buffer_append_failed",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    pending=self.pending,
                    count=failures,
                    retry_in=backoff,
                )
                await asyncio.sleep(backoff)
                continue

            if failures:
                log.info(
                    "buffer_append_recovered",
                    failures=failures,
                    outage_s=round(loop.time() - failing_since, 3),
                )
                failures = 0

    async def flush(self) -> None:
        """Commit every reading pending now in one transaction, or raise the append's error."""
        await self._commit()

    async def _commit(self) -> None:
        async with self._commit_lock:
            if self._in_flight is not None:
                # An append whose caller was cancelled may still be running on the SQLite
                # thread. Its outcome decides which readings are still pending.
                await asyncio.wait([self._in_flight])
            count = len(self._pending)
            if count == 0:
                return
            self._last_commit = asyncio.get_running_loop().time()
            # put() checked every reading, so the append does not check them again.
            append = self._buffer.append(self._pending[:count], checked=True)
            task = asyncio.create_task(append)
            # Registered before any waiter, so _settle runs before a waiter resumes.
            task.add_done_callback(functools.partial(self._settle, count))
            self._in_flight = task
            await asyncio.shield(task)

    def _settle(self, count: int, task: asyncio.Task[tuple[int, int]]) -> None:
        self._in_flight = None
        if task.cancelled() or task.exception() is not None:
            return
        first, last = task.result()
        stored = max(0, last - first + 1)
        del self._pending[:count]
        self._committed += stored
        self._dropped += count - stored
        self._has_space.set()
