"""Config reloads: the plan from an old and a new config, and applying it to a running agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.reload import plan_reload
from agent.runtime import Agent
from config.loader import load_config
from config.model import Config
from tests.peers import ModbusPeer, free_port, sim_device
from uplink.auth import generate_key_file


def source(name: str, port: int, unit: int = 1, poll: str = "100ms") -> str:
    return (
        f'[[sources.modbus]]\nname = "{name}"\nurl = "tcp://127.0.0.1:{port}"\n'
        f'unit_id = {unit}\npoll_interval = "{poll}"\n'
        f'[[sources.modbus.points]]\nchannel = "{name}-value"\naddress = 0\n'
    )


def agent_table(data_dir: Path, **keys: str) -> str:
    lines = ["[agent]", 'rig_id = "rig-reload"', f'data_dir = "{data_dir}"', 'log_format = "json"']
    keys.setdefault("metrics_listen", "")
    keys.setdefault("clock_check", "off")
    lines += [f'{key} = "{value}"' for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def cloud_table(key: Path, device_id: str = "edge-1") -> str:
    return (
        f'[cloud]\nurl = "http://127.0.0.1:9"\ndevice_id = "{device_id}"\n'
        f'private_key_file = "{key}"\n'
    )


WITSML = (
    '[witsml]\nwell_uid = "w"\nwell_name = "W"\nwellbore_uid = "wb"\nwellbore_name = "WB"\n'
    'log_uid = "l"\nlog_name = "L"\n[witsml.curves]\n"pumps-value" = { mnemonic = "SPP" }\n'
)


def load(tmp_path: Path, text: str, name: str = "agent.toml") -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "device-key.pem"
    generate_key_file(path)
    return path


# --- plans -------------------------------------------------------------------------------


def test_plan_same_config_empty(tmp_path: Path) -> None:
    text = agent_table(tmp_path) + source("pumps", 5020) + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n'
    old, new = load(tmp_path, text, "a.toml"), load(tmp_path, text, "b.toml")

    plan, effective = plan_reload(old, new)

    assert plan.empty
    assert plan.restart_required == ()
    assert plan.changes() == {}
    assert effective == new


def test_plan_restarts_changed_source_only(tmp_path: Path) -> None:
    old = load(tmp_path, agent_table(tmp_path) + source("pumps", 5020) + source("mud", 5021), "a")
    new_text = agent_table(tmp_path) + source("pumps", 5020) + source("mud", 5021, poll="1s")
    new = load(tmp_path, new_text, "b")

    plan, _ = plan_reload(old, new)

    assert plan.stop_sources == ("mud",)
    assert [s.name for s in plan.start_sources] == ["mud"]
    assert plan.changes() == {"sources_restarted": ["mud"]}


def test_plan_added_and_removed_sources(tmp_path: Path) -> None:
    old = load(tmp_path, agent_table(tmp_path) + source("pumps", 5020) + source("mud", 5021), "a")
    new = load(tmp_path, agent_table(tmp_path) + source("pumps", 5020) + source("tank", 5022), "b")

    plan, _ = plan_reload(old, new)

    assert plan.stop_sources == ("mud",)
    assert [s.name for s in plan.start_sources] == ["tank"]
    assert plan.changes() == {"sources_removed": ["mud"], "sources_added": ["tank"]}


def test_plan_restarts_changed_sink(tmp_path: Path) -> None:
    base = agent_table(tmp_path) + source("pumps", 5020)
    old = load(tmp_path, base + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\nqos = 1\n', "a")
    new = load(tmp_path, base + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\nqos = 0\n', "b")

    plan, effective = plan_reload(old, new)

    assert plan.restart_sinks == ("mqtt",)
    assert plan.stop_sources == ()
    assert effective.mqtt is not None
    assert effective.mqtt.qos == 0


def test_plan_cloud_change_restarts_witsml(tmp_path: Path, key_file: Path) -> None:
    base = agent_table(tmp_path) + source("pumps", 5020)
    old = load(tmp_path, base + cloud_table(key_file) + WITSML, "a")
    new = load(tmp_path, base + cloud_table(key_file, "edge-2") + WITSML, "b")

    plan, _ = plan_reload(old, new)

    assert plan.restart_sinks == ("cloud", "witsml")


def test_plan_keeps_values_that_need_restart(tmp_path: Path) -> None:
    mqtt = '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n'
    old = load(tmp_path, agent_table(tmp_path) + mqtt, "a")
    new_text = (
        agent_table(tmp_path / "other").replace("rig-reload", "rig-new")
        + '[buffer]\nmax_bytes = "1GiB"\n'
        + mqtt
    )
    new = load(tmp_path, new_text, "b")

    plan, effective = plan_reload(old, new)

    assert plan.restart_required == ("agent.rig_id", "agent.data_dir", "buffer")
    assert effective.agent.rig_id == "rig-reload"
    assert effective.agent.data_dir == tmp_path
    assert effective.buffer == old.buffer
    # The topic prefix contains the rig id, which stays, so the sink does not restart.
    assert plan.restart_sinks == ()
    assert plan.empty


def test_plan_sink_added_needs_restart(tmp_path: Path) -> None:
    old = load(tmp_path, agent_table(tmp_path), "a")
    new = load(tmp_path, agent_table(tmp_path) + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n', "b")

    plan, effective = plan_reload(old, new)

    assert plan.restart_required == ("[mqtt] added",)
    assert effective.mqtt is None
    assert effective.enabled_sinks() == old.enabled_sinks()


def test_plan_removed_witsml_keeps_running(tmp_path: Path, key_file: Path) -> None:
    """Removing [witsml] with the source its curve reads leaves the running sink untouched."""
    old = load(
        tmp_path,
        agent_table(tmp_path) + source("pumps", 5020) + cloud_table(key_file) + WITSML,
        "a",
    )
    new = load(tmp_path, agent_table(tmp_path) + source("mud", 5021) + cloud_table(key_file), "b")

    plan, effective = plan_reload(old, new)

    assert plan.restart_required == ("[witsml] removed",)
    assert plan.restart_sinks == ()
    assert effective.witsml == old.witsml
    assert plan.stop_sources == ("pumps",)
    assert [s.name for s in plan.start_sources] == ["mud"]


def test_plan_agent_keys_applied(tmp_path: Path) -> None:
    old = load(tmp_path, agent_table(tmp_path, metrics_listen="127.0.0.1:9108"), "a")
    new_text = agent_table(
        tmp_path,
        metrics_listen="",
        log_level="debug",
        clock_check="adjtimex",
        clock_jump_threshold="5s",
    )
    new = load(tmp_path, new_text, "b")

    plan, effective = plan_reload(old, new)

    assert plan.log_level == "debug"
    assert plan.metrics_listen == ""
    assert plan.clock_changed
    assert not plan.empty
    assert plan.changes() == {"log_level": "debug", "metrics_listen": "", "clock": "changed"}
    assert effective.agent.clock_jump_threshold == 5.0


# --- applying a plan to a running agent ----------------------------------------------------


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(10):
            await agent.started.wait()
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


@pytest.fixture
async def peer() -> AsyncIterator[ModbusPeer]:
    server = ModbusPeer([sim_device(1), sim_device(2)], tcp_port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_apply_restarts_one_source(tmp_path: Path, peer: ModbusPeer) -> None:
    """A changed source gets a new driver and task; the other source keeps both."""
    port = peer.tcp_port
    base = agent_table(tmp_path / "data") + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n'
    old = load(tmp_path, base + source("pumps", port, 1) + source("mud", port, 2), "a")
    new = load(tmp_path, base + source("pumps", port, 1) + source("mud", port, 2, "200ms"), "b")
    agent = Agent(old)
    async with running(agent):
        pumps_driver = agent.drivers[0]
        pumps_task = agent._tasks["source:pumps"]
        mud_task = agent._tasks["source:mud"]
        mqtt_sink = agent.sinks[0]

        plan = await agent.apply_config(new)

        assert plan is not None
        assert plan.stop_sources == ("mud",)
        assert agent._tasks["source:pumps"] is pumps_task
        assert agent.drivers[0] is pumps_driver
        assert mud_task.done()
        assert not agent._tasks["source:mud"].done()
        assert [d.name for d in agent.drivers] == ["pumps", "mud"]
        assert agent.sinks[0] is mqtt_sink
        assert agent.config == new
        # Both sources share the peer's bus, and the restarted one polls on it again.
        before = peer.total(2)
        await asyncio.sleep(0.6)
        assert peer.total(2) > before


async def test_apply_restarts_sink(tmp_path: Path) -> None:
    base = agent_table(tmp_path / "data")
    old = load(tmp_path, base + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\nqos = 1\n', "a")
    new = load(tmp_path, base + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\nqos = 0\n', "b")
    agent = Agent(old)
    async with running(agent):
        old_sink, old_task = agent.sinks[0], agent._tasks["sink:mqtt"]

        await agent.apply_config(new)

        assert agent.sinks[0] is not old_sink
        assert old_task.done()
        assert not agent._tasks["sink:mqtt"].done()
        assert agent.liveness.names() == ["writer", "sink:mqtt"]


async def test_apply_bad_key_keeps_old_config(tmp_path: Path, key_file: Path) -> None:
    """A cloud sink whose new key file is unusable rejects the whole reload."""
    base = agent_table(tmp_path / "data") + source("pumps", 5020)
    old = load(tmp_path, base + cloud_table(key_file), "a")
    broken = tmp_path / "broken.pem"
    broken.write_text("not a key\n")
    broken.chmod(0o600)
    new = load(tmp_path, base.replace("100ms", "300ms") + cloud_table(broken), "b")
    agent = Agent(old)
    async with running(agent):
        cloud_sink, pumps_task = agent.cloud_sink, agent._tasks["source:pumps"]

        plan = await agent.apply_config(new)

        assert plan is None
        assert agent.config == old
        assert agent.cloud_sink is cloud_sink
        assert agent._tasks["source:pumps"] is pumps_task


async def test_apply_moves_metrics_server(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    old = load(tmp_path, agent_table(tmp_path / "data", metrics_listen=f"127.0.0.1:{first}"), "a")
    new = load(tmp_path, agent_table(tmp_path / "data", metrics_listen=f"127.0.0.1:{second}"), "b")
    agent = Agent(old)
    async with running(agent), httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{first}/healthz")).status_code == 200

        await agent.apply_config(new)

        assert (await client.get(f"http://127.0.0.1:{second}/healthz")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{first}/healthz")
        assert agent.config.agent.metrics_listen == f"127.0.0.1:{second}"


async def test_apply_busy_metrics_port_keeps_old(tmp_path: Path) -> None:
    """When the new metrics address cannot be bound, the server stays on the old one."""
    first = free_port()
    old = load(tmp_path, agent_table(tmp_path / "data", metrics_listen=f"127.0.0.1:{first}"), "a")
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = blocker.sockets[0].getsockname()[1]
    new = load(tmp_path, agent_table(tmp_path / "data", metrics_listen=f"127.0.0.1:{busy}"), "b")
    agent = Agent(old)
    try:
        async with running(agent), httpx.AsyncClient(timeout=5) as client:
            await agent.apply_config(new)

            assert agent.config.agent.metrics_listen == f"127.0.0.1:{first}"
            assert (await client.get(f"http://127.0.0.1:{first}/healthz")).status_code == 200
    finally:
        blocker.close()
        await blocker.wait_closed()
