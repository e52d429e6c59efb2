"""Shared Modbus buses: one client, one lock and one frame pause per serial port or TCP address."""

from __future__ import annotations

import asyncio
import termios
import time
from pathlib import Path
from types import TracebackType

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadInputRegistersRequest
from structlog.typing import FilteringBoundLogger

from config.units import format_duration
from drivers.modbus_transport import Endpoint, ModbusClient, make_client
from drivers.retry import Backoff, Outage, cancelling, raise_if_cancelled

__all__ = [
    "BIT_TABLES",
    "MAX_SILENT_REQUESTS",
    "RECONNECT_DELAY_MAX",
    "RECONNECT_DELAY_MIN",
    "BusRegistry",
    "DeviceException",
    "DeviceTimeout",
    "InvalidResponse",
    "LinkDown",
    "ModbusBus",
    "ModbusError",
]

log = structlog.get_logger(__name__)

RECONNECT_DELAY_MIN = 0.5
RECONNECT_DELAY_MAX = 30.0
"""Bounds in seconds of the jittered, doubling wait between failed connects or port opens."""

LIBRARY_TIMEOUT_MARGIN = 1.0
"""Seconds by which the pymodbus client's own timeout exceeds the longest device timeout.

The bus applies each device's timeout itself, so the library's timeout only
catches a wait that the bus's deadline somehow missed.
"""

MAX_SILENT_REQUESTS = 3
"""Timeouts in a row, with no response from any unit, after which a TCP connection is reopened.

A TCP connection whose peer rebooted or dropped off the network can stay open
on our side while nothing responds, and reopening it is the only way to notice.
"""

READ_REQUESTS: dict[str, type[ModbusPDU]] = {
    "coil": ReadCoilsRequest,
    "discrete": ReadDiscreteInputsRequest,
    "holding": ReadHoldingRegistersRequest,
    "input": ReadInputRegistersRequest,
}
"""Request PDU class for a read of each Modbus table (function codes 1, 2, 3 and 4)."""

BIT_TABLES = frozenset({"coil", "discrete"})
"""Tables whose reads return single bits rather than 16-bit registers."""

_TABLE_BY_FUNCTION_CODE = {cls.function_code: table for table, cls in READ_REQUESTS.items()}

_EXCEPTION_HINTS: dict[int, str] = {
    ExcCodes.ILLEGAL_FUNCTION: "the device does not support reading this table",
    ExcCodes.ILLEGAL_ADDRESS: (
        "the device does not map this range: check address, address_base and table "
        "against its register map"
    ),
    ExcCodes.GATEWAY_PATH_UNAVIABLE: "the gateway has no route to this unit id",
    ExcCodes.GATEWAY_NO_RESPONSE: "the gateway got no response from this unit id",
}


class ModbusError(Exception):
    """A Modbus request that produced no usable response.

    `bus` is the bus key (such as "rtu:///dev/ttyUSB0") and `unit_id` the
    device addressed.
    """

    def __init__(self, message: str, *, bus: str, unit_id: int) -> None:
        super().__init__(message)
        self.bus = bus
        self.unit_id = unit_id


class LinkDown(ModbusError):
    """Raised when the serial port or TCP connection is not open.

    The open failed, the bus is waiting out its reconnect backoff, or the
    port vanished (USB adapter unplugged, connection closed) during the
    request. The bus reopens it by itself on a later request.
    """


class DeviceTimeout(ModbusError):
    """Raised when the device sent no response within the timeout."""


class DeviceException(ModbusError):
    """Raised when the device responded with a Modbus exception response.

    `code` is the exception code, such as 2 for an illegal data address.
    """

    def __init__(self, message: str, *, bus: str, unit_id: int, code: int) -> None:
        super().__init__(message, bus=bus, unit_id=unit_id)
        self.code = code


class InvalidResponse(ModbusError):
    """Raised when a response does not fit its request (wrong unit id, transaction or length)."""


class ModbusBus:
    """One serial port or TCP address, shared by every device (unit id) reached through it.

    The bus owns one lock and one pymodbus client at a time. A request holds
    the lock from sending until its response or timeout, so frames of
    different devices never overlap, and each response or timeout is followed
    by `frame_pause` seconds of silence. The port is opened on the first
    request. After it vanishes, a new client reopens the same path (or
    address) with jittered backoff.

    Drivers enter the bus with `async with bus:` while they run; the client
    is closed when the last of them leaves.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        reconnect_delay_min: float = RECONNECT_DELAY_MIN,
        reconnect_delay_max: float = RECONNECT_DELAY_MAX,
    ) -> None:
        self.endpoint = endpoint
        self.key = endpoint.bus_key
        self.timeout = 0.0
        """Maximum timeout in seconds of the devices on the bus, used for connects."""
        self.frame_pause = 0.0
        """Seconds of silence after each frame: the maximum frame_pause of the bus's devices."""
        self.unit_ids: set[int] = set()
        self._lock = asyncio.Lock()
        self._client: ModbusClient | None = None
        self._backoff = Backoff(reconnect_delay_min, reconnect_delay_max)
        self._next_connect_at = 0.0
        self._link = Outage()
        self._open_error = ""
        self._reopening = False
        self._quiet_until = 0.0
        self._silent_requests = 0
        self._users = 0
        self._log: FilteringBoundLogger = log.bind(bus=endpoint.describe())

    def add_device(self, unit_id: int, *, timeout: float, frame_pause: float) -> None:
        """Register a device on the bus, widening the bus timeout and frame pause to fit it."""
        self.unit_ids.add(unit_id)
        self.timeout = max(self.timeout, timeout)
        self.frame_pause = max(self.frame_pause, frame_pause)

    @property
    def connected(self) -> bool:
        """Whether the port or connection is open right now."""
        return self._client is not None and self._client.connected

    async def __aenter__(self) -> ModbusBus:
        self._users += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            self.close()

    def close(self) -> None:
        """Close the port or connection; the next request opens it again."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(
        self, unit_id: int, table: str, address: int, count: int, response_timeout: float
    ) -> list[int] | list[bool]:
        """Read `count` registers or bits of one table from a device.

        Returns exactly `count` values: ints for holding and input registers,
        bools for coils and discrete inputs. Raises a ModbusError subclass when
        the device gives no usable response.
        """
        request = READ_REQUESTS[table](address=address, count=count)
        response = await self.execute(unit_id, request, response_timeout)
        # Bit responses are padded to whole bytes, so they are cut to the requested count.
        values: list[int] | list[bool] = (
            list(response.bits[:count]) if table in BIT_TABLES else list(response.registers)
        )
        if len(values) != count:
            msg = (
                f"unit {unit_id} on {self.key}: {_describe_request(request)} returned "
                f"{len(values)} values, expected {count}"
            )
            raise InvalidResponse(msg, bus=self.key, unit_id=unit_id)
        return values

    async def execute(self, unit_id: int, request: ModbusPDU, response_timeout: float) -> ModbusPDU:
        """Send one request to a device and return its response.

        Holds the bus lock for exactly this request and its response, waits
        out the frame pause first, and gives up after `response_timeout` seconds
        (pymodbus does not retry). Raises LinkDown, DeviceTimeout,
        DeviceException or InvalidResponse.
        """
        request.dev_id = unit_id
        async with self._lock:
            client = await self._open(unit_id, request)
            await self._wait_for_quiet_line()
            try:
                response = await self._exchange(client, request, response_timeout)
            finally:
                self._quiet_until = time.monotonic() + self.frame_pause
        if response.isError():
            raise self._exception_response(unit_id, request, response.exception_code)
        return response

    async def _exchange(
        self, client: ModbusClient, request: ModbusPDU, response_timeout: float
    ) -> ModbusPDU:
        """Send the request and await its response; map library failures to ModbusError."""
        unit_id = request.dev_id
        prefix = f"unit {unit_id} on {self.key}: {_describe_request(request)}"
        error: ModbusError
        try:
            async with asyncio.timeout(response_timeout):
                response: ModbusPDU = await client.execute(False, request)
        except TimeoutError:
            error = self._timed_out(client, prefix, unit_id, response_timeout)
        except ConnectionException as exc:
            self._drop_client(str(exc))
            error = LinkDown(f"{prefix} failed: {exc}", bus=self.key, unit_id=unit_id)
        except ModbusIOException as exc:
            error = InvalidResponse(f"{prefix} failed: {exc}", bus=self.key, unit_id=unit_id)
        except OSError as exc:
            self._drop_client(str(exc))
            error = LinkDown(f"{prefix} failed: {exc}", bus=self.key, unit_id=unit_id)
        else:
            raise_if_cancelled()
            self._silent_requests = 0
            return response
        raise_if_cancelled()
        raise error

    def _timed_out(
        self, client: ModbusClient, prefix: str, unit_id: int, timeout: float
    ) -> ModbusError:
        if not client.connected:
            self._drop_client("closed while waiting for a response")
            msg = f"{prefix} failed: the port closed while waiting for the response"
            return LinkDown(msg, bus=self.key, unit_id=unit_id)
        self._silent_requests += 1
        if not self.endpoint.is_serial and self._silent_requests >= MAX_SILENT_REQUESTS:
            # Not logged as a lost link: a dead device behind a live connection would
            # otherwise log a warning every few probes.
            self._log.debug("modbus_connection_reopening", silent_requests=self._silent_requests)
            self.close()
            self._silent_requests = 0
            self._reopening = True
        msg = f"{prefix} timed out after {format_duration(timeout)}"
        return DeviceTimeout(msg, bus=self.key, unit_id=unit_id)

    def _exception_response(self, unit_id: int, request: ModbusPDU, code: int) -> DeviceException:
        try:
            name = ExcCodes(code).name
        except ValueError:
            name = "unknown"
        hint = _EXCEPTION_HINTS.get(code, "")
        msg = (
            f"unit {unit_id} on {self.key}: {_describe_request(request)} was rejected with "
            f"Modbus exception code {code} ({name})" + (f": {hint}" if hint else "")
        )
        return DeviceException(msg, bus=self.key, unit_id=unit_id, code=code)

    async def _open(self, unit_id: int, request: ModbusPDU) -> ModbusClient:
        """Return the open client, opening the port or connection if the backoff allows."""
        if self._client is not None:
            if self._client.connected:
                return self._client
            self._drop_client("closed by the peer or the operating system")

        now = time.monotonic()
        prefix = f"unit {unit_id} on {self.key}: {_describe_request(request)} failed"
        if now < self._next_connect_at:
            retry_in = format_duration(max(0.001, self._next_connect_at - now))
            msg = f"{prefix}: {self._open_error}; next attempt in {retry_in}"
            raise LinkDown(msg, bus=self.key, unit_id=unit_id)

        client = make_client(self.endpoint, self.timeout + LIBRARY_TIMEOUT_MARGIN, name=self.key)
        error = await self._connect(client)
        if error:
            self._open_error = error
            retry_in_s = self._backoff.next_delay()
            self._next_connect_at = now + retry_in_s
            self._link.fail(
                self._log, "modbus_connect_failed", error=error, retry_in_s=round(retry_in_s, 3)
            )
            msg = f"{prefix}: {error}"
            raise LinkDown(msg, bus=self.key, unit_id=unit_id)

        self._client = client
        self._backoff.reset()
        self._silent_requests = 0
        if not self._link.recover(self._log, "modbus_reconnected"):
            log_connected = self._log.debug if self._reopening else self._log.info
            log_connected("modbus_connected")
        self._reopening = False
        return client

    async def _connect(self, client: ModbusClient) -> str:
        """Open the client's port or connection; return "" or why it failed, having closed it."""
        deadline = max(self.timeout, 0.1)
        error = ""
        try:
            async with asyncio.timeout(deadline):
                connected = await client.connect()
        except TimeoutError:
            connected, error = False, f"open timed out after {format_duration(deadline)}"
        except OSError as exc:
            connected, error = False, str(exc)
        except termios.error as exc:
            # pyserial raises this after opening the port, when the port rejects a setting
            # (a pty rejects parity). The traceback's frames keep that open port and its
            # exclusive lock alive in a reference cycle until the garbage collector runs.
            # Dropping the traceback closes the port now, so the next open can lock it.
            exc.__traceback__ = None
            connected = False
            error = (
                f"serial port {self.endpoint.path} rejected the settings "
                f"{self.endpoint.describe()}: {exc}"
            )
        except asyncio.CancelledError:
            client.close()
            raise
        if not connected or cancelling():
            client.close()
        raise_if_cancelled()
        if connected:
            return ""
        return error or self._open_failure()

    def _open_failure(self) -> str:
        """Describe a failed open that pymodbus reported only as False."""
        if self.endpoint.is_serial:
            if not Path(self.endpoint.path).exists():
                return f"serial port {self.endpoint.path} not found (unplugged, or a wrong path?)"
            return f"could not open serial port {self.endpoint.path}"
        return f"could not connect to {self.endpoint.host}:{self.endpoint.port}"

    def _drop_client(self, reason: str) -> None:
        """Close a lost client; the next request reopens the same path or address."""
        self.close()
        self._silent_requests = 0
        self._link.fail(self._log, "modbus_connection_lost", reason=reason)

    async def _wait_for_quiet_line(self) -> None:
        delay = self._quiet_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class BusRegistry:
    """Hands out one ModbusBus per bus key, so devices on one port or address share it."""

    def __init__(
        self,
        *,
        reconnect_delay_min: float = RECONNECT_DELAY_MIN,
        reconnect_delay_max: float = RECONNECT_DELAY_MAX,
    ) -> None:
        self._buses: dict[str, ModbusBus] = {}
        self._reconnect_delays = (reconnect_delay_min, reconnect_delay_max)

    def bus_for(self, endpoint: Endpoint) -> ModbusBus:
        """Return the bus for the endpoint, created from the first endpoint with its key.

        Raises ValueError when a serial port is given with settings (baud rate,
        parity, stop bits, byte size) that differ from an earlier use of it.
        """
        bus = self._buses.get(endpoint.bus_key)
        if bus is None:
            minimum, maximum = self._reconnect_delays
            bus = ModbusBus(endpoint, reconnect_delay_min=minimum, reconnect_delay_max=maximum)
            self._buses[endpoint.bus_key] = bus
        elif bus.endpoint != endpoint:
            msg = (
                f"serial port {endpoint.path} is configured twice with different settings: "
                f"{bus.endpoint.describe()} and {endpoint.describe()}: "
                "give every source on one port the same baudrate, parity, stopbits and bytesize"
            )
            raise ValueError(msg)
        return bus

    @property
    def buses(self) -> list[ModbusBus]:
        """Every bus handed out so far."""
        return list(self._buses.values())


def _describe_request(request: ModbusPDU) -> str:
    """Return the request as messages show it, such as "read of holding 100..109"."""
    table = _TABLE_BY_FUNCTION_CODE.get(request.function_code)
    if table is None:
        return f"request with function code {request.function_code}"
    return f"read of {table} {request.address}..{request.address + request.count - 1}"
