"""Modbus TCP driver: reads a device's registers on a fixed schedule and emits readings."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU
from structlog.typing import FilteringBoundLogger

from buffer.reading import Quality, Reading, now_us
from config.model import ModbusPoint, ModbusSource
from config.units import format_duration
from drivers.base import Emit
from drivers.modbus_decode import apply_scale, decode_registers
from drivers.modbus_plan import ReadRequest, plan_requests

__all__ = ["ModbusTcpDriver"]

log = structlog.get_logger(__name__)

RECONNECT_DELAY_MIN = 0.5
RECONNECT_DELAY_MAX = 30.0
"""Bounds in seconds of the jittered, doubling wait between failed connects."""

GUARD_MARGIN = 0.25
"""Seconds added to the source timeout for the driver's own deadline on each call.

pymodbus applies the source timeout itself, so this outer deadline only
catches a call that hangs past it.
"""


@dataclass
class _Outage:
    """Failure state of one connection or read, for rate-limited logging."""

    failures: int = 0
    since: float = 0.0

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
class _Backoff:
    """Jittered exponential wait between connect attempts."""

    minimum: float
    maximum: float
    attempts: int = 0
    _random: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * 2**self.attempts)
        self.attempts += 1
        # Jitter spreads the reconnects of many gateways after a shared outage.
        return self._random.uniform(self.minimum, max(self.minimum, ceiling))

    def reset(self) -> None:
        self.attempts = 0


class ModbusTcpDriver:
    """Polls one Modbus TCP device at its poll interval and emits one reading per point.

    A point that cannot be read (timeout, lost connection, Modbus exception
    response, or a value that decodes to NaN or infinity) gets one reading
    with quality `bad` and no value when it goes bad, then none until it
    reads again.
    """

    def __init__(
        self,
        source: ModbusSource,
        *,
        reconnect_delay_min: float = RECONNECT_DELAY_MIN,
        reconnect_delay_max: float = RECONNECT_DELAY_MAX,
    ) -> None:
        self.name = source.name
        self.source = source
        self.requests: tuple[ReadRequest, ...] = tuple(plan_requests(source.points))
        self._log: FilteringBoundLogger = log.bind(
            source=source.name, url=source.url, unit_id=source.unit_id
        )
        self._deadline = source.timeout + GUARD_MARGIN
        self._backoff = _Backoff(reconnect_delay_min, reconnect_delay_max)
        self._next_connect_at = 0.0
        self._link = _Outage()
        self._request_outages = [_Outage() for _ in self.requests]
        self._bad: set[str] = set()
        self._overruns = 0
        self._log_plan()

    def _log_plan(self) -> None:
        self._log.info("modbus_plan", points=len(self.source.points), requests=len(self.requests))
        for request in self.requests:
            channels = [point.channel for point in request.points]
            self._log.debug("modbus_plan_request", request=request.span, channels=channels)

    async def run(self, emit: Emit) -> None:
        """Poll until cancelled. Device errors become bad readings, not exceptions."""
        client = AsyncModbusTcpClient(
            self.source.host,
            port=self.source.port,
            name=self.name,
            timeout=self.source.timeout,
            retries=0,
            # The driver reconnects at the start of a poll, with its own backoff.
            reconnect_delay=0,
        )
        try:
            await self._poll_forever(client, emit)
        finally:
            client.close()

    async def _poll_forever(self, client: AsyncModbusTcpClient, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        interval = self.source.poll_interval
        next_tick = loop.time()
        while True:
            delay = next_tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            readings = await self._poll_once(client)
            if readings:
                await emit(readings)
            next_tick = self._next_tick(next_tick, loop.time(), interval)

    def _next_tick(self, tick: float, now: float, interval: float) -> float:
        """Return the next tick on the fixed grid, skipping ticks a slow poll missed."""
        next_tick = tick + interval
        if now <= next_tick:
            return next_tick
        skipped = math.floor((now - next_tick) / interval) + 1
        self._overruns += 1
        fields = {"poll_s": round(now - tick, 3), "interval_s": interval, "skipped": skipped}
        if self._overruns == 1:
            self._log.warning("modbus_poll_overrun", **fields)
        else:
            self._log.debug("modbus_poll_overrun", overruns=self._overruns, **fields)
        return next_tick + skipped * interval

    async def _poll_once(self, client: AsyncModbusTcpClient) -> list[Reading]:
        """Read every planned request once and return the readings of this poll."""
        if not await self._ensure_connected(client):
            return self._mark_bad(self.source.points)
        readings: list[Reading] = []
        for index, request in enumerate(self.requests):
            if client.connected:
                readings.extend(await self._read(client, index, request))
            else:
                readings.extend(self._mark_bad(request.points))
        if not client.connected:
            self._link.fail(self._log, "modbus_connection_lost")
        return readings

    async def _ensure_connected(self, client: AsyncModbusTcpClient) -> bool:
        if client.connected:
            return True
        now = time.monotonic()
        if now < self._next_connect_at:
            return False
        try:
            async with asyncio.timeout(self._deadline):
                connected = await client.connect()
        except (TimeoutError, OSError):
            connected = False
        _raise_if_cancelled()
        if connected:
            self._backoff.reset()
            if not self._link.recover(self._log, "modbus_reconnected"):
                self._log.info("modbus_connected")
            return True
        retry_in_s = self._backoff.next_delay()
        self._next_connect_at = now + retry_in_s
        self._link.fail(self._log, "modbus_connect_failed", retry_in_s=round(retry_in_s, 3))
        return False

    async def _read(
        self, client: AsyncModbusTcpClient, index: int, request: ReadRequest
    ) -> list[Reading]:
        registers, error = await self._fetch(client, request)
        ts_us = now_us()
        outage = self._request_outages[index]
        if registers is None:
            outage.fail(self._log, "modbus_read_failed", request=request.span, error=error)
            return self._mark_bad(request.points)
        outage.recover(self._log, "modbus_read_recovered", request=request.span)
        return self._decode(request, registers, ts_us)

    async def _fetch(
        self, client: AsyncModbusTcpClient, request: ReadRequest
    ) -> tuple[Sequence[int] | None, str]:
        """Read the request's registers. Return them, or None and the reason the read failed."""
        read = (
            client.read_holding_registers
            if request.table == "holding"
            else client.read_input_registers
        )
        response: ModbusPDU | None = None
        error = ""
        try:
            async with asyncio.timeout(self._deadline):
                response = await read(
                    request.address, count=request.count, device_id=self.source.unit_id
                )
        except TimeoutError:
            error = f"timed out after {format_duration(self._deadline)}"
        except (ModbusException, OSError) as exc:
            error = str(exc)
        _raise_if_cancelled()

        if response is None:
            return None, error
        if response.isError():
            return None, _describe_exception_code(response.exception_code)
        if len(response.registers) != request.count:
            count = len(response.registers)
            return None, f"returned {count} registers, expected {request.count}"
        return response.registers, ""

    def _decode(self, request: ReadRequest, registers: Sequence[int], ts_us: int) -> list[Reading]:
        readings: list[Reading] = []
        not_finite: list[ModbusPoint] = []
        for point in request.points:
            start = point.address - request.address
            words = registers[start : start + point.registers]
            raw = decode_registers(words, point.type, point.word_order, point.byte_order)
            value = apply_scale(raw, point.scale, point.offset)
            if not math.isfinite(value):
                not_finite.append(point)
                continue
            self._bad.discard(point.channel)
            readings.append(Reading(ts_us, self.name, point.channel, value, point.unit))
        if not_finite:
            readings.extend(self._mark_bad(not_finite, ts_us, reason="value_not_finite"))
        return readings

    def _mark_bad(
        self, points: Sequence[ModbusPoint], ts_us: int | None = None, reason: str = ""
    ) -> list[Reading]:
        """Return one bad reading for each point that was good (or unknown) until now."""
        readings: list[Reading] = []
        ts_us = now_us() if ts_us is None else ts_us
        for point in points:
            if point.channel in self._bad:
                continue
            self._bad.add(point.channel)
            readings.append(Reading(ts_us, self.name, point.channel, None, point.unit, Quality.BAD))
            if reason:
                self._log.warning("modbus_point_bad", channel=point.channel, reason=reason)
        return readings


def _describe_exception_code(code: int) -> str:
    try:
        name = ExcCodes(code).name
    except ValueError:
        name = "unknown"
    return f"Modbus exception code {code} ({name})"


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled but a library call swallowed it.

    On Python 3.11, `asyncio.wait_for`, which pymodbus uses for connects and
    responses, returns the inner result and drops the CancelledError when the
    cancel arrives just as that result completes. Without this check, the
    driver would keep polling and never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
