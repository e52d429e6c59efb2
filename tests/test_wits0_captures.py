"""The real WITS0 captures, decoded end to end into readings with the default mapping."""

from __future__ import annotations

from config.model import Wits0Source
from drivers.wits0 import Wits0Counters, packet_readings
from drivers.wits0_parser import Wits0Parser
from tests.test_wits0_parser import capture

RECEIVED_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def decode(name: str) -> tuple[list[list[tuple[str, float | None, str]]], Wits0Counters]:
    source = Wits0Source.model_validate({"name": "edr", "url": "tcp://127.0.0.1:5000"})
    counters = Wits0Counters()
    packets = Wits0Parser().feed(capture(name))
    out = []
    for packet in packets:
        readings = packet_readings(source, packet, RECEIVED_US, counters)
        out.append([(r.channel, r.value, r.unit) for r in readings])
    return out, counters


def test_pason_first_packet_readings() -> None:
    """The first Pason packet maps to record 01 mnemonics with metric units, sentinels dropped."""
    packets, _ = decode("pason_edr_capture_from_flogo_test.wits")
    first = dict((channel, (value, unit)) for channel, value, unit in packets[0])
    assert first["DBTM"] == (5871.95, "m")
    assert first["DMEA"] == (5893.0, "m")
    assert first["BPOS"] == (110.0, "m")
    assert first["HKLX"] == (44.38, "kdaN")
    assert first["TVA"] == (718.42, "m3")
    assert first["STKC"] == (4483.0, "")
    assert first["wits_0169"] == (5896.69, "")
    assert first["wits_0171"] == (-4066.4, "")
    for dropped in ("SPM3", "DRTM", "GASA", "SPR1", "wits_0172", "wits_0173"):
        assert dropped not in first, dropped


def test_pason_sentinels_counted() -> None:
    """Each sentinel value is counted per channel instead of becoming a reading."""
    packets, counters = decode("pason_edr_capture_from_flogo_test.wits")
    assert counters.null_values["DRTM"] >= 2
    assert counters.null_values["SPM3"] >= 2
    assert all(value is not None for packet in packets for _, value, _ in packet)


def test_witskit_capture_readings() -> None:
    """Every packet of the WitsKit sample yields readings, none of them null."""
    packets, counters = decode("witskit_sample_comprehensive.wits")
    assert len(packets) >= 2
    assert all(packet for packet in packets)
    assert all(value is not None for packet in packets for _, value, _ in packet)
    assert sum(counters.null_values.values()) == 0
