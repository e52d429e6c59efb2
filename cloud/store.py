"""SQLite storage of the ingest service: readings unique per (device_id, seq), logs, counters.

The WITSML tables and queries live in `cloud.witsml_store`; this module runs them on its thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from cloud import witsml_store
from cloud.ingest import ReadingIn
from cloud.witsml_store import StoredLog, WitsmlResult
from uplink.witsml_doc import ParsedLog

__all__ = ["NO_DEVICE", "BatchResult", "ReadingStore"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

NO_DEVICE = ""
"""Device id under which requests rejected before authentication are counted."""

_SCHEMA = """
-- Without a rowid the key (device_id, seq) is the table itself, so an insert
-- updates one B-tree rather than a table and a separate unique index.
CREATE TABLE IF NOT EXISTS readings (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    rig_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    channel TEXT NOT NULL,
    value REAL,
    unit TEXT NOT NULL,
    quality TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rejections (
    device_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (device_id, reason)
);
CREATE TABLE IF NOT EXISTS backfill (
    device_id TEXT PRIMARY KEY,
    batches INTEGER NOT NULL,
    readings INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    device_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    PRIMARY KEY (device_id, idempotency_key)
);
"""

_COUNT_REQUEST = """
INSERT INTO devices (device_id, requests, duplicates) VALUES (?, 1, ?)
ON CONFLICT (device_id) DO UPDATE SET
    requests = requests + 1, duplicates = duplicates + excluded.duplicates
"""

_RECORD_BATCH = """
INSERT INTO batches VALUES (?, ?, 1, ?, ?, ?, ?)
ON CONFLICT (device_id, idempotency_key) DO UPDATE SET
    deliveries = deliveries + 1,
    accepted = accepted + excluded.accepted,
    duplicates = duplicates + excluded.duplicates,
    last_received = excluded.last_received
"""


_COUNT_BACKFILL = """
INSERT INTO backfill (device_id, batches, readings) VALUES (?, 1, ?)
ON CONFLICT (device_id) DO UPDATE SET
    batches = batches + 1, readings = readings + excluded.readings
"""


@dataclass(frozen=True)
class BatchResult:
    """How many readings of a batch were new and how many were stored already."""

    accepted: int
    duplicates: int


class ReadingStore:
    """The service's SQLite database, used from one dedicated thread.

    An sqlite3 connection must stay on the thread that created it. So every
    call goes to a single-thread executor that owns the connection, and the
    event loop only awaits the result.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Create the executor, open the database in WAL mode and create the tables."""
        if self._executor is not None:
            msg = f"store {self.path} is already open"
            raise RuntimeError(msg)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-sqlite")
        await self._call(self._open)
        log.info("store_opened", path=self.path)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._call(self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def add_batch(
        self,
        device_id: str,
        rig_id: str,
        readings: Sequence[ReadingIn],
        idempotency_key: str,
        *,
        backfill: bool = False,
    ) -> BatchResult:
        """Store the new readings of a batch; count the ones already stored as duplicates.

        A `backfill` batch, one the device marked as part of its backlog, is also
        counted with its readings in the device's backfill figures.
        """
        return await self._call(
            self._add_batch, device_id, rig_id, readings, idempotency_key, backfill
        )

    async def count_rejection(self, device_id: str, reason: str) -> None:
        """Count a rejected request; `device_id` is NO_DEVICE when authentication failed."""
        await self._call(self._count_rejection, device_id, reason)

    async def stats(self) -> dict[str, Any]:
        """Return the counters per device and for unauthenticated requests."""
        return await self._call(self._stats)

    async def readings(self, device_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Return up to `limit` stored readings of a device with seq above `after_seq`, by seq."""
        return await self._call(self._readings, device_id, after_seq, limit)

    async def add_witsml(
        self, device_id: str, idempotency_key: str, body: bytes, logs: Sequence[ParsedLog]
    ) -> WitsmlResult:
        """Merge the logs of a checked WITSML document and keep its body, in one transaction.

        Raises WitsmlConflict, storing nothing, when the document does not fit a stored log.
        """
        return await self._call(self._add_witsml, device_id, idempotency_key, body, logs)

    async def witsml_logs(self) -> list[dict[str, Any]]:
        """Return uid, well and wellbore uids, name and row count of every stored log."""
        return await self._call(self._witsml, witsml_store.list_logs)

    async def witsml_log(self, uid: str) -> StoredLog | None:
        """Return one stored log with all its rows, or None for an unknown uid."""
        return await self._call(self._witsml, witsml_store.read_log, uid)

    async def witsml_documents(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        """Return up to `limit` received WITSML documents with id above `after_id`, by id."""
        return await self._call(self._witsml, witsml_store.document_page, after_id, limit)

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            msg = f"store {self.path} is not open: call open() first"
            raise RuntimeError(msg)
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    # The methods below run on the store's thread only.

    def _open(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        # A 200 moves the agent's cursor past these readings, so they must be on disk first.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        conn.executescript(witsml_store.SCHEMA)
        self._conn = conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            msg = f"store {self.path} is not open: call open() first"
            raise RuntimeError(msg)
        return self._conn

    def _add_batch(
        self,
        device_id: str,
        rig_id: str,
        readings: Sequence[ReadingIn],
        idempotency_key: str,
        backfill: bool,
    ) -> BatchResult:
        conn = self._db()
        rows = [
            (
                device_id,
                r["seq"],
                rig_id,
                r["ts"],
                r["channel"],
                r["value"],
                r["unit"],
                r["quality"],
            )
            for r in readings
        ]
        now = time.time()
        with conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            accepted = conn.total_changes - before
            duplicates = len(rows) - accepted
            conn.execute(_COUNT_REQUEST, (device_id, duplicates))
            if idempotency_key:
                conn.execute(
                    _RECORD_BATCH, (device_id, idempotency_key, accepted, duplicates, now, now)
                )
            if backfill:
                conn.execute(_COUNT_BACKFILL, (device_id, len(rows)))
        return BatchResult(accepted, duplicates)

    def _add_witsml(
        self, device_id: str, idempotency_key: str, body: bytes, logs: Sequence[ParsedLog]
    ) -> WitsmlResult:
        conn = self._db()
        with conn:
            result = witsml_store.add_document(
                conn, device_id, idempotency_key, body, logs, time.time()
            )
            conn.execute(_COUNT_REQUEST, (device_id, 0))
        return result

    def _witsml(self, query: Callable[..., T], *args: Any) -> T:
        return query(self._db(), *args)

    def _count_rejection(self, device_id: str, reason: str) -> None:
        conn = self._db()
        with conn:
            if device_id != NO_DEVICE:
                conn.execute(_COUNT_REQUEST, (device_id, 0))
            conn.execute(
                "INSERT INTO rejections VALUES (?, ?, 1) "
                "ON CONFLICT (device_id, reason) DO UPDATE SET count = count + 1",
                (device_id, reason),
            )

    def _stats(self) -> dict[str, Any]:
        conn = self._db()
        devices: dict[str, dict[str, Any]] = {}

        def device(device_id: str) -> dict[str, Any]:
            return devices.setdefault(device_id, _empty_device_stats())

        for device_id, requests, duplicates in conn.execute("SELECT * FROM devices"):
            device(device_id).update(requests=requests, duplicates=duplicates)
        for device_id, count, min_seq, max_seq in conn.execute(
            "SELECT device_id, COUNT(*), MIN(seq), MAX(seq) FROM readings GROUP BY device_id"
        ):
            device(device_id).update(readings=count, min_seq=min_seq, max_seq=max_seq)
        for device_id, batches, retried in conn.execute(
            "SELECT device_id, COUNT(*), SUM(deliveries > 1) FROM batches GROUP BY device_id"
        ):
            device(device_id).update(batches=batches, retried_batches=retried)
        for device_id, batches, readings in conn.execute("SELECT * FROM backfill"):
            device(device_id).update(backfill_batches=batches, backfill_readings=readings)

        unauthenticated: dict[str, int] = {}
        for device_id, reason, count in conn.execute("SELECT * FROM rejections"):
            if device_id == NO_DEVICE:
                unauthenticated[reason] = count
            else:
                device(device_id)["rejected"][reason] = count
        return {"devices": devices, "unauthenticated": {"rejected": unauthenticated}}

    def _readings(self, device_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
        cursor = self._db().execute(
            "SELECT seq, rig_id, ts, channel, value, unit, quality FROM readings "
            "WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (device_id, after_seq, limit),
        )
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]


def _empty_device_stats() -> dict[str, Any]:
    return {
        "readings": 0,
        "duplicates": 0,
        "min_seq": None,
        "max_seq": None,
        "requests": 0,
        "batches": 0,
        "retried_batches": 0,
        "backfill_batches": 0,
        "backfill_readings": 0,
        "rejected": {},
    }
