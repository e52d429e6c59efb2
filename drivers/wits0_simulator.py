"""Simulated electronic drilling recorder (EDR) that serves WITS level 0 packets over TCP.

Each connected client receives one packet every `interval` seconds: a
`1984SIMULATOR/EDR` source tag line, as a Pason EDR sends, then record 01
items in the metric units of the standard table. The drilling values come
from `RigModel`, the model of the Modbus rig simulator. The demo gives both
simulators one model, so both feeds describe one rig. Mud
flow, pit volume, density and temperature come from a small model here
that follows the pumps and the hole depth. Pump 3 is idle and sends the
-9999.00 "no data" sentinel.

| code | mnemonic | value | unit |
| --- | --- | --- | --- |
| 0105 / 0106 | date / time | YYMMDD / HHMMSS in `timezone` (only with `device_time=True`) | |
| 0108 | DBTM | bit depth (measured) | m |
| 0110 | DMEA | hole depth (measured) | m |
| 0112 | BPOS | block position | m |
| 0113 | ROPA | rate of penetration | m/h |
| 0114 | HKLA | hookload | kdaN |
| 0116 | WOBA | weight on bit | kdaN |
| 0118 | TQA | rotary torque | kN.m |
| 0120 | RPMA | rotary speed | rpm |
| 0121 | SPPA | standpipe pressure | kPa |
| 0122 | CHKP | casing pressure (always 0, no choke) | kPa |
| 0123 / 0124 | SPM1 / SPM2 | pump stroke rates | spm |
| 0125 | SPM3 | pump 3, idle: -9999.00 | |
| 0126 / 0127 | TVA / TVCA | active tank volume and its change | m3 |
| 0128 | MFOP | flow paddle | % |
| 0129 / 0130 | MFOA / MFIA | mud flow out / in | L/min |
| 0131 / 0132 | MDOA / MDIA | mud density out / in | kg/m3 |
| 0133 / 0134 | MTOA / MTIA | mud temperature out / in | degC |
| 0137 | STKC | pump stroke count | |

With `require_handshake=True` the simulator behaves like an EDR in send and
receive mode: it sends a client nothing until that client has sent it a
valid WITS packet, such as the `0111-9999` keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import random
import time
import zoneinfo
from dataclasses import dataclass, field

import structlog

from drivers.simulator import RigModel
from drivers.wits0_parser import Wits0Parser, encode_packet

__all__ = ["SIM_SOURCE_TAG", "Wits0Simulator", "WitsMudModel"]

log = structlog.get_logger(__name__)

SIM_SOURCE_TAG = "SIMULATOR/EDR"
NULL_TEXT = "-9999.00"

KDAN_PER_KLBF = 0.444822
KPA_PER_PSI = 6.894757
KNM_PER_KFTLBF = 1.355818

# Mud system constants, round figures for a land rig drilling 8 1/2 in. hole.
LITRES_PER_STROKE = 16.0
"""Output of one stroke of a triplex pump with 6 in. liners."""
HOLE_AREA_M2 = math.pi * (0.2159 / 2) ** 2
ACTIVE_VOLUME_M3 = 60.0
FLOW_OUT_LAG_S = 20.0
"""Time constant of the return flow following a change of pump rate, in simulated seconds."""
MUD_DENSITY_KG_M3 = 1200.0
MUD_TEMPERATURE_IN_C = 36.0
MUD_HEATING_C = 8.0
"""Temperature the mud gains on its way down and up while circulating."""

SEND_TIMEOUT_S = 2.0
"""A client that does not accept a packet within this time is disconnected."""


class WitsMudModel:
    """Mud flow, pit volume, density and temperature that follow the pumps and the hole depth.

    Steps in simulated seconds, like `RigModel`. Mud the pumps push into
    the well leaves the active tank at once but returns through the flow
    line with a lag, so the pit drops when the pumps start and gains back
    when they stop. Drilled hole takes its volume from the pit.
    """

    def __init__(self, start_hole_depth_m: float, seed: int | None = None) -> None:
        self._random = random.Random(seed)  # noqa: S311 - sensor noise, not security
        self.start_hole_depth_m = start_hole_depth_m
        self.flow_in = 0.0
        self.flow_out = 0.0
        self.in_flight_m3 = 0.0
        self.elapsed_s = 0.0

    def step(self, dt_s: float, pump_spm: float, hole_depth_m: float) -> dict[str, float]:
        """Advance by `dt_s` simulated seconds; return flows, volumes, densities, temperatures."""
        self.elapsed_s += dt_s
        self.flow_in = pump_spm * LITRES_PER_STROKE
        follow = 1.0 - math.exp(-dt_s / FLOW_OUT_LAG_S) if dt_s > 0 else 0.0
        self.flow_out += (self.flow_in - self.flow_out) * follow
        self.in_flight_m3 += (self.flow_in - self.flow_out) * dt_s / 60_000.0

        drilled_m3 = (hole_depth_m - self.start_hole_depth_m) * HOLE_AREA_M2
        volume = ACTIVE_VOLUME_M3 - drilled_m3 - self.in_flight_m3 + self._noise(0.02)
        circulating = self.flow_out > 1.0
        full_flow = 2 * 100.0 * LITRES_PER_STROKE
        drift = math.sin(self.elapsed_s / 1800.0)
        temperature_in = MUD_TEMPERATURE_IN_C + 1.5 * drift + self._noise(0.1)
        heating = MUD_HEATING_C * min(1.0, self.flow_out / full_flow)
        paddle = 100.0 * self.flow_out / full_flow + (self._noise(0.5) if circulating else 0.0)
        return {
            "volume": volume,
            "volume_change": volume - ACTIVE_VOLUME_M3,
            "flow_paddle": min(100.0, max(0.0, paddle)),
            "flow_out": max(0.0, self.flow_out + self._noise(15.0)) if circulating else 0.0,
            "flow_in": self.flow_in,
            "density_out": MUD_DENSITY_KG_M3 + (6.0 if circulating else 0.0) + self._noise(1.5),
            "density_in": MUD_DENSITY_KG_M3 + self._noise(0.8),
            "temperature_out": temperature_in + heating + self._noise(0.2),
            "temperature_in": temperature_in,
        }

    def _noise(self, sigma: float) -> float:
        return self._random.gauss(0.0, sigma)


@dataclass(eq=False)
class _Client:
    """One connected client and, in handshake mode, when it last sent a valid packet."""

    peer: str
    writer: asyncio.StreamWriter
    parser: Wits0Parser = field(default_factory=Wits0Parser)
    handshake_at: float | None = None


class Wits0Simulator:
    """A TCP server on loopback that sends every client a WITS0 packet each `interval`.

    Every `interval` seconds of real time the rig model advances by
    `interval * time_scale` simulated seconds and one packet goes to each
    client. `require_handshake=True` sends a client nothing until it has
    sent a valid packet. With `handshake_hold` set, a handshake opens
    the stream for that many seconds only, so the client has to repeat it.
    `device_time=True` adds date (0105, YYMMDD) and time (0106, HHMMSS)
    items in `timezone`, an IANA name. Pass the `model` of a running Modbus
    `RigSimulator` to report that rig's values: the EDR then reads the model
    and leaves stepping it to its owner, so both feeds agree.
    """

    def __init__(
        self,
        *,
        interval: float = 1.0,
        time_scale: float = 60.0,
        seed: int | None = None,
        source_tag: str | None = SIM_SOURCE_TAG,
        require_handshake: bool = False,
        handshake_hold: float | None = None,
        device_time: bool = False,
        timezone: str = "UTC",
        model: RigModel | None = None,
    ) -> None:
        if interval <= 0:
            msg = f"interval={interval!r} is not a positive number of seconds: use, say, 1.0"
            raise ValueError(msg)
        self.interval = interval
        self.time_scale = time_scale
        self.source_tag = source_tag
        self.require_handshake = require_handshake
        self.handshake_hold = handshake_hold
        self.device_time = device_time
        self.zone = zoneinfo.ZoneInfo(timezone)
        self.model = model if model is not None else RigModel(seed=seed)
        self._steps_model = model is None
        self.mud = WitsMudModel(self.model.hole_depth, seed=None if seed is None else seed + 1)
        self.packets_sent = 0
        """Packets written to clients, counted once per client."""
        self.handshakes_received = 0
        """Valid packets received from clients."""
        self.last_items: list[tuple[str, str]] = []
        """Items of the newest packet, source tag line excluded."""
        self._clients: set[_Client] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._host = ""
        self._port = 0

    @property
    def port(self) -> int:
        """TCP port the server listens on (0 before `start`)."""
        return self._port

    @property
    def url(self) -> str:
        """The `tcp://host:port` URL of the running server, as a WITS0 source's `url`."""
        return f"tcp://{self._host}:{self._port}"

    @property
    def clients(self) -> int:
        """Number of clients connected now."""
        return len(self._clients)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start serving on `host:port`. With port 0 the kernel picks a free port (see `port`)."""
        if self._server is not None:
            msg = f"WITS0 simulator already running on {self.url}: call stop() before start()"
            raise RuntimeError(msg)
        self._server = await asyncio.start_server(self._serve_client, host, port)
        self._host = host
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._task = asyncio.create_task(self._send_loop(), name="wits0-simulator-send")
        log.info("wits0_simulator_started", url=self.url, handshake=self.require_handshake)

    async def stop(self) -> None:
        """Disconnect every client and stop the server. `start` may be called again afterwards."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is None:
            return
        self._server.close()
        # Closing a client's transport ends its handler's read with EOF. Cancelling
        # the handler instead makes asyncio 3.11 log the cancellation as an error.
        for client in list(self._clients):
            client.writer.close()
        if self._handlers:
            _done, pending = await asyncio.wait(self._handlers, timeout=SEND_TIMEOUT_S)
            for handler in pending:
                handler.cancel()
        await self._server.wait_closed()
        self._server = None
        log.info("wits0_simulator_stopped", url=self.url, packets_sent=self.packets_sent)

    def packet(self) -> bytes:
        """Encode the current values as one packet, without advancing the model."""
        return encode_packet(self.last_items, source_tag=self.source_tag)

    def step(self, dt_s: float, wall_time: float | None = None) -> list[tuple[str, str]]:
        """Advance the models by `dt_s` simulated seconds and return the new packet's items."""
        values = self.model.step(dt_s) if self._steps_model else self.model.values
        pump_spm = values["pump1_spm"] + values["pump2_spm"]
        mud = self.mud.step(dt_s, pump_spm, values["hole_depth"])
        items: list[tuple[str, str]] = []
        if self.device_time:
            now = dt.datetime.fromtimestamp(
                time.time() if wall_time is None else wall_time, tz=self.zone
            )
            items += [("0105", f"{now:%y%m%d}"), ("0106", f"{now:%H%M%S}")]
        items += [
            ("0108", _fixed(values["bit_depth"])),
            ("0110", _fixed(values["hole_depth"])),
            ("0112", _fixed(values["block_position"])),
            ("0113", _fixed(values["rop"])),
            ("0114", _fixed(values["hookload"] * KDAN_PER_KLBF)),
            ("0116", _fixed(values["weight_on_bit"] * KDAN_PER_KLBF)),
            ("0118", _fixed(values["rotary_torque"] * KNM_PER_KFTLBF)),
            ("0120", _fixed(values["rotary_speed"])),
            ("0121", _fixed(values["standpipe_pressure"] * KPA_PER_PSI)),
            ("0122", _fixed(0.0)),
            ("0123", _fixed(values["pump1_spm"])),
            ("0124", _fixed(values["pump2_spm"])),
            ("0125", NULL_TEXT),
            ("0126", _fixed(mud["volume"])),
            ("0127", _fixed(mud["volume_change"])),
            ("0128", _fixed(mud["flow_paddle"])),
            ("0129", _fixed(mud["flow_out"])),
            ("0130", _fixed(mud["flow_in"])),
            ("0131", _fixed(mud["density_out"])),
            ("0132", _fixed(mud["density_in"])),
            ("0133", _fixed(mud["temperature_out"])),
            ("0134", _fixed(mud["temperature_in"])),
            ("0137", f"{values['pump_strokes_total']:.0f}"),
        ]
        self.last_items = items
        return items

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.step((now - last) * self.time_scale)
            last = now
            data = self.packet()
            receivers = [client for client in self._clients if self._may_send(client, now)]
            if receivers:
                await asyncio.gather(*(self._send(client, data) for client in receivers))

    def _may_send(self, client: _Client, now: float) -> bool:
        if not self.require_handshake:
            return True
        if client.handshake_at is None:
            return False
        return self.handshake_hold is None or now - client.handshake_at <= self.handshake_hold

    async def _send(self, client: _Client, data: bytes) -> None:
        try:
            client.writer.write(data)
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await client.writer.drain()
        except (OSError, TimeoutError) as exc:
            log.info(
                "wits0_simulator_client_dropped", peer=client.peer, error=str(exc) or "timeout"
            )
            self._clients.discard(client)
            client.writer.close()
            return
        self.packets_sent += 1

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Register a client and read what it sends, to recognise handshake packets."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        peer = writer.get_extra_info("peername")
        client = _Client(peer=f"{peer[0]}:{peer[1]}" if peer else "?", writer=writer)
        self._clients.add(client)
        log.info("wits0_simulator_client_connected", peer=client.peer)
        try:
            while data := await reader.read(4096):
                self._note_handshakes(client, data)
        except OSError:
            pass
        finally:
            self._clients.discard(client)
            writer.close()
            if task is not None:
                self._handlers.discard(task)
            log.info("wits0_simulator_client_disconnected", peer=client.peer)

    def _note_handshakes(self, client: _Client, data: bytes) -> None:
        for received in client.parser.feed(data):
            if received.items:
                client.handshake_at = asyncio.get_running_loop().time()
                self.handshakes_received += 1


def _fixed(value: float) -> str:
    """Format a value with two decimals, as EDRs commonly send them."""
    return f"{value:.2f}"
