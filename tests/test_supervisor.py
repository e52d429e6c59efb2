"""The supervisor restarts failed tasks with backoff and logs each failure."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from agent.supervisor import full_jitter_delay, supervise


@pytest.mark.parametrize("attempt", [0, 1, 5, 40, 1000])
def test_backoff_within_cap(attempt: int) -> None:
    """Full-jitter delays stay between zero and min(cap, base * 2**attempt)."""
    for _ in range(200):
        delay = full_jitter_delay(attempt, 0.5, 30.0)
        assert 0.0 <= delay <= min(30.0, 0.5 * 2**attempt)


async def test_failed_body_is_restarted() -> None:
    """A body that raises is logged with its error and run again."""
    calls = 0
    third_call = asyncio.Event()

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            third_call.set()
            await asyncio.sleep(3600)
        message = f"device fault {calls}"
        raise RuntimeError(message)

    with capture_logs() as logs:
        task = asyncio.create_task(supervise("source", "pumps", body, base_delay=0.01))
        async with asyncio.timeout(5):
            await third_call.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    failures = [entry for entry in logs if entry["event"] == "task_failed"]
    assert calls == 3
    assert len(failures) == 2
    assert failures[0]["error"] == "RuntimeError: device fault 1"


async def test_returning_body_is_restarted() -> None:
    """A body that returns on its own is treated as a failure and restarted."""
    calls = 0
    second_call = asyncio.Event()

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            second_call.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(supervise("sink", "mqtt", body, base_delay=0.01))
    async with asyncio.timeout(5):
        await second_call.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 2


async def test_cancel_stops_supervision() -> None:
    """Cancelling the supervisor cancels the running body and does not restart it."""
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(supervise("sink", "mqtt", body))
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
