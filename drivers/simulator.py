"""Rig simulator: an in-process Modbus TCP server holding time-varying drilling signals.

The register map is fixed and published as `SIM_POINTS`, so a demo or a test
can build the matching `[[sources.modbus.points]]` config from it. Values
come from a small model of a rig drilling stands down and making
connections, run faster than real time: with the default time scale of 60,
one stand (about an hour of drilling and five minutes of connection) passes
in a little over a minute.

| channel | table | address | type | layout | scale | unit |
| --- | --- | --- | --- | --- | --- | --- |
| hookload | holding | 0 | float32 | ABCD | 1 | klbf |
| weight_on_bit | holding | 2 | float32 | CDAB | 1 | klbf |
| standpipe_pressure | holding | 4 | float32 | BADC | 1 | psi |
| rotary_torque | holding | 6 | float32 | DCBA | 1 | kft.lbf |
| pump1_spm | holding | 8 | uint16 | AB | 0.1 | spm |
| pump2_spm | holding | 9 | uint16 | AB | 0.1 | spm |
| block_position | holding | 10 | int16 | AB | 0.01 | m |
| rotary_speed | holding | 11 | int16 | AB | 0.1 | rpm |
| pump_strokes_total | holding | 12 | uint32 | CDAB | 1 | strokes |
| bit_depth | holding | 14 | float64 | ABCD | 1 | m |
| rop | input | 0 | float32 | CDAB | 1 | m/h |
| hole_depth | input | 2 | float64 | DCBA | 1 | m |
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from config.model import ModbusPoint, ModbusSource
from drivers.modbus_decode import (
    decode_registers,
    encode_value,
    engineering_value,
    unscale,
)

__all__ = ["SIM_POINTS", "RigModel", "RigSimulator", "simulator_points"]

log = structlog.get_logger(__name__)


def _point(
    channel: str,
    table: str,
    address: int,
    type_name: str,
    layout: str = "ABCD",
    scale: float = 1.0,
    unit: str = "",
) -> ModbusPoint:
    word_order, byte_order = _LAYOUTS[layout]
    return ModbusPoint.model_validate(
        {
            "channel": channel,
            "table": table,
            "address": address,
            "type": type_name,
            "word_order": word_order,
            "byte_order": byte_order,
            "scale": scale,
            "unit": unit,
        }
    )


_LAYOUTS = {
    "ABCD": ("big", "big"),
    "CDAB": ("little", "big"),
    "BADC": ("big", "little"),
    "DCBA": ("little", "little"),
}

SIM_POINTS: tuple[ModbusPoint, ...] = (
    _point("hookload", "holding", 0, "float32", "ABCD", unit="klbf"),
    _point("weight_on_bit", "holding", 2, "float32", "CDAB", unit="klbf"),
    _point("standpipe_pressure", "holding", 4, "float32", "BADC", unit="psi"),
    _point("rotary_torque", "holding", 6, "float32", "DCBA", unit="kft.lbf"),
    _point("pump1_spm", "holding", 8, "uint16", scale=0.1, unit="spm"),
    _point("pump2_spm", "holding", 9, "uint16", scale=0.1, unit="spm"),
    _point("block_position", "holding", 10, "int16", scale=0.01, unit="m"),
    _point("rotary_speed", "holding", 11, "int16", scale=0.1, unit="rpm"),
    _point("pump_strokes_total", "holding", 12, "uint32", "CDAB", unit="strokes"),
    _point("bit_depth", "holding", 14, "float64", "ABCD", unit="m"),
    _point("rop", "input", 0, "float32", "CDAB", unit="m/h"),
    _point("hole_depth", "input", 2, "float64", "DCBA", unit="m"),
)
"""The simulator's register map, one config point per channel."""

_FUNCTION_CODES = {"holding": 3, "input": 4}


def simulator_points() -> list[dict[str, object]]:
    """Return the `[[sources.modbus.points]]` entries that match what the simulator serves."""
    return [point.model_dump() for point in SIM_POINTS]


# Rig constants for the model. They are round, plausible figures for a land
# rig with 5 in. drill pipe, chosen for a convincing demo, not measured.
STAND_TOP_M = 29.0
STAND_BOTTOM_M = 1.5
BLOCK_WEIGHT_KLBF = 40.0
STRING_WEIGHT_KLBF_PER_M = 0.055
STAND_WEIGHT_KLBF = (STAND_TOP_M - STAND_BOTTOM_M) * STRING_WEIGHT_KLBF_PER_M
SPP_PSI_PER_SPM_SQUARED = 0.075
"""Standpipe pressure grows with the square of flow: 3000 psi at 200 spm in total."""
DRILLING_SPM = 100.0
SLIPS_S = 120.0
HOIST_S = 120.0
MAKEUP_S = 90.0


class Phase(enum.Enum):
    """Activity of the simulated rig."""

    DRILLING = "drilling"
    SLIPS = "slips"
    HOIST = "hoist"
    MAKEUP = "makeup"


class RigModel:
    """Drilling signals of one rig, stepped in simulated seconds.

    The rig drills a stand down, sets slips, hoists the empty block, picks up
    the next stand and drills again. Bit depth and block position move at the
    reported rate of penetration.
    """

    def __init__(self, seed: int | None = None, start_depth_m: float = 2450.0) -> None:
        self._random = random.Random(seed)  # noqa: S311 - sensor noise, not security
        self.phase = Phase.DRILLING
        self.phase_s = 0.0
        self.elapsed_s = 0.0
        self.bit_depth = start_depth_m
        self.hole_depth = start_depth_m
        self.block_position = 20.0
        self.pump_strokes = 0.0
        self.values: dict[str, float] = {}
        self.step(0.0)

    def step(self, dt_s: float) -> dict[str, float]:
        """Advance the model by `dt_s` simulated seconds and return every channel's value."""
        self.elapsed_s += dt_s
        self.phase_s += dt_s
        pump_spm = self._pump_spm()
        self.pump_strokes += 2 * pump_spm * dt_s / 60.0

        if self.phase is Phase.DRILLING:
            values = self._drilling(dt_s)
        elif self.phase is Phase.HOIST:
            travel = (STAND_TOP_M - STAND_BOTTOM_M) * dt_s / HOIST_S
            self.block_position = min(STAND_TOP_M, self.block_position + travel)
            values = self._off_bottom(hookload=BLOCK_WEIGHT_KLBF, rpm=0.0)
        elif self.phase is Phase.MAKEUP:
            picked_up = self.phase_s > MAKEUP_S / 2
            string = self._string_weight() if picked_up else STAND_WEIGHT_KLBF
            rpm = 60.0 if picked_up else 0.0
            values = self._off_bottom(BLOCK_WEIGHT_KLBF + string, rpm=rpm)
        else:
            values = self._off_bottom(hookload=BLOCK_WEIGHT_KLBF, rpm=0.0)

        self._advance_phase()
        values.update(self._pumps(pump_spm))
        values["block_position"] = self.block_position
        values["bit_depth"] = self.bit_depth
        values["hole_depth"] = self.hole_depth
        values["pump_strokes_total"] = float(math.floor(self.pump_strokes))
        self.values = values
        return values

    def _drilling(self, dt_s: float) -> dict[str, float]:
        rop = max(2.0, 25.0 + 8.0 * math.sin(self.elapsed_s / 300.0) + self._noise(1.5))
        advance = rop * dt_s / 3600.0
        self.bit_depth += advance
        self.hole_depth = max(self.hole_depth, self.bit_depth)
        self.block_position = max(STAND_BOTTOM_M, self.block_position - advance)
        wob = max(0.0, 22.0 + 4.0 * math.sin(self.elapsed_s / 100.0) + self._noise(0.8))
        return {
            "rop": rop,
            "weight_on_bit": wob,
            "hookload": BLOCK_WEIGHT_KLBF + self._string_weight() - wob + self._noise(0.5),
            "rotary_speed": 120.0 + self._noise(2.0),
            "rotary_torque": max(0.0, 6.0 + 0.35 * wob + self._noise(0.5)),
        }

    def _off_bottom(self, hookload: float, rpm: float) -> dict[str, float]:
        turning = rpm > 0
        return {
            "rop": 0.0,
            "weight_on_bit": 0.0,
            "hookload": hookload + self._noise(0.3),
            "rotary_speed": max(0.0, rpm + self._noise(1.0)) if turning else 0.0,
            "rotary_torque": max(0.0, 3.0 + self._noise(0.3)) if turning else 0.0,
        }

    def _pump_spm(self) -> float:
        """Pump rate per pump: ramps down in slips, off while hoisting, ramps up in makeup."""
        if self.phase is Phase.DRILLING:
            return DRILLING_SPM
        if self.phase is Phase.SLIPS:
            return max(0.0, DRILLING_SPM * (1.0 - self.phase_s / 30.0))
        if self.phase is Phase.MAKEUP:
            return min(DRILLING_SPM, DRILLING_SPM * max(0.0, self.phase_s - 30.0) / 60.0)
        return 0.0

    def _pumps(self, spm: float) -> dict[str, float]:
        pump1 = max(0.0, spm + self._noise(0.5)) if spm > 0 else 0.0
        pump2 = max(0.0, spm + self._noise(0.5)) if spm > 0 else 0.0
        pressure = SPP_PSI_PER_SPM_SQUARED * (pump1 + pump2) ** 2
        return {
            "pump1_spm": pump1,
            "pump2_spm": pump2,
            "standpipe_pressure": max(0.0, pressure + self._noise(15.0)) if spm > 0 else 0.0,
        }

    def _advance_phase(self) -> None:
        done = {
            Phase.DRILLING: self.block_position <= STAND_BOTTOM_M,
            Phase.SLIPS: self.phase_s >= SLIPS_S,
            Phase.HOIST: self.block_position >= STAND_TOP_M,
            Phase.MAKEUP: self.phase_s >= MAKEUP_S,
        }[self.phase]
        if done:
            order = list(Phase)
            self.phase = order[(order.index(self.phase) + 1) % len(order)]
            self.phase_s = 0.0

    def _string_weight(self) -> float:
        return self.bit_depth * STRING_WEIGHT_KLBF_PER_M

    def _noise(self, sigma: float) -> float:
        return self._random.gauss(0.0, sigma)


@dataclass
class _Table:
    """The register image of one table, pushed to the server as one write."""

    function_code: int
    base: int
    words: list[int]


class RigSimulator:
    """An in-process Modbus TCP server that serves `RigModel` values at `SIM_POINTS`.

    Every `update_interval` seconds of real time the model advances by
    `update_interval * time_scale` simulated seconds and the registers are
    rewritten. Call `pause_updates()` to hold the registers still, for
    example before `set_values()` in a test.
    """

    def __init__(
        self,
        *,
        unit_id: int = 1,
        update_interval: float = 0.1,
        time_scale: float = 60.0,
        seed: int | None = None,
    ) -> None:
        self.unit_id = unit_id
        self.update_interval = update_interval
        self.time_scale = time_scale
        self.model = RigModel(seed=seed)
        self._tables = _build_tables(SIM_POINTS)
        self._points = {point.channel: point for point in SIM_POINTS}
        self._server: ModbusTcpServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._host = ""
        self._port = 0
        self._write_model_values(self.model.values)

    @property
    def port(self) -> int:
        """TCP port the server listens on (0 before `start`)."""
        return self._port

    @property
    def url(self) -> str:
        """The `tcp://host:port` URL of the running server, as a source's `url`."""
        return f"tcp://{self._host}:{self._port}"

    def modbus_source(
        self, name: str = "rig-sim", poll_interval: str = "1s", timeout: str = "500ms"
    ) -> ModbusSource:
        """Return a source config that polls every simulated channel."""
        return ModbusSource.model_validate(
            {
                "name": name,
                "url": self.url,
                "unit_id": self.unit_id,
                "poll_interval": poll_interval,
                "timeout": timeout,
                "points": simulator_points(),
            }
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start serving on `host:port`. With port 0 the kernel picks a free port (see `port`)."""
        if self._server is not None:
            msg = f"simulator already running on {self.url}: call stop() before start()"
            raise RuntimeError(msg)
        server = ModbusTcpServer(_build_device(self.unit_id, self._tables), address=(host, port))
        await server.serve_forever(background=True)
        self._server = server
        self._host = host
        self._port = _listening_port(server, port)
        await self._push_tables()
        self._task = asyncio.create_task(self._update_loop(), name="rig-simulator-update")
        log.info("simulator_started", url=self.url, unit_id=self.unit_id)

    async def stop(self) -> None:
        """Stop the update task and the server. `start` may be called again afterwards."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            # pymodbus 3.16 leaves shutdown() unannotated.
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
            log.info("simulator_stopped", url=self.url)

    def pause_updates(self) -> None:
        """Stop rewriting registers from the model until `resume_updates`."""
        self._paused = True

    def resume_updates(self) -> None:
        """Let the update task rewrite registers from the model again."""
        self._paused = False

    def values(self) -> dict[str, float]:
        """Return each channel's value as the registers contain it now, decoded and scaled."""
        values: dict[str, float] = {}
        for point in SIM_POINTS:
            words = self._words(point)
            raw = decode_registers(words, point.type, point.word_order, point.byte_order)
            values[point.channel] = engineering_value(raw, point.type, point.scale, point.offset)
        return values

    async def set_values(self, values: Mapping[str, float]) -> None:
        """Encode engineering values for the named channels and write their registers."""
        unknown = sorted(set(values) - set(self._points))
        if unknown:
            msg = f"unknown simulator channel(s) {unknown}: expected some of {list(self._points)}"
            raise KeyError(msg)
        self._write_model_values(values)
        await self._push_tables()

    async def set_registers(self, table: str, address: int, words: Sequence[int]) -> None:
        """Write raw register words into the served map, bypassing the encoding."""
        image = self._table(table)
        start = address - image.base
        if start < 0 or start + len(words) > len(image.words):
            last = image.base + len(image.words) - 1
            msg = (
                f"{table} {address}..{address + len(words) - 1} is outside the "
                f"simulator map: use addresses {image.base}..{last}"
            )
            raise ValueError(msg)
        image.words[start : start + len(words)] = list(words)
        await self._push_tables()

    async def _update_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.update_interval)
            now = loop.time()
            values = self.model.step((now - last) * self.time_scale)
            last = now
            if not self._paused:
                self._write_model_values(values)
                await self._push_tables()

    def _write_model_values(self, values: Mapping[str, float]) -> None:
        for channel, value in values.items():
            point = self._points[channel]
            raw: float = unscale(value, point.scale, point.offset)
            if point.type not in ("float32", "float64"):
                raw = _clamp_int(round(raw), point.type)
            words = encode_value(raw, point.type, point.word_order, point.byte_order)
            image = self._table(point.table)
            start = point.address - image.base
            image.words[start : start + len(words)] = words

    async def _push_tables(self) -> None:
        if self._server is None:
            return
        for image in self._tables.values():
            await self._server.async_setValues(
                self.unit_id, image.function_code, image.base, list(image.words)
            )

    def _words(self, point: ModbusPoint) -> list[int]:
        image = self._table(point.table)
        start = point.address - image.base
        return image.words[start : start + point.registers]

    def _table(self, table: str) -> _Table:
        image = self._tables.get(table)
        if image is None:
            msg = f"unknown register table {table!r}: expected one of {list(self._tables)}"
            raise ValueError(msg)
        return image


_INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def _clamp_int(value: int, type_name: str) -> int:
    """Clamp the value to the type's limits, as a device register saturates."""
    low, high = _INT_RANGES[type_name]
    return min(high, max(low, value))


def _build_tables(points: Sequence[ModbusPoint]) -> dict[str, _Table]:
    tables: dict[str, _Table] = {}
    for table, code in _FUNCTION_CODES.items():
        in_table = [point for point in points if point.table == table]
        base = min(point.address for point in in_table)
        end = max(point.address + point.registers for point in in_table)
        tables[table] = _Table(code, base, [0] * (end - base))
    return tables


def _build_device(unit_id: int, tables: Mapping[str, _Table]) -> SimDevice:
    """Build a device with separate holding and input tables and one unused coil word."""
    # SimDevice needs at least one entry for coils and discrete inputs too.
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    registers = {
        name: [SimData(image.base, count=len(image.words), datatype=DataType.REGISTERS)]
        for name, image in tables.items()
    }
    simdata = (bits, list(bits), registers["holding"], registers["input"])
    return SimDevice(id=unit_id, simdata=simdata)


def _listening_port(server: ModbusTcpServer, requested: int) -> int:
    if requested:
        return requested
    # With port 0 the kernel picks the port, so ask the listening socket.
    sockets = getattr(server.transport, "sockets", None) or ()
    for sock in sockets:
        return int(sock.getsockname()[1])
    msg = "simulator server has no listening socket after start"
    raise RuntimeError(msg)
