"""A counting MQTT subscriber: checks every seq, sums payload bytes and measures latency."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiomqtt

from bench.common import LatencyHistogram

__all__ = ["ReadingInbox", "parse_ts_us", "subscribe"]


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_ts_us(text: str) -> int:
    """Parse an RFC 3339 UTC time such as 2024-05-01T12:00:00.123456Z to epoch microseconds."""
    delta = dt.datetime.fromisoformat(text.replace("Z", "+00:00")) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class ReadingInbox:
    """Readings messages of one rig, counted as they arrive.

    Each seq is marked in a bytearray, so a gap or a duplicate shows no
    matter the arrival order. While `measuring` is set, readings are also
    counted in `window_readings` and their latency, from the reading's `ts`
    to receipt, goes into `latency`.
    """

    def __init__(self, rig_id: str) -> None:
        # Live readings and the backlog lane's replayed readings both count.
        self.topic_prefixes = (f"rigs/{rig_id}/readings/", f"rigs/{rig_id}/backfill/")
        self._seen = bytearray()
        self.received = 0
        """Readings received, duplicates included."""
        self.duplicates = 0
        self.messages = 0
        self.payload_bytes = 0
        self.topic_bytes = 0
        self.measuring = False
        self.window_readings = 0
        self.latency = LatencyHistogram()
        self.unique = 0
        """Distinct seqs received."""
        self._arrived = asyncio.Event()

    def handle(self, topic: str, payload: bytes, received_us: int) -> None:
        """Count one message; messages of other rigs and topics are ignored."""
        if not topic.startswith(self.topic_prefixes):
            return
        body = json.loads(payload)
        readings = body["readings"]
        self.messages += 1
        self.payload_bytes += len(payload)
        self.topic_bytes += len(topic.encode())
        self.received += len(readings)
        seen = self._seen
        ts_cache: dict[str, int] = {}
        for reading in readings:
            seq = reading["seq"]
            if seq >= len(seen):
                seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
            if seen[seq]:
                self.duplicates += 1
            else:
                seen[seq] = 1
                self.unique += 1
            if self.measuring:
                ts = reading["ts"]
                ts_us = ts_cache.get(ts)
                if ts_us is None:
                    ts_us = ts_cache[ts] = parse_ts_us(ts)
                self.latency.add((received_us - ts_us) / 1000)
        if self.measuring:
            self.window_readings += len(readings)
        self._arrived.set()

    async def wait_for_all(self, last_seq: int) -> None:
        """Wait until every seq from 1 to `last_seq` has arrived."""
        while not self.has_all(last_seq):
            self._arrived.clear()
            await self._arrived.wait()

    def has_all(self, last_seq: int) -> bool:
        """Return whether every seq from 1 to `last_seq` has arrived."""
        return self.unique >= last_seq and self.missing_count(last_seq) == 0

    def missing(self, last_seq: int, limit: int = 10) -> list[int]:
        """Return up to `limit` seqs from 1 to `last_seq` that have not arrived."""
        found: list[int] = []
        seen = self._seen
        for seq in range(1, last_seq + 1):
            if seq >= len(seen) or not seen[seq]:
                found.append(seq)
                if len(found) >= limit:
                    break
        return found

    def missing_count(self, last_seq: int) -> int:
        """Return how many seqs from 1 to `last_seq` have not arrived."""
        return last_seq - self._seen[1 : last_seq + 1].count(1)

    def beyond(self, last_seq: int) -> int:
        """Return how many distinct seqs above `last_seq` arrived (none should)."""
        return self._seen[last_seq + 1 :].count(1)


@asynccontextmanager
async def subscribe(port: int, inboxes: list[ReadingInbox]) -> AsyncIterator[None]:
    """Subscribe to every rig's readings and backfill with QoS 1; feed each message to the inboxes.

    The list may change while subscribed: a message goes to the inboxes in it on arrival.
    """
    connected = asyncio.Event()
    failure: list[BaseException] = []

    async def listen() -> None:
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-sub-{port}") as client:
                await client.subscribe("rigs/+/readings/#", qos=1)
                await client.subscribe("rigs/+/backfill/#", qos=1)
                connected.set()
                async for message in client.messages:
                    received_us = time.time_ns() // 1000
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    for inbox in inboxes:
                        inbox.handle(str(message.topic), bytes(payload), received_us)
        except aiomqtt.MqttError as exc:
            failure.append(exc)
            connected.set()

    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await connected.wait()
        if failure:
            message = f"subscriber on 127.0.0.1:{port} failed: {failure[0]}"
            raise RuntimeError(message)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if failure:
        message = f"subscriber on 127.0.0.1:{port} lost its connection: {failure[0]}"
        raise RuntimeError(message)
