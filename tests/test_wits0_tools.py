"""`rig-agent wits0 listen` against the simulated EDR and a recorded Pason capture."""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.wits0_tools import describe_open_error, format_raw
from drivers.wits0 import Wits0LinkError
from drivers.wits0_link import parse_wits0_url
from drivers.wits0_simulator import Wits0Simulator

SAMPLES = Path(__file__).parents[2] / "shared" / "samples" / "wits0"
PASON_CAPTURE = SAMPLES / "pason_edr_capture_from_flogo_test.wits"
ITEM_LINE = re.compile(r"^  0108  DBTM .* (\d+\.\d\d)  m or ft$", re.MULTILINE)


def rig_agent(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class SimulatorThread:
    """A Wits0Simulator running in its own event loop and thread.

    `rig-agent wits0 listen` runs its own event loop, so the simulator
    cannot share the test's loop when the command runs in-process.
    """

    def __init__(self, **options: Any) -> None:
        self.simulator = Wits0Simulator(**options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Wits0Simulator:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.simulator.start(), self.loop).result(timeout=5)
        return self.simulator

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.simulator.stop(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def edr() -> Iterator[Wits0Simulator]:
    """A simulated EDR on a free loopback port that streams a packet every 200 ms."""
    with SimulatorThread(interval=0.2, seed=5) as simulator:
        yield simulator


@pytest.fixture
def handshake_edr() -> Iterator[Wits0Simulator]:
    """A simulated EDR that sends only to a client that has sent it a valid packet."""
    with SimulatorThread(interval=0.2, seed=5, require_handshake=True) as simulator:
        yield simulator


def wait_disconnected(simulator: Wits0Simulator) -> None:
    """Wait until the simulator has seen every client leave.

    The simulator logs each disconnect from its own thread; waiting keeps
    that line inside the test, where pytest captures it.
    """
    deadline = time.monotonic() + 5.0
    while simulator.clients and time.monotonic() < deadline:
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect_when_listening(port: int, timeout: float = 10.0) -> socket.socket:
    """Connect to 127.0.0.1:port, retrying until the listener is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1.0)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_listen_prints_items(edr: Wits0Simulator) -> None:
    """Run as a command, `listen` prints each item with its mnemonic and value, then exits 0."""
    result = rig_agent("wits0", "listen", edr.url, "--duration", "3")
    wait_disconnected(edr)
    assert result.returncode == 0, result.stderr
    assert "from SIMULATOR/EDR" in result.stdout
    assert ITEM_LINE.search(result.stdout) is not None, result.stdout
    assert re.search(r"Listened .*: \d+ packets", result.stdout) is not None


def test_listen_in_process(capsys: pytest.CaptureFixture[str], edr: Wits0Simulator) -> None:
    """Called through `agent.cli.main`, `listen` prints items and marks the sentinel of 0125."""
    code = main(["wits0", "listen", edr.url, "--duration", "1.5"])
    wait_disconnected(edr)
    out = capsys.readouterr().out
    assert code == 0
    assert ITEM_LINE.search(out) is not None, out
    assert re.search(r"^  0125  SPM3 .* -9999\.00  null \(no data\)$", out, re.MULTILINE)
    assert "Null values by code: 0125 x" in out


def test_listen_raw(capsys: pytest.CaptureFixture[str], edr: Wits0Simulator) -> None:
    """With `--raw`, the bytes are shown with their line ends escaped instead of decoded."""
    code = main(["wits0", "listen", edr.url, "--raw", "--duration", "1"])
    wait_disconnected(edr)
    out = capsys.readouterr().out
    assert code == 0
    assert "<< &&\\r\\n" in out
    assert "<< 1984SIMULATOR/EDR\\r\\n" in out
    assert "DBTM" not in out


def test_listen_accepts_device(tmp_path: Path) -> None:
    """With tcp-listen, a device that connects and sends the Pason capture is decoded."""
    port = free_port()
    command = [sys.executable, "-m", "agent.cli", "wits0", "listen"]
    command += [f"tcp-listen://127.0.0.1:{port}", "--duration", "3"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        with connect_when_listening(port) as device:
            device.sendall(b"noise\r\n" + PASON_CAPTURE.read_bytes())
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "packet 1 from PASON/EDR: 30 items, 5 junk bytes before it" in out
    assert re.search(r"^  0108  DBTM .* 5871\.95  m or ft$", out, re.MULTILINE)
    assert re.search(r"^  0125  SPM3 .* -9999\.00  null \(no data\)$", out, re.MULTILINE)
    assert re.search(r"^  0139  DRTM .* -8888\.00  null \(no data\)$", out, re.MULTILINE)
    assert re.search(r"^  0169  -  .*not a standard record 01 item.* 5896\.69$", out, re.MULTILINE)


def test_listen_refused() -> None:
    """A TCP port where nothing listens exits 2 with the reason and the tcp-listen hint."""
    port = free_port()
    result = rig_agent("wits0", "listen", f"tcp://127.0.0.1:{port}", "--duration", "5")
    assert result.returncode == 2
    assert "Connection refused" in result.stderr
    assert f"tcp-listen://0.0.0.0:{port}" in result.stderr


def test_listen_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    """A tcp-listen port that another socket listens on exits 2 and names the cause."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["wits0", "listen", f"tcp-listen://127.0.0.1:{port}", "--duration", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Another program" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["udp://127.0.0.1:5000"], "invalid WITS0 URL"),
        (["tcp://127.0.0.1"], "invalid port"),
        (["tcp://127.0.0.1:5000", "--timezone", "Mars/Olympus"], "--timezone"),
        (["tcp://127.0.0.1:5000", "--duration", "0"], "--duration"),
        (["tcp://127.0.0.1:5000", "--transmit", "12"], "--transmit"),
        (["tcp://127.0.0.1:5000", "--transmit-interval", "30"], "--transmit-interval"),
    ],
    ids=["scheme", "port", "timezone", "duration", "packet", "interval"],
)
def test_listen_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid arguments exit 1 with a message naming the argument, before opening anything."""
    code = main(["wits0", "listen", *args])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err


def test_listen_bad_url_command() -> None:
    """Run as a command, an invalid URL exits 1."""
    result = rig_agent("wits0", "listen", "tcp:/nowhere")
    assert result.returncode == 1
    assert "rig-agent wits0 listen:" in result.stderr


def test_listen_without_handshake(
    capsys: pytest.CaptureFixture[str], handshake_edr: Wits0Simulator
) -> None:
    """An EDR that waits for a handshake sends nothing, and the summary suggests --transmit."""
    code = main(["wits0", "listen", handshake_edr.url, "--duration", "1"])
    wait_disconnected(handshake_edr)
    out = capsys.readouterr().out
    assert code == 0
    assert "0 packets" in out
    assert "try --transmit" in out


def test_listen_transmit(capsys: pytest.CaptureFixture[str], handshake_edr: Wits0Simulator) -> None:
    """With `--transmit`, the keep-alive packet goes out and the EDR's packets arrive."""
    args = ["wits0", "listen", handshake_edr.url, "--transmit", "--transmit-interval", "500ms"]
    code = main([*args, "--duration", "1.5"])
    wait_disconnected(handshake_edr)
    out = capsys.readouterr().out
    assert code == 0
    assert "sent packet 0111-9999" in out
    assert ITEM_LINE.search(out) is not None, out
    assert handshake_edr.handshakes_received >= 1


def test_listen_device_time(capsys: pytest.CaptureFixture[str]) -> None:
    """With `--timezone`, the header converts the device's date and time items to UTC."""
    with SimulatorThread(interval=0.2, device_time=True, timezone="America/Chicago") as sim:
        code = main(
            ["wits0", "listen", sim.url, "--timezone", "America/Chicago", "--duration", "1"]
        )
    out = capsys.readouterr().out
    offsets = [float(s) for s in re.findall(r"\(([-+]\d+\.\d) s from receive time\)", out)]
    assert code == 0
    assert offsets, out
    assert all(abs(offset) < 3.0 for offset in offsets)


def test_raw_hex_for_garbage() -> None:
    """A chunk that is mostly not text, as at a wrong baud rate, is shown in hex."""
    assert format_raw(b"\x00\xff\x81\x02&", "<<") == ["<< hex 00 ff 81 02 26"]


def test_raw_escapes_text() -> None:
    """Text keeps its line ends visible as escapes, one output line per line."""
    assert format_raw(b"&&\r\n0108\t1.5\r\n\xfe", "<<") == [
        "<< &&\\r\\n",
        "<< 0108\\t1.5\\r\\n",
        "<< \\xfe",
    ]


def test_serial_permission_hint() -> None:
    """A serial port that the user may not open gets the dialout group hint."""
    link = parse_wits0_url("serial:///dev/ttyUSB0")
    error = Wits0LinkError("cannot open serial port /dev/ttyUSB0", link=link.describe())
    error.__cause__ = PermissionError(errno.EACCES, "Permission denied")
    message = describe_open_error(link, error)
    assert "dialout" in message
    assert "/dev/ttyUSB0" in message
