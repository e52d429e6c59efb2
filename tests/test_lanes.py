"""Units of the two-lane delivery: split decision, token bucket, config keys, status, metrics."""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentSnapshot, BufferSnapshot, SinkSnapshot, render_metrics
from agent.status import format_duration_short, format_stats
from buffer.reading import Reading
from buffer.store import Buffer, BufferStats, SinkBacklog, SinkStats
from config.loader import ConfigError, load_config
from config.model import BacklogRate, CloudSection, MqttSection
from uplink.lanes import BURST_SECONDS, TokenBucket, plan_lanes

CLOUD = CloudSection(url="https://c.example", device_id="d1", private_key_file="k.pem")


def make_readings(count: int) -> list[Reading]:
    return [
        Reading(1_700_000_000_000_000 + i, "pumps", "spp", float(i), "psi") for i in range(count)
    ]


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    async with Buffer(tmp_path / "data", ["mqtt"], cleanup_interval=3600) as opened:
        yield opened


# plan_lanes


async def test_small_backlog_stays_plain(buffer: Buffer) -> None:
    """A backlog of at most the threshold keeps the single lane and sets no split."""
    await buffer.append(make_readings(100))
    assert await plan_lanes(buffer, "mqtt", threshold=100) is None
    assert (await buffer.backlog("mqtt")).split is None


async def test_large_backlog_splits_at_newest(buffer: Buffer) -> None:
    """More readings than the threshold behind the cursor split at the newest seq."""
    await buffer.append(make_readings(101))
    await buffer.commit_cursor("mqtt", 1)
    state = await plan_lanes(buffer, "mqtt", threshold=99)
    assert state is not None
    assert state.split == 101
    assert state.live_position == 101
    assert state.pending_ranges == ((2, 101),)


async def test_unfinished_split_resumes(buffer: Buffer) -> None:
    """A split whose backlog is not sent yet keeps both lanes, without a new split."""
    await buffer.append(make_readings(100))
    await buffer.start_split("mqtt", 80)
    await buffer.ack_range("mqtt", 81, 90)
    await buffer.append(make_readings(5))
    state = await plan_lanes(buffer, "mqtt", threshold=50)
    assert state is not None
    assert state.split == 80
    assert state.live_position == 90
    assert state.pending_ranges == ((1, 80),)


async def test_second_outage_splits_again(buffer: Buffer) -> None:
    """A live lane that falls behind by more than the threshold gets a new, higher split."""
    await buffer.append(make_readings(100))
    await buffer.start_split("mqtt", 80)
    await buffer.ack_range("mqtt", 81, 90)
    await buffer.append(make_readings(100))
    state = await plan_lanes(buffer, "mqtt", threshold=50)
    assert state is not None
    assert state.split == 200
    assert state.pending_ranges == ((1, 80), (91, 200))


async def test_finished_split_cleared(buffer: Buffer) -> None:
    """A split whose backlog has been sent is cleared and the sink goes back to one lane."""
    await buffer.append(make_readings(100))
    await buffer.start_split("mqtt", 80)
    await buffer.ack_range("mqtt", 1, 95)
    assert await plan_lanes(buffer, "mqtt", threshold=50) is None
    state = await buffer.backlog("mqtt")
    assert state.split is None
    assert state.cursor == 95


# TokenBucket


class FakeClock:
    """A monotonic clock that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_empty() -> None:
    """A new bucket makes the first send wait for its cost at the rate."""
    clock = FakeClock()
    bucket = TokenBucket(1000, clock)
    assert bucket.delay(100) == pytest.approx(0.1)
    clock.now += 0.1
    assert bucket.delay(100) == pytest.approx(0.0, abs=1e-9)


def test_bucket_caps_burst() -> None:
    """After a long idle time the bucket holds only BURST_SECONDS of budget."""
    clock = FakeClock()
    bucket = TokenBucket(1000, clock)
    clock.now += 60
    bucket.take(1000 * BURST_SECONDS)
    assert bucket.delay(1) > 0


def test_bucket_large_cost_goes_into_debt() -> None:
    """A send above the capacity goes once the bucket is full, and the debt delays the next."""
    clock = FakeClock()
    bucket = TokenBucket(100, clock)
    clock.now += BURST_SECONDS
    assert bucket.delay(500) == 0.0
    bucket.take(500)
    # 500 - 25 tokens of debt plus 1 token for the next send, at 100 per second.
    assert bucket.delay(1) == pytest.approx(4.76)


@pytest.mark.parametrize("cost", [1, 37, 500])
def test_bucket_rate_over_windows(cost: int) -> None:
    """Sending as fast as the bucket allows stays within rate * W plus one burst in any window."""
    clock = FakeClock()
    rate = 400.0
    bucket = TokenBucket(rate, clock)
    start = clock.now
    sends: list[float] = []
    while clock.now < start + 60:
        wait = bucket.delay(cost)
        if wait > 0:
            clock.now += wait
            continue
        bucket.take(cost)
        sends.append(clock.now)
    allowance = max(rate * BURST_SECONDS, cost)
    for index, first in enumerate(sends):
        in_window = (bisect.bisect_left(sends, first + 10) - index) * cost
        assert in_window <= rate * 10 + allowance
    # The bucket does not run much slower than its rate either.
    assert len(sends) * cost >= rate * 59


def test_bucket_rejects_zero_rate() -> None:
    """A rate of zero would never send, so it is rejected with the value."""
    with pytest.raises(ValueError, match="rate is 0"):
        TokenBucket(0)


# The backlog_rate and backlog_threshold keys


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unlimited", None),
        ("2000/s", BacklogRate(2000.0, "readings")),
        (" 12.5 / s ", BacklogRate(12.5, "readings")),
        ("64KiB/s", BacklogRate(65536.0, "bytes")),
        ("1MB/s", BacklogRate(1_000_000.0, "bytes")),
    ],
)
def test_backlog_rate_forms(text: str, expected: BacklogRate | None) -> None:
    """A rate is readings per second, bytes per second with a size unit, or unlimited."""
    assert MqttSection(backlog_rate=text).backlog_limit == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2000", "expected readings per second"),
        ("64KiB", "expected readings per second"),
        ("fast", "expected readings per second"),
        ("0/s", "a rate of zero would never send the backlog"),
    ],
)
def test_backlog_rate_rejected(tmp_path: Path, text: str, message: str) -> None:
    """A wrong rate stops the config with the TOML line, the value and the accepted forms."""
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nrig_id = "r1"\n[cloud]\nurl = "https://c.example"\n'
        f'device_id = "d1"\nprivate_key_file = "k.pem"\nbacklog_rate = "{text}"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f'agent.toml:7: cloud.backlog_rate = "{text}"' in str(caught.value)
    assert message in str(caught.value)


def test_backlog_defaults() -> None:
    """Both sinks split above 10,000 waiting readings and drain without a rate limit."""
    for section in (MqttSection(), CLOUD):
        assert section.backlog_threshold == 10_000
        assert section.backlog_limit is None


# status and /metrics


def backlog_stats(backlogs: list[SinkBacklog]) -> BufferStats:
    sinks = [SinkStats(b.name, 0, b.depth) for b in backlogs]
    return BufferStats(
        last_seq=100_000, rows=100_000, dropped_rows=0, db_bytes=0, sinks=sinks, backlogs=backlogs
    )


def test_status_shows_backlog_lanes() -> None:
    """status lists each draining sink with its backlog, oldest age and time left."""
    now = 1_800_000_000_000_000
    mqtt = SinkBacklog(
        "mqtt",
        split=61_351,
        depth=30_000,
        oldest_ts_us=now - 362_000_000,
        split_us=now - 10_000_000,
        split_depth=60_000,
    )
    cloud = SinkBacklog("cloud", split=None, depth=0, oldest_ts_us=None)
    lines = format_stats("rig-7", backlog_stats([mqtt, cloud]), now=now).splitlines()

    start = lines.index("backlog lanes (new readings go first, older ones drain behind them):")
    assert lines[start + 1].split() == ["sink", "backlog", "oldest", "time", "left", "split", "seq"]
    # 30,000 readings sent in 10 s leave 30,000 for another 10 s.
    assert lines[start + 2].split() == ["mqtt", "30000", "6m", "02s", "10s", "61351"]
    # The cloud sink drains nothing, so the block leaves it out.
    rows = lines[start + 2 : lines.index("", start)]
    assert [row.split()[0] for row in rows] == ["mqtt"]


def test_status_hides_idle_backlog() -> None:
    """Without a split or a backlog, status shows no backlog block."""
    idle = SinkBacklog("mqtt", split=None, depth=0, oldest_ts_us=None)
    assert "backlog lanes" not in format_stats("rig-7", backlog_stats([idle]))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (45, "45s"), (362, "6m 02s"), (7500, "2h 05m"), (90_000, "1d 01h")],
)
def test_duration_short(seconds: float, text: str) -> None:
    assert format_duration_short(seconds) == text


def test_metrics_backfill_gauges() -> None:
    """The backfill gauges carry each sink's values; an unknown estimate is left out."""
    snapshot = AgentSnapshot(
        rig_id="rig-7",
        version="0.1.0",
        start_unix=0.0,
        buffer=BufferSnapshot(open=True),
        sinks=(
            SinkSnapshot(
                "mqtt",
                connected=True,
                backfill=30_000,
                backfill_oldest_age_seconds=362.0,
                backfill_drain_seconds=10.0,
            ),
            SinkSnapshot("cloud", connected=True, backfill=500, backfill_drain_seconds=None),
        ),
    )
    samples = {
        (sample.name, sample.labels["sink"]): sample.value
        for family in text_string_to_metric_families(render_metrics(snapshot).decode())
        for sample in family.samples
        if sample.name.startswith("rig_agent_sink_backfill")
    }
    assert samples == {
        ("rig_agent_sink_backfill_readings", "mqtt"): 30_000,
        ("rig_agent_sink_backfill_readings", "cloud"): 500,
        ("rig_agent_sink_backfill_oldest_age_seconds", "mqtt"): 362.0,
        ("rig_agent_sink_backfill_oldest_age_seconds", "cloud"): 0.0,
        ("rig_agent_sink_backfill_drain_estimate_seconds", "mqtt"): 10.0,
    }
