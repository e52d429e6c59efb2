"""Shared fixtures: real peers started on loopback for each test that requests them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import Mosquitto


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A private mosquitto on a free 127.0.0.1 port, stopped after the test."""
    broker = Mosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
