"""Modbus requests per poll for a 300-point map: the request plan against one request per point.

The map mixes the four tables, several types, bits of status registers,
gaps between device blocks and scattered single registers, as a rig PLC
map does. The script counts requests, addresses read and Modbus TCP bytes
per poll for each `max_gap`, then times real polls of each strategy against
a pymodbus server in a child process, through the agent's ModbusBus. Run
from the repository root:

    .venv/bin/python -m bench.bench_modbus_plan
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    add_json_option,
    code_version,
    machine_info,
    print_table,
    quiet_logs,
    write_json,
)
from bench.modbus_server import start_process, stop_process
from config.model import ModbusPoint
from drivers.modbus_bus import ModbusBus
from drivers.modbus_plan import ReadRequest, decode_request, plan_requests
from drivers.modbus_transport import parse_modbus_url
from tests.peers import free_port

__all__ = ["main", "rig_map"]

MBAP_BYTES = 7
"""Modbus TCP header of every request and response: transaction, protocol, length, unit id."""
READ_REQUEST_PDU_BYTES = 5
"""Function code, start address and quantity of a read request."""
READ_RESPONSE_HEAD_BYTES = 2
"""Function code and byte count of a read response, before its data."""
SERVER_REGISTERS = 2200
SERVER_BITS = 400
"""Addresses the test server serves in each table; the map stays below them."""


def _point(channel: str, table: str, address: int, type_name: str, **extra: Any) -> ModbusPoint:
    return ModbusPoint.model_validate(
        {"channel": channel, "table": table, "address": address, "type": type_name, **extra}
    )


def rig_map() -> list[ModbusPoint]:
    """Return the 300-point map: blocks of devices with gaps, status bits and scattered values."""
    points: list[ModbusPoint] = []
    # Drawworks: 30 float32 values back to back in holding 0..59.
    points += [_point(f"dw_{i:02d}", "holding", 2 * i, "float32") for i in range(30)]

    # Three mud pumps of 12 points (16 registers) each, 100 registers apart.
    for pump in range(3):
        base = 200 + 100 * pump
        layout = [
            ("discharge_psi", 0, "float32", {}),
            ("suction_psi", 2, "float32", {}),
            ("spm_a", 4, "uint16", {"scale": 0.1}),
            ("spm_b", 5, "uint16", {"scale": 0.1}),
            ("strokes", 6, "uint32", {}),
            ("temp_1", 8, "int16", {"scale": 0.1}),
            ("temp_2", 9, "int16", {"scale": 0.1}),
            ("temp_3", 10, "int16", {"scale": 0.1}),
            ("temp_4", 11, "int16", {"scale": 0.1}),
            ("status", 12, "uint16", {}),
            ("flow", 13, "float32", {}),
            ("hours", 15, "uint16", {}),
        ]
        points += [
            _point(f"pump{pump}_{name}", "holding", base + offset, type_name, **extra)
            for name, offset, type_name, extra in layout
        ]

    # 32 alarm bits in the two status registers holding 1000 and 1001.
    points += [
        _point(f"alarm_{i:02d}", "holding", 1000 + i // 16, "bool", bit=i % 16) for i in range(32)
    ]

    # 20 single int16 values scattered 7 registers apart from holding 2000.
    points += [_point(f"aux_{i:02d}", "holding", 2000 + 7 * i, "int16") for i in range(20)]

    # Analog inputs: 60 float32 in input 0..119, 30 int16 at 500, 8 float64 at 600.
    points += [_point(f"ai_{i:02d}", "input", 2 * i, "float32") for i in range(60)]
    points += [_point(f"ai16_{i:02d}", "input", 500 + i, "int16") for i in range(30)]
    points += [_point(f"depth_{i}", "input", 600 + 4 * i, "float64") for i in range(8)]

    # Coils: 30 at 0..29 and 10 at 100..109.
    points += [_point(f"coil_{i:02d}", "coil", i, "bool") for i in range(30)]
    points += [_point(f"coil_{i:02d}", "coil", 70 + i, "bool") for i in range(30, 40)]

    # Discrete inputs: 30 at 0..29 and 14 scattered 10 apart from 200.
    points += [_point(f"di_{i:02d}", "discrete", i, "bool") for i in range(30)]
    points += [
        _point(f"di_{i:02d}", "discrete", 200 + 10 * (i - 30), "bool") for i in range(30, 44)
    ]
    return points


def one_request_per_point(points: Sequence[ModbusPoint]) -> list[ReadRequest]:
    return [ReadRequest(p.table, p.address, p.span, (p,)) for p in points]


def wire_bytes(requests: Sequence[ReadRequest]) -> int:
    """Return the Modbus TCP bytes of one poll: every request and its response."""
    total = 0
    for request in requests:
        data = -(-request.count // 8) if request.is_bits else 2 * request.count
        total += MBAP_BYTES + READ_REQUEST_PDU_BYTES
        total += MBAP_BYTES + READ_RESPONSE_HEAD_BYTES + data
    return total


def describe(name: str, requests: Sequence[ReadRequest], points: int) -> dict[str, Any]:
    read = sum(request.count for request in requests)
    return {
        "strategy": name,
        "points": points,
        "requests_per_poll": len(requests),
        "addresses_read": read,
        "addresses_discarded": sum(request.discarded for request in requests),
        "wire_bytes_per_poll": wire_bytes(requests),
    }


async def time_polls(port: int, requests: Sequence[ReadRequest], polls: int) -> list[float]:
    """Run `polls` polls of the requests in order; return each poll's seconds."""
    bus = ModbusBus(parse_modbus_url(f"tcp://127.0.0.1:{port}"))
    bus.add_device(1, timeout=1.0, frame_pause=0.0)
    seconds: list[float] = []
    async with bus:
        # The first poll opens the connection, so it is not timed.
        for poll in range(polls + 1):
            started = time.perf_counter()
            for request in requests:
                data = await bus.read(1, request.table, request.address, request.count, 1.0)
                decode_request(request, data)
            if poll:
                seconds.append(time.perf_counter() - started)
    return seconds


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    points = rig_map()
    strategies: list[tuple[str, list[ReadRequest]]] = [
        ("one request per point", one_request_per_point(points))
    ]
    for gap in args.max_gaps:
        strategies.append((f"plan, max_gap {gap}", plan_requests(points, max_gap=gap)))
    rows = [describe(name, requests, len(points)) for name, requests in strategies]
    for row, (_, requests) in zip(rows, strategies, strict=True):
        row["requests_ratio"] = round(rows[0]["requests_per_poll"] / len(requests), 2)

    if args.polls:
        port = free_port()
        server = start_process([port], blank=(SERVER_REGISTERS, SERVER_BITS))
        try:
            for row, (_, requests) in zip(rows, strategies, strict=True):
                seconds = await time_polls(port, requests, args.polls)
                row["poll_ms_median"] = round(1000 * statistics.median(seconds), 2)
                row["poll_ms_mean"] = round(1000 * statistics.fmean(seconds), 2)
        finally:
            stop_process(server)
    return {
        "benchmark": "bench_modbus_plan",
        "machine": machine,
        "code": code_version(),
        "settings": {"polls": args.polls, "max_gaps": args.max_gaps},
        "map": {
            "points": len(points),
            "by_table": {
                table: sum(1 for p in points if p.table == table)
                for table in ("holding", "input", "coil", "discrete")
            },
        },
        "strategies": rows,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_modbus_plan",
        description=(
            "Count and time the Modbus requests of one poll of a 300-point map, planned "
            "against one request per point."
        ),
    )
    parser.add_argument(
        "--max-gaps",
        default="0,8,32",
        help="comma-separated max_gap values to plan with (default: 0,8,32)",
    )
    parser.add_argument(
        "--polls",
        type=int,
        default=200,
        help="timed polls per strategy against a pymodbus server; 0 skips timing (default: 200)",
    )
    add_json_option(parser, "bench_modbus_plan")
    args = parser.parse_args(argv)
    try:
        args.max_gaps = [int(part) for part in args.max_gaps.split(",")]
    except ValueError:
        parser.error(f"--max-gaps {args.max_gaps!r}: expected comma-separated whole numbers")
    if any(gap < 0 or gap > 124 for gap in args.max_gaps):
        parser.error(f"--max-gaps {args.max_gaps}: each must be 0 to 124, as in the config")
    if args.polls < 0:
        parser.error(f"--polls {args.polls} is invalid: expected 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    result = asyncio.run(measure(args))
    print(f"map: {result['map']['points']} points, by table {result['map']['by_table']}")
    print_table(
        "Modbus requests per poll (wire bytes: Modbus TCP requests and responses, calculated)",
        [
            ("strategy", "strategy"),
            ("requests_per_poll", "requests"),
            ("requests_ratio", "fewer x"),
            ("addresses_read", "addresses"),
            ("addresses_discarded", "discarded"),
            ("wire_bytes_per_poll", "wire bytes"),
            ("poll_ms_median", "poll ms p50"),
            ("poll_ms_mean", "poll ms mean"),
        ],
        result["strategies"],
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
