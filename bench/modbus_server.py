"""Modbus TCP servers for the pipeline benchmark, run in a process of their own.

Each port serves unit id 1 with the same holding registers: `points`
values of mixed types back to back (float32, uint16, int16, float32, ...),
so that `pipeline_points` describes what every port serves. Started by
bench_pipeline as:

    python -m bench.modbus_server --points 500 --ports 15020,15021

With `--blank REGISTERS,BITS` each port serves instead a unit whose four
tables are zero-filled from address 0 (tests/peers.py sim_device), as
bench_modbus_plan uses. It prints "ready" on stdout once every port is
listening, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bench.common import positive_int
from drivers.modbus_decode import encode_value
from tests.peers import sim_device, wait_for_port

__all__ = [
    "POINT_TYPES",
    "main",
    "pipeline_points",
    "register_values",
    "start_process",
    "stop_process",
]

POINT_TYPES = ("float32", "uint16", "int16", "float32")
"""Types of consecutive points, repeated: 4 points take 6 registers."""
UNIT_ID = 1


def pipeline_points(count: int) -> list[dict[str, Any]]:
    """Return `count` holding-register points, back to back, as config point tables."""
    points: list[dict[str, Any]] = []
    address = 0
    for index in range(count):
        type_name = POINT_TYPES[index % len(POINT_TYPES)]
        points.append(
            {
                "channel": f"ch{index:04d}",
                "table": "holding",
                "address": address,
                "type": type_name,
                "unit": "psi" if type_name == "float32" else "spm",
            }
        )
        address += 2 if type_name == "float32" else 1
    return points


def point_value(index: int, type_name: str) -> float:
    """Return the value the server holds for point `index`: exact in its type, never NaN."""
    if type_name == "float32":
        return 1000.0 + index * 0.25
    if type_name == "int16":
        return -100 - index % 1000
    return 200 + index % 1000


def register_values(count: int) -> list[int]:
    """Return the register words that hold the values of `pipeline_points(count)`."""
    words: list[int] = []
    for index, point in enumerate(pipeline_points(count)):
        value = point_value(index, point["type"])
        words.extend(encode_value(value, point["type"], "big", "big"))
    return words


def start_process(
    ports: Sequence[int], *, points: int = 1, blank: tuple[int, int] | None = None
) -> subprocess.Popen[bytes]:
    """Start this module in a child process and wait until every port accepts connections."""
    command = [sys.executable, "-m", "bench.modbus_server", "--points", str(points)]
    command += ["--ports", ",".join(str(port) for port in ports)]
    if blank is not None:
        command += ["--blank", f"{blank[0]},{blank[1]}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != b"ready":
        stop_process(process)
        message = f"Modbus server process did not start (it printed {line!r})"
        raise RuntimeError(message)
    for port in ports:
        wait_for_port(port)
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server process with SIGTERM, or SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def serve(points: int, ports: Sequence[int], blank: tuple[int, int] | None) -> None:
    words = register_values(points)
    servers = []
    for port in ports:
        if blank is not None:
            device = sim_device(UNIT_ID, registers=blank[0], bits=blank[1])
        else:
            device = SimDevice(
                id=UNIT_ID, simdata=[SimData(0, values=words, datatype=DataType.REGISTERS)]
            )
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        servers.append(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        await server.shutdown()  # type: ignore[no-untyped-call]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.modbus_server",
        description="Serve the pipeline benchmark's register map on several 127.0.0.1 ports.",
    )
    parser.add_argument(
        "--points", type=positive_int, default=1, help="points served on each port (default: 1)"
    )
    parser.add_argument(
        "--blank",
        default=None,
        help="serve zero-filled tables instead: REGISTERS,BITS addresses from 0",
    )
    parser.add_argument(
        "--ports", required=True, help="comma-separated TCP ports on 127.0.0.1, one server each"
    )
    args = parser.parse_args(argv)
    try:
        ports = [int(part) for part in args.ports.split(",")]
    except ValueError:
        parser.error(f"--ports {args.ports!r}: expected comma-separated port numbers")
    blank = None
    if args.blank is not None:
        try:
            registers, bits = (int(part) for part in args.blank.split(","))
        except ValueError:
            parser.error(f"--blank {args.blank!r}: expected REGISTERS,BITS such as 2200,400")
        blank = (registers, bits)
    asyncio.run(serve(args.points, ports, blank))


if __name__ == "__main__":
    main()
