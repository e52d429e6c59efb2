"""Modbus driver: polls one device (unit id) over TCP, RTU or RTU over TCP and emits readings."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from pymodbus.constants import ExcCodes
from structlog.typing import FilteringBoundLogger

from buffer.reading import Quality, Reading, now_us
from config.model import ModbusPoint, ModbusSource
from drivers.base import Emit
from drivers.modbus_bus import (
    DeviceException,
    DeviceTimeout,
    InvalidResponse,
    LinkDown,
    ModbusBus,
)
from drivers.modbus_plan import (
    PointValue,
    ReadRequest,
    decode_request,
    describe_plan,
    plan_for_source,
)
from drivers.retry import Backoff, Outage

__all__ = [
    "DEVICE_BACKOFF_MAX",
    "DEVICE_BACKOFF_MIN",
    "DeviceCounters",
    "ModbusDriver",
    "ModbusTcpDriver",
]

log = structlog.get_logger(__name__)

DEVICE_BACKOFF_MIN = 1.0
DEVICE_BACKOFF_MAX = 30.0
"""Bounds in seconds of the jittered, doubling wait between probes of a silent device."""

UNREACHABLE_CODES = frozenset({ExcCodes.GATEWAY_PATH_UNAVIABLE, ExcCodes.GATEWAY_NO_RESPONSE})
"""Exception codes with which a gateway reports that the device behind it did not respond."""


@dataclass
class DeviceCounters:
    """Failures and null values of one device since the driver started."""

    timeouts: int = 0
    """Requests with no response in time, including a gateway's "no response" exception codes."""
    exception_responses: int = 0
    """Requests the device rejected with a Modbus exception code."""
    invalid_responses: int = 0
    """Responses that did not fit their request."""
    link_down: int = 0
    """Polls that found the serial port or TCP connection down."""
    null_values: Counter[str] = field(default_factory=Counter)
    """Values equal to the point's null_value, by channel; each produced no reading."""
    responding: bool | None = None
    """Whether the device responded to its latest request, or None before the first one ends.

    An exception response or an invalid response counts as a response.
    """

    @property
    def failures(self) -> int:
        """Failed requests and polls of every kind."""
        return self.timeouts + self.exception_responses + self.invalid_responses + self.link_down


class ModbusDriver:
    """Polls one Modbus device at its poll interval and emits one reading per point.

    The device shares its bus (serial port or TCP address) with the other
    devices on it; the bus serialises their frames. Polls of this device
    never overlap: a poll that overruns the interval skips the missed ticks.

    A point that cannot be read gets one reading with quality `bad` and no
    value when it goes bad, then none until it reads again. The causes:
    a timeout or lost link (every point of the device), a Modbus exception
    response (the points of that request), or a value that decodes to NaN
    or infinity (that point).

    A device that stops responding is probed again after a jittered,
    doubling backoff, with one request per step, so it costs the other
    devices on the bus at most one timeout per step.
    """

    def __init__(
        self,
        source: ModbusSource,
        bus: ModbusBus | None = None,
        *,
        backoff_min: float = DEVICE_BACKOFF_MIN,
        backoff_max: float = DEVICE_BACKOFF_MAX,
        phase: float = 0.0,
    ) -> None:
        if not 0 <= phase < 1:
            msg = f"phase is {phase}: expected a fraction of the poll interval from 0 up to 1"
            raise ValueError(msg)
        self.name = source.name
        self.source = source
        endpoint = source.endpoint
        self.bus = ModbusBus(endpoint) if bus is None else bus
        if self.bus.key != endpoint.bus_key:
            msg = f"source {source.name!r} is on {endpoint.bus_key}, not on bus {self.bus.key}"
            raise ValueError(msg)
        self.bus.add_device(source.unit_id, timeout=source.timeout, frame_pause=source.frame_pause)
        self.requests: tuple[ReadRequest, ...] = tuple(plan_for_source(source))
        self.counters = DeviceCounters()
        self._log: FilteringBoundLogger = log.bind(
            source=source.name, url=source.url, unit_id=source.unit_id
        )
        self._backoff = Backoff(backoff_min, backoff_max)
        self._unresponsive = Outage()
        self._probe_at = 0.0
        self._request_outages = [Outage() for _ in self.requests]
        self._bad: set[str] = set()
        self._overruns = 0
        self._phase = phase
        self._log.info(
            "modbus_plan",
            points=len(source.points),
            requests=len(self.requests),
            plan=describe_plan(source, self.requests),
        )

    async def run(self, emit: Emit) -> None:
        """Poll until cancelled. Device errors become bad readings, not exceptions."""
        async with self.bus:
            await self._poll_forever(emit)

    async def _poll_forever(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        interval = self.source.poll_interval
        # The first poll runs at once. Later polls follow a grid offset by the phase, so
        # that sources with the same interval do not all poll on one tick.
        readings = await self._poll_once()
        if readings:
            await emit(readings)
        now = loop.time()
        phase = self._phase * interval
        next_tick = phase + math.ceil((now - phase) / interval) * interval
        while True:
            delay = next_tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            readings = await self._poll_once()
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

    async def _poll_once(self) -> list[Reading]:
        """Read every planned request once and return the readings of this poll.

        While the device is backing off, ticks before the next probe read
        nothing. The probe is the poll's first request: if it fails, the
        poll ends there.
        """
        if self._unresponsive.active and time.monotonic() < self._probe_at:
            return []
        readings: list[Reading] = []
        for index, request in enumerate(self.requests):
            batch, answered = await self._read(index, request)
            readings.extend(batch)
            if not answered:
                return readings
        if self._unresponsive.recover(self._log, "modbus_device_recovered"):
            self._backoff.reset()
        return readings

    async def _read(self, index: int, request: ReadRequest) -> tuple[list[Reading], bool]:
        """Read one request; return its readings and whether the device responded at all."""
        try:
            data = await self.bus.read(
                self.source.unit_id,
                request.table,
                request.address,
                request.count,
                self.source.timeout,
            )
        except LinkDown:
            # The bus logs the link state once for all its devices.
            self.counters.link_down += 1
            self.counters.responding = False
            return self._mark_bad(self.source.points), False
        except DeviceTimeout as exc:
            return self._device_failed(str(exc)), False
        except DeviceException as exc:
            if exc.code in UNREACHABLE_CODES:
                return self._device_failed(str(exc)), False
            self.counters.exception_responses += 1
            self.counters.responding = True
            return self._request_failed(index, request, str(exc)), True
        except InvalidResponse as exc:
            self.counters.invalid_responses += 1
            self.counters.responding = True
            return self._request_failed(index, request, str(exc)), True
        self.counters.responding = True
        try:
            decoded = decode_request(request, data)
        except ValueError as exc:
            # bus.read checks the length, so pymodbus let through a value no register can
            # hold. Only this request's points become bad, and the poll goes on.
            self.counters.invalid_responses += 1
            return self._request_failed(index, request, str(exc)), True
        return self._request_read(index, request, decoded), True

    def _device_failed(self, error: str) -> list[Reading]:
        """Start or continue the device's backoff and mark all its points bad."""
        self.counters.timeouts += 1
        self.counters.responding = False
        retry_in_s = self._backoff.next_delay()
        self._probe_at = time.monotonic() + retry_in_s
        self._unresponsive.fail(
            self._log, "modbus_device_not_responding", error=error, retry_in_s=round(retry_in_s, 3)
        )
        return self._mark_bad(self.source.points)

    def _request_failed(self, index: int, request: ReadRequest, error: str) -> list[Reading]:
        outage = self._request_outages[index]
        outage.fail(self._log, "modbus_read_failed", request=request.span, error=error)
        return self._mark_bad(request.points)

    def _request_read(
        self, index: int, request: ReadRequest, decoded: list[PointValue]
    ) -> list[Reading]:
        """Turn the decoded response of one request into readings stamped with its arrival time."""
        ts_us = now_us()
        self._request_outages[index].recover(
            self._log, "modbus_read_recovered", request=request.span
        )
        readings: list[Reading] = []
        not_finite: list[ModbusPoint] = []
        name = self.name
        bad = self._bad
        good = Quality.GOOD
        new = tuple.__new__
        for point, value, status in decoded:
            if status == "good" and value is not None:
                if bad:
                    bad.discard(point.channel)
                # tuple.__new__ with all six fields: the same Reading in half the time.
                readings.append(new(Reading, (ts_us, name, point.channel, value, point.unit, good)))
            elif status == "null":
                self._count_null(point)
            else:
                not_finite.append(point)
        if not_finite:
            readings.extend(self._mark_bad(not_finite, ts_us, reason="value_not_finite"))
        return readings

    def _count_null(self, point: ModbusPoint) -> None:
        self.counters.null_values[point.channel] += 1
        self._log.debug(
            "modbus_null_value",
            channel=point.channel,
            null_value=point.null_value,
            count=self.counters.null_values[point.channel],
        )

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


def poll_phases(sources: Sequence[ModbusSource]) -> dict[str, float]:
    """Spread the polls of sources that share a poll interval evenly over that interval.

    Returns each source's phase, from 0 up to 1 interval: the n sources of one
    interval, in name order, get 0, 1/n, 2/n and so on.
    """
    by_interval: dict[float, list[str]] = {}
    for source in sources:
        by_interval.setdefault(source.poll_interval, []).append(source.name)
    return {
        name: index / len(names)
        for names in by_interval.values()
        for index, name in enumerate(sorted(names))
    }


ModbusTcpDriver = ModbusDriver
"""The driver's earlier name, from when it spoke Modbus TCP only."""
