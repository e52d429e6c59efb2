"""SQLite tables and queries for WITSML logs: headers, curves, merged rows and raw documents.

Every function takes the store's connection and runs on the store's thread.
A log is keyed by its uid. Its rows are keyed by the UTC instant of their
index, so one instant written as `Z` and as `+01:00` is one row, and each
value by (log uid, instant, mnemonic). Nulls are not stored: a null never
replaces a stored value, and a value replaces the one stored before it.
"""

from __future__ import annotations

import base64
import datetime as dt
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uplink.witsml_doc import INDEX_MNEMONIC, Curve, LogHeader, ParsedLog

__all__ = [
    "SCHEMA",
    "StoredLog",
    "WitsmlConflict",
    "WitsmlResult",
    "add_document",
    "document_page",
    "list_logs",
    "read_log",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS witsml_logs (
    uid TEXT PRIMARY KEY,
    uid_well TEXT NOT NULL,
    uid_wellbore TEXT NOT NULL,
    name_well TEXT NOT NULL,
    name_wellbore TEXT NOT NULL,
    name TEXT NOT NULL,
    null_value TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS witsml_curves (
    log_uid TEXT NOT NULL,
    position INTEGER NOT NULL,
    mnemonic TEXT NOT NULL,
    unit TEXT NOT NULL,
    uid TEXT NOT NULL,
    description TEXT NOT NULL,
    PRIMARY KEY (log_uid, mnemonic),
    UNIQUE (log_uid, uid)
);
CREATE TABLE IF NOT EXISTS witsml_rows (
    log_uid TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    PRIMARY KEY (log_uid, ts_us)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS witsml_values (
    log_uid TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    mnemonic TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (log_uid, ts_us, mnemonic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS witsml_documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    received_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS witsml_documents_by_key
    ON witsml_documents (device_id, idempotency_key);
"""

_MERGE_VALUE = """
INSERT INTO witsml_values VALUES (?, ?, ?, ?)
ON CONFLICT (log_uid, ts_us, mnemonic) DO UPDATE SET value = excluded.value
"""


class WitsmlConflict(Exception):
    """A valid document that does not fit the stored log, such as a changed curve unit.

    `mnemonic` names the curve at fault, or is None when the log header is.
    """

    def __init__(self, message: str, *, log_uid: str, mnemonic: str | None = None) -> None:
        super().__init__(message)
        self.log_uid = log_uid
        self.mnemonic = mnemonic


@dataclass(frozen=True)
class WitsmlResult:
    """The outcome of one accepted document."""

    rows: int
    """Rows in the document, over all its logs."""
    new_rows: int
    """Index instants the service had not stored for that log before."""
    duplicate: bool
    """The device sent this Idempotency-Key before."""


@dataclass(frozen=True)
class StoredLog:
    """A stored log as build_document takes it: rows carry the stored value text."""

    header: LogHeader
    curves: tuple[Curve, ...]
    rows: tuple[tuple[int, tuple[str | None, ...]], ...]


def add_document(
    conn: sqlite3.Connection,
    device_id: str,
    idempotency_key: str,
    body: bytes,
    logs: Sequence[ParsedLog],
    now: float,
) -> WitsmlResult:
    """Merge the logs of a checked document and keep its body, inside the caller's transaction.

    Raises WitsmlConflict when a log changes its well, wellbore or null value,
    a curve changes its unit, a new curve reuses a stored curve's uid, or a data
    curve is named like the index. Part of the document may be written by then,
    so the caller must roll its transaction back.
    """
    duplicate = False
    if idempotency_key:
        seen = conn.execute(
            "SELECT 1 FROM witsml_documents WHERE device_id = ? AND idempotency_key = ? LIMIT 1",
            (device_id, idempotency_key),
        ).fetchone()
        duplicate = seen is not None

    rows = 0
    new_rows = 0
    for parsed in logs:
        _merge_header(conn, parsed, device_id, now)
        rows += len(parsed.rows)
        new_rows += _merge_rows(conn, parsed)
    conn.execute(
        "INSERT INTO witsml_documents (device_id, idempotency_key, received_at, body) "
        "VALUES (?, ?, ?, ?)",
        (device_id, idempotency_key, now, body),
    )
    return WitsmlResult(rows=rows, new_rows=new_rows, duplicate=duplicate)


def _merge_header(conn: sqlite3.Connection, parsed: ParsedLog, device_id: str, now: float) -> None:
    """Create the log or check the document against it, then add curves it does not have yet."""
    header = parsed.header
    uid = header.log_uid
    for curve in parsed.curves:
        if curve.mnemonic.upper() == INDEX_MNEMONIC:
            msg = (
                f"log {uid!r}: data curve mnemonic {curve.mnemonic!r} is the name of the index "
                f"curve {INDEX_MNEMONIC}: rename the data curve"
            )
            raise WitsmlConflict(msg, log_uid=uid, mnemonic=curve.mnemonic)

    stored = conn.execute(
        "SELECT uid_well, uid_wellbore, null_value FROM witsml_logs WHERE uid = ?", (uid,)
    ).fetchone()
    if stored is None:
        conn.execute(
            "INSERT INTO witsml_logs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                uid,
                header.well_uid,
                header.wellbore_uid,
                header.well_name,
                header.wellbore_name,
                header.log_name,
                header.null_value,
                device_id,
                now,
                now,
            ),
        )
    else:
        _check_header(header, stored)
        # Names may change over a log's life, so the latest document's names are kept.
        conn.execute(
            "UPDATE witsml_logs SET name_well = ?, name_wellbore = ?, name = ?, updated_at = ? "
            "WHERE uid = ?",
            (header.well_name, header.wellbore_name, header.log_name, now, uid),
        )

    known = {
        mnemonic: (unit, curve_uid)
        for mnemonic, unit, curve_uid in conn.execute(
            "SELECT mnemonic, unit, uid FROM witsml_curves WHERE log_uid = ?", (uid,)
        )
    }
    owners = {curve_uid: mnemonic for mnemonic, (_, curve_uid) in known.items()}
    position = len(known)
    for curve in parsed.curves:
        if curve.mnemonic in known:
            unit = known[curve.mnemonic][0]
            if curve.unit != unit:
                msg = (
                    f"log {uid!r}: curve {curve.mnemonic} has unit {curve.unit!r} but the "
                    f"stored log has {unit!r}: send the stored unit, or use a new mnemonic "
                    "for the other unit"
                )
                raise WitsmlConflict(msg, log_uid=uid, mnemonic=curve.mnemonic)
            continue
        owner = owners.get(curve.uid)
        if owner is not None:
            msg = (
                f"log {uid!r}: new curve {curve.mnemonic} has uid {curve.uid!r}, which curve "
                f"{owner} of the stored log already has: give each curve its own uid"
            )
            raise WitsmlConflict(msg, log_uid=uid, mnemonic=curve.mnemonic)
        conn.execute(
            "INSERT INTO witsml_curves VALUES (?, ?, ?, ?, ?, ?)",
            (uid, position, curve.mnemonic, curve.unit, curve.uid, curve.description),
        )
        known[curve.mnemonic] = (curve.unit, curve.uid)
        owners[curve.uid] = curve.mnemonic
        position += 1


def _check_header(header: LogHeader, stored: tuple[str, str, str]) -> None:
    uid_well, uid_wellbore, null_value = stored
    uid = header.log_uid
    if (header.well_uid, header.wellbore_uid) != (uid_well, uid_wellbore):
        msg = (
            f"log {uid!r} belongs to well {uid_well!r} and wellbore {uid_wellbore!r}, but the "
            f"document puts it in well {header.well_uid!r} and wellbore "
            f"{header.wellbore_uid!r}: send the stored uids, or use a new log uid"
        )
        raise WitsmlConflict(msg, log_uid=uid)
    if header.null_value != null_value:
        # A stored value equal to the new null value would read as a null afterwards.
        msg = (
            f"log {uid!r} has nullValue {null_value!r}, but the document has "
            f"{header.null_value!r}: keep the null value of an existing log, or use a new log uid"
        )
        raise WitsmlConflict(msg, log_uid=uid)


def _merge_rows(conn: sqlite3.Connection, parsed: ParsedLog) -> int:
    """Store the rows of one log and return how many index instants were new."""
    uid = parsed.header.log_uid
    mnemonics = [curve.mnemonic for curve in parsed.curves]
    before = conn.total_changes
    conn.executemany(
        "INSERT OR IGNORE INTO witsml_rows VALUES (?, ?)",
        [(uid, ts_us) for ts_us, _ in parsed.rows],
    )
    new_rows = conn.total_changes - before
    conn.executemany(
        _MERGE_VALUE,
        [
            (uid, ts_us, mnemonic, value)
            for ts_us, values in parsed.rows
            for mnemonic, value in zip(mnemonics, values, strict=True)
            if value is not None and value != ""
        ],
    )
    return new_rows


def list_logs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Return uid, well and wellbore uids, name and row count of every log, by uid."""
    cursor = conn.execute(
        "SELECT uid, uid_well, uid_wellbore, name, "
        "(SELECT COUNT(*) FROM witsml_rows WHERE log_uid = uid) AS rows "
        "FROM witsml_logs ORDER BY uid"
    )
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def read_log(conn: sqlite3.Connection, uid: str) -> StoredLog | None:
    """Return a stored log with its curves in the order they were added, or None."""
    stored = conn.execute(
        "SELECT uid_well, name_well, uid_wellbore, name_wellbore, name, null_value "
        "FROM witsml_logs WHERE uid = ?",
        (uid,),
    ).fetchone()
    if stored is None:
        return None
    uid_well, name_well, uid_wellbore, name_wellbore, name, null_value = stored
    header = LogHeader(
        well_uid=uid_well,
        well_name=name_well,
        wellbore_uid=uid_wellbore,
        wellbore_name=name_wellbore,
        log_uid=uid,
        log_name=name,
        null_value=null_value,
    )
    curves = tuple(
        Curve(mnemonic=mnemonic, unit=unit, uid=curve_uid, description=description)
        for mnemonic, unit, curve_uid, description in conn.execute(
            "SELECT mnemonic, unit, uid, description FROM witsml_curves "
            "WHERE log_uid = ? ORDER BY position",
            (uid,),
        )
    )
    column_of = {curve.mnemonic: index for index, curve in enumerate(curves)}
    values: dict[int, list[str | None]] = {
        ts_us: [None] * len(curves)
        for (ts_us,) in conn.execute(
            "SELECT ts_us FROM witsml_rows WHERE log_uid = ? ORDER BY ts_us", (uid,)
        )
    }
    for ts_us, mnemonic, value in conn.execute(
        "SELECT ts_us, mnemonic, value FROM witsml_values WHERE log_uid = ?", (uid,)
    ):
        values[ts_us][column_of[mnemonic]] = value
    rows = tuple((ts_us, tuple(row)) for ts_us, row in values.items())
    return StoredLog(header=header, curves=curves, rows=rows)


def document_page(conn: sqlite3.Connection, after_id: int, limit: int) -> list[dict[str, Any]]:
    """Return up to `limit` received documents with id above `after_id`, bodies in base64."""
    cursor = conn.execute(
        "SELECT id, device_id, idempotency_key, received_at, body FROM witsml_documents "
        "WHERE id > ? ORDER BY id LIMIT ?",
        (after_id, limit),
    )
    return [
        {
            "id": document_id,
            "device_id": device_id,
            "idempotency_key": idempotency_key,
            "received_at": _rfc3339(received_at),
            "body_base64": base64.b64encode(body).decode("ascii"),
        }
        for document_id, device_id, idempotency_key, received_at, body in cursor
    ]


def _rfc3339(epoch_s: float) -> str:
    return f"{dt.datetime.fromtimestamp(epoch_s, dt.UTC):%Y-%m-%dT%H:%M:%S.%f}Z"
