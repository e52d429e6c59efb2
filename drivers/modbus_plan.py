"""Request planning: group a device's points into as few Modbus reads as the protocol allows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from config.model import ModbusPoint
from drivers.modbus_types import REGISTER_TABLES

__all__ = ["MAX_REGISTERS_PER_READ", "ReadRequest", "plan_requests"]

MAX_REGISTERS_PER_READ = 125
"""Protocol limit for one read of holding or input registers (function codes 3 and 4)."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read of a contiguous register range that serves one or more points."""

    table: str
    address: int
    count: int
    points: tuple[ModbusPoint, ...]

    @property
    def span(self) -> str:
        """The range as written in logs, such as "holding 100..109"."""
        return f"{self.table} {self.address}..{self.address + self.count - 1}"


def plan_requests(
    points: Sequence[ModbusPoint], max_registers: int = MAX_REGISTERS_PER_READ
) -> list[ReadRequest]:
    """Group points into as few reads as possible without reading any register they skip.

    Points of the same table whose register spans touch or overlap share a
    read, up to `max_registers` registers. A gap between spans always starts
    a new read, because a device may reject a read that covers an address it
    does not map.
    """
    requests: list[ReadRequest] = []
    for table in REGISTER_TABLES:
        in_table = sorted(
            (p for p in points if p.table == table), key=lambda p: (p.address, -p.registers)
        )
        group: list[ModbusPoint] = []
        start = end = 0
        for point in in_table:
            point_end = point.address + point.registers
            if group and point.address <= end and max(end, point_end) - start <= max_registers:
                group.append(point)
                end = max(end, point_end)
                continue
            if group:
                requests.append(ReadRequest(table, start, end - start, tuple(group)))
            group, start, end = [point], point.address, point_end
        if group:
            requests.append(ReadRequest(table, start, end - start, tuple(group)))
    return requests
