"""RigSimulator: served registers, the published map and the rig model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from itertools import pairwise

import pytest

from buffer.reading import Quality, Reading
from config.model import ModbusSource
from drivers.modbus import ModbusTcpDriver
from drivers.modbus_decode import encode_value
from drivers.simulator import (
    SIM_POINTS,
    STAND_BOTTOM_M,
    STAND_TOP_M,
    Phase,
    RigModel,
    RigSimulator,
    simulator_points,
)


class Polls:
    """Emit callable that keeps each poll's readings and wakes waiters."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, readings: Sequence[Reading]) -> None:
        self.batches.append(list(readings))
        self.arrived.set()

    async def next(self) -> list[Reading]:
        self.arrived.clear()
        async with asyncio.timeout(5):
            await self.arrived.wait()
        return self.batches[-1]


@pytest.fixture
async def simulator() -> AsyncIterator[RigSimulator]:
    """A running simulator on a free loopback port."""
    sim = RigSimulator(seed=7)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def polls(simulator: RigSimulator) -> AsyncIterator[Polls]:
    """A driver polling the simulator every 100 ms, feeding a Polls collector."""
    driver = ModbusTcpDriver(simulator.modbus_source(poll_interval="100ms"))
    collected = Polls()
    task = asyncio.create_task(driver.run(collected))
    try:
        yield collected
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)


def by_channel(batch: list[Reading]) -> dict[str, float]:
    values: dict[str, float] = {}
    for reading in batch:
        assert reading.value is not None, f"{reading.channel} read bad"
        values[reading.channel] = reading.value
    return values


async def test_driver_reads_simulator_values(simulator: RigSimulator, polls: Polls) -> None:
    """Every channel the driver decodes equals what the simulator holds."""
    simulator.pause_updates()
    await polls.next()
    batch = await polls.next()
    served = simulator.values()

    assert {r.quality for r in batch} == {Quality.GOOD}
    assert by_channel(batch) == pytest.approx(served, rel=1e-12)


async def test_values_change(simulator: RigSimulator, polls: Polls) -> None:
    """Polled values change between polls while the simulator runs."""
    first = by_channel(await polls.next())
    await asyncio.sleep(0.5)
    later = by_channel(await polls.next())

    changed = {channel for channel in first if first[channel] != later[channel]}
    assert {"hookload", "weight_on_bit", "standpipe_pressure", "bit_depth"} <= changed
    assert later["bit_depth"] > first["bit_depth"]


async def test_set_values_served(simulator: RigSimulator, polls: Polls) -> None:
    """Values set by a test are what the driver reads, through scaling and every layout."""
    simulator.pause_updates()
    expected = {"hookload": 123.5, "rotary_speed": -12.5, "pump1_spm": 87.3, "hole_depth": 3001.25}
    await simulator.set_values(expected)
    await polls.next()
    batch = by_channel(await polls.next())

    assert {channel: batch[channel] for channel in expected} == pytest.approx(expected)


async def test_set_registers_raw(simulator: RigSimulator, polls: Polls) -> None:
    """Raw words written with set_registers reach the driver undecoded by the simulator."""
    simulator.pause_updates()
    await simulator.set_registers("input", 0, encode_value(42.0, "float32", "little", "big"))
    await polls.next()
    batch = by_channel(await polls.next())

    assert batch["rop"] == 42.0
    assert simulator.values()["rop"] == 42.0


async def test_set_registers_outside_map(simulator: RigSimulator) -> None:
    """Writing outside the served map raises and names the valid range."""
    with pytest.raises(ValueError, match=r"holding 20\.\.21 is outside the simulator map"):
        await simulator.set_registers("holding", 20, [1, 2])


async def test_set_values_unknown_channel(simulator: RigSimulator) -> None:
    """Setting a channel the simulator does not serve raises with the channel name."""
    with pytest.raises(KeyError, match="mud_weight"):
        await simulator.set_values({"mud_weight": 1.2})


async def test_start_twice(simulator: RigSimulator) -> None:
    """Starting a running simulator raises."""
    with pytest.raises(RuntimeError, match="already running"):
        await simulator.start()


async def test_port_zero_picks_free_port(simulator: RigSimulator) -> None:
    """Port 0 gives a real port, reflected in the URL."""
    assert simulator.port > 0
    assert simulator.url == f"tcp://127.0.0.1:{simulator.port}"


def test_points_form_valid_config() -> None:
    """simulator_points() validates as a source's points and plans into one read per table."""
    source = ModbusSource.model_validate(
        {"name": "sim", "url": "tcp://127.0.0.1:5020", "points": simulator_points()}
    )
    driver = ModbusTcpDriver(source)

    assert [point.channel for point in source.points] == [p.channel for p in SIM_POINTS]
    assert [(r.table, r.count) for r in driver.requests] == [("holding", 18), ("input", 6)]


def test_points_cover_every_layout() -> None:
    """The map mixes types and all four word and byte orders."""
    types = {point.type for point in SIM_POINTS}
    orders = {(point.word_order, point.byte_order) for point in SIM_POINTS}

    assert {"float32", "float64", "int16", "uint16", "uint32"} <= types
    assert len(orders) == 4


def test_model_cycles_through_phases() -> None:
    """Over three simulated hours the rig drills, sets slips, hoists and makes up a stand."""
    model = RigModel(seed=3)
    phases: set[Phase] = set()
    depths: list[float] = []
    blocks: list[float] = []
    for _ in range(3 * 3600):
        values = model.step(1.0)
        phases.add(model.phase)
        depths.append(values["bit_depth"])
        blocks.append(values["block_position"])

    assert phases == set(Phase)
    assert all(later >= earlier for earlier, later in pairwise(depths))
    assert depths[-1] - depths[0] > STAND_TOP_M - STAND_BOTTOM_M
    assert min(blocks) >= STAND_BOTTOM_M
    assert max(blocks) <= STAND_TOP_M


def test_model_hookload_tracks_phase() -> None:
    """Hookload carries the string while drilling and only the block while hoisting."""
    model = RigModel(seed=4)
    drilling, hoisting = [], []
    for _ in range(3 * 3600):
        values = model.step(1.0)
        if model.phase is Phase.DRILLING:
            drilling.append(values["hookload"])
        elif model.phase is Phase.HOIST:
            hoisting.append(values["hookload"])

    assert min(drilling) > 100.0
    assert max(hoisting) < 45.0
