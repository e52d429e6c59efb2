"""`rig-agent modbus read` and `modbus scan` against a pymodbus server started by the test."""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import AsyncIterator, Sequence

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.cli import main
from agent.modbus_tools import UsageError, format_float, parse_address, parse_unit_ids
from drivers.modbus_decode import encode_value
from tests.peers import free_port

FLOAT_ADDRESS = 100
INT16_ADDRESS = 102
GAP_ADDRESS = 500
"""An address the test device does not have: reading it returns exception code 2."""
PRESENT_UNITS = (1, 3, 7)
EXCEPTION_UNIT = 3
"""A unit that exists but has no register at the probe address, so it returns an exception."""
GATEWAY_MISS_UNIT = 9
"""A unit id that gets exception 11, as a gateway returns it for a device that is not there."""


def device_registers() -> list[int]:
    """Return holding registers 100..: 1234.5 as float32 in CDAB, then -2 as int16, then text."""
    registers = encode_value(1234.5, "float32", "little", "big")
    registers += encode_value(-2, "int16", "big", "big")
    registers += [0x4142, 0x4344]
    return registers


def make_device(unit: int) -> SimDevice:
    """Build a device with coils at 0, holding registers from 100 and inputs at 0."""
    holding_start = 10 if unit == EXCEPTION_UNIT else FLOAT_ADDRESS
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[0b1011], datatype=DataType.BITS)],
            [SimData(0, values=[0], datatype=DataType.BITS)],
            [SimData(holding_start, values=device_registers(), datatype=DataType.REGISTERS)],
            [SimData(0, values=[7], datatype=DataType.REGISTERS)],
        ),
    )


def silence_absent_units(sending: bool, packet: bytes) -> bytes:
    """Drop replies to unit ids that have no device, as a silent slave on a real bus would.

    Unit 9 instead gets the exception 11 a TCP gateway returns when the serial
    device behind it does not respond.
    """
    if not sending or len(packet) < 8 or packet[6] in PRESENT_UNITS:
        return packet
    if packet[6] == GATEWAY_MISS_UNIT:
        return packet[:4] + bytes([0, 3, GATEWAY_MISS_UNIT, packet[7] | 0x80, 11])
    return b""


@pytest.fixture
async def server_url() -> AsyncIterator[str]:
    """A pymodbus TCP server on 127.0.0.1 with units 1, 3 and 7; other ids stay silent."""
    port = free_port()
    server = ModbusTcpServer(
        [make_device(unit) for unit in PRESENT_UNITS],
        address=("127.0.0.1", port),
        trace_packet=silence_absent_units,
    )
    async with asyncio.timeout(10):
        await server.serve_forever(background=True)
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        await server.shutdown()


async def run_cli(*args: str) -> int:
    """Run `rig-agent ARGS` in this process, off the event loop that serves the device."""
    async with asyncio.timeout(30):
        return await asyncio.to_thread(main, list(args))


def decoded_row(output: str, type_name: str, address: int) -> dict[str, str]:
    """Return the cells of one row of a decoded block, keyed by layout name (ABCD ...)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [type_name])
    layouts = lines[start].split()[1:]
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells:
            break
        if cells[0] == str(address):
            return dict(zip(layouts, cells[1:], strict=True))
    raise AssertionError(f"no {type_name} row for address {address} in:\n{output}")


def raw_row(output: str, address: int) -> list[str]:
    """Return the cells of the raw register table row of one address."""
    for line in output.splitlines():
        cells = line.split()
        if len(cells) >= 5 and cells[0] == str(address) and cells[3].startswith("0x"):
            return cells
    raise AssertionError(f"no raw row for address {address} in:\n{output}")


# modbus read


async def test_read_float32_cdab(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A float32 stored as CDAB shows its value in the CDAB column and not in ABCD."""
    code = await run_cli("modbus", "read", server_url, "--unit", "1", "--address", "100")
    out = capsys.readouterr().out
    row = decoded_row(out, "float32", FLOAT_ADDRESS)
    assert code == 0
    assert row["CDAB"] == "1234.5"
    assert row["ABCD"] != "1234.5"
    assert row["BADC"] != "1234.5"
    assert row["DCBA"] != "1234.5"


async def test_read_int16_negative(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A negative int16 decodes as such in the big-endian byte layouts."""
    code = await run_cli(
        "modbus", "read", server_url, "--unit", "1", "--address", "100", "--count", "4"
    )
    row = decoded_row(capsys.readouterr().out, "int16", INT16_ADDRESS)
    assert code == 0
    assert row["ABCD"] == "-2"
    assert row["CDAB"] == "-2"
    assert row["BADC"] == "-257"


async def test_read_raw_table(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The raw table shows address, Modicon reference, decimal, hex, binary and ASCII."""
    code = await run_cli(
        "modbus", "read", server_url, "--unit", "1", "--address", "100", "--count", "5"
    )
    out = capsys.readouterr().out
    assert code == 0
    assert raw_row(out, 100) == ["100", "40101", "20480", "0x5000", "01010000", "00000000", "P."]
    assert raw_row(out, 103)[-1] == "AB"


async def test_read_long_types_need_count(
    server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With two registers read, the 64-bit types are named as needing a larger count."""
    await run_cli("modbus", "read", server_url, "--unit", "1", "--address", "100")
    out = capsys.readouterr().out
    assert "float64 needs 4" in out
    assert not any(line.startswith("float64 ") for line in out.splitlines())


async def test_read_modicon_address(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Address 40101 in Modicon notation reads holding register 100."""
    code = await run_cli("modbus", "read", server_url, "--unit", "1", "--address", "40101")
    captured = capsys.readouterr()
    assert code == 0
    assert decoded_row(captured.out, "float32", FLOAT_ADDRESS)["CDAB"] == "1234.5"
    assert "Modicon 4xxxx" in captured.err


async def test_read_address_base_one(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """With --address-base 1, address 101 reads register 100."""
    code = await run_cli(
        "modbus", "read", server_url, "--unit", "1", "--address", "101", "--address-base", "1"
    )
    assert code == 0
    assert decoded_row(capsys.readouterr().out, "float32", FLOAT_ADDRESS)["CDAB"] == "1234.5"


async def test_read_coils(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A coil read prints the bits in rows of eight."""
    code = await run_cli(
        "modbus", "read", server_url, "--unit", "1", "--table", "coil", "--address", "0",
        "--count", "4",
    )  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert ["0", "1", "1", "0", "1"] in rows


async def test_read_exception_exit_2(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An exception response exits 2 and names the code, its name and a hint."""
    code = await run_cli("modbus", "read", server_url, "--unit", "1", "--address", "500")
    err = capsys.readouterr().err
    assert code == 2
    assert "exception 2 ILLEGAL_DATA_ADDRESS" in err
    assert "--address-base 1" in err


async def test_read_silent_unit_exit_2(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A unit id that never responds exits 2 after the timeout and points at scan."""
    code = await run_cli(
        "modbus", "read", server_url, "--unit", "2", "--address", "100", "--timeout", "200ms"
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "no response from unit 2" in err
    assert "modbus scan" in err


async def test_read_refused_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A port nothing listens on exits 2 with the reason and what to check."""
    url = f"tcp://127.0.0.1:{free_port()}"
    code = await run_cli("modbus", "read", url, "--unit", "1", "--address", "0")
    err = capsys.readouterr().err
    assert code == 2
    assert f"could not connect to {url}" in err
    assert "refused" in err.lower()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--address", "abc"], "invalid address 'abc'"),
        (["--address", "0x64"], "0x64 in hexadecimal is 100"),
        (["--address", "4x0101", "--table", "input"], "write the input address as 3x101"),
        (["--address", "0", "--address-base", "1"], "expected 1 to 65536"),
        (["--address", "0", "--count", "126"], "1 to 125"),
        (["--address", "65535", "--count", "2"], "read at most 1"),
        (["--address", "0", "--timeout", "5"], "invalid --timeout"),
        (["--address", "0", "--types", "float16"], "expected names from int16"),
        (["--address", "0", "--unit", "0"], "broadcast"),
    ],
    ids=["word", "hex", "table-conflict", "base-one", "count", "past-end", "timeout", "types",
         "unit-zero"],
)  # fmt: skip
def test_read_bad_argument_exit_1(
    args: Sequence[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid value exits 1 with a message that names the fix, before any connection."""
    argv = ["modbus", "read", "tcp://127.0.0.1:1", "--unit", "1", *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert fragment in err


def test_read_bad_url_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid URL exits 1 and lists the accepted forms."""
    code = main(["modbus", "read", "http://127.0.0.1:1", "--unit", "1", "--address", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "rtu:///dev/ttyUSB0" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["modbus", "read", "tcp://127.0.0.1:1", "--address", "0"], "--unit"),
        (["modbus", "read", "tcp://127.0.0.1:1", "--unit", "x", "--address", "0"], "'x'"),
        (["modbus", "scan", "tcp://127.0.0.1:1", "--bogus"], "--bogus"),
        (["modbus", "bogus"], "'bogus'"),
        (["modbus"], "read or scan"),
    ],
    ids=["missing-unit", "unit-not-number", "unknown-option", "unknown-action", "no-action"],
)
def test_modbus_usage_error_exit_1(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A usage error under `modbus` exits 1, so that exit code 2 always means a device failure."""
    try:
        code = main(argv)
    except SystemExit as exited:
        code = exited.code
    assert code == 1
    assert fragment in capsys.readouterr().err


async def test_read_subprocess(server_url: str) -> None:
    """`python -m agent.cli modbus read` as a technician runs it shows the CDAB value."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "modbus", "read", server_url,
        "--unit", "1", "--address", "100",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert decoded_row(out.decode(), "float32", FLOAT_ADDRESS)["CDAB"] == "1234.5"


# modbus scan


async def test_scan_lists_units(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A scan of ids 1 to 12 lists exactly 1, 3 and 7, including the one that returns an exception.

    The five silent ids at the end also check that the scan keeps going past the
    point where pymodbus would drop a connection that gets no responses.
    """
    code = await run_cli(
        "modbus", "scan", server_url, "--units", "1-12", "--address", "100", "--timeout", "100ms"
    )
    lines = capsys.readouterr().out.splitlines()
    listed = [int(line.split()[1].rstrip(":")) for line in lines if line.startswith("unit ")]
    summary = next(line for line in lines if " unit ids responded" in line)
    assert code == 0
    assert listed == list(PRESENT_UNITS)
    assert summary.startswith("3 of 12 unit ids responded")
    assert summary.endswith(": 1, 3, 7")
    assert "exception 2 ILLEGAL_DATA_ADDRESS" in lines[1]


async def test_scan_skips_gateway_miss(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An id for which a gateway returns exception 11 is not listed, but counted."""
    code = await run_cli("modbus", "scan", server_url, "--units", "7,9", "--timeout", "100ms")
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith("unit   7:")
    assert lines[1].startswith("1 of 2 unit ids responded")
    assert lines[2].startswith("1 more id got exception 10 or 11")


async def test_scan_none_exit_2(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A scan where no id responds exits 2 and prints why."""
    code = await run_cli("modbus", "scan", server_url, "--units", "2,4", "--timeout", "100ms")
    captured = capsys.readouterr()
    assert code == 2
    assert "0 of 2 unit ids responded" in captured.out
    assert "no unit id responded" in captured.err


def test_scan_bad_units_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid unit list exits 1 before any connection."""
    code = main(["modbus", "scan", "tcp://127.0.0.1:1", "--units", "5-2"])
    assert code == 1
    assert "write the lower id first" in capsys.readouterr().err


# argument parsing and formatting


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", [1]),
        ("1-3", [1, 2, 3]),
        ("1-3,7", [1, 2, 3, 7]),
        ("1-10,15,20-22", [*range(1, 11), 15, 20, 21, 22]),
        (" 5 , 2-3 ", [2, 3, 5]),
        ("3,1-4", [1, 2, 3, 4]),
        ("247", [247]),
    ],
)
def test_unit_ids_parse(text: str, expected: list[int]) -> None:
    """Unit id lists become sorted, distinct ids."""
    assert parse_unit_ids(text, 247) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "is not a number or a range"),
        ("1-", "is not a number or a range"),
        ("a-3", "is not a number or a range"),
        ("1,,2", "is not a number or a range"),
        ("-3", "is not a number or a range"),
        ("1-3-5", "is not a number or a range"),
        ("9-2", "write the lower id first"),
        ("0-4", "run from 1 to 247"),
        ("248", "run from 1 to 247"),
    ],
)
def test_unit_ids_reject(text: str, fragment: str) -> None:
    """Invalid unit id lists raise UsageError naming the problem."""
    with pytest.raises(UsageError, match=fragment):
        parse_unit_ids(text, 247)


@pytest.mark.parametrize(
    ("text", "table", "base", "expected"),
    [
        ("100", None, None, ("holding", 100)),
        ("100", "input", None, ("input", 100)),
        ("101", None, 1, ("holding", 100)),
        ("40101", None, None, ("holding", 100)),
        ("30001", None, None, ("input", 0)),
        ("400101", None, None, ("holding", 100)),
        ("40101", "holding", None, ("holding", 40101)),
        ("40101", None, 0, ("holding", 40101)),
        ("4x0101", None, None, ("holding", 100)),
        ("00101", None, None, ("coil", 100)),
        ("1x0005", "discrete", None, ("discrete", 4)),
        ("65535", None, None, ("holding", 65535)),
    ],
)
def test_address_parse(
    text: str, table: str | None, base: int | None, expected: tuple[str, int]
) -> None:
    """Plain, 1-based and Modicon addresses resolve to table and 0-based address."""
    target = parse_address(text, table, base)
    assert (target.table, target.address) == expected


@pytest.mark.parametrize(
    ("value", "single", "expected"),
    [
        (1234.5, True, "1234.5"),
        (-0.1, True, "-0.1"),
        (0.0, True, "0"),
        (math.nan, True, "nan"),
        (math.inf, True, "inf"),
        (-math.inf, False, "-inf"),
        (3.4028234663852886e38, True, "3.4028235e+38"),
        (1.401298464324817e-45, True, "1e-45"),
        (98765.4321, False, "98765.4321"),
        (2.5e-7, False, "2.5e-07"),
        (1e9, False, "1e+09"),
    ],
)
def test_float_format(value: float, single: bool, expected: str) -> None:
    """Floats show their shortest digits; NaN, infinity and extreme sizes stand out."""
    assert format_float(value, single) == expected
