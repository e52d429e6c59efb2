"""WITSML 1.4.1.1 log upload and queries of the reference service.

`POST /v1/witsml/logs` takes a `<logs>` document, checks it with the same
server rules as `rig-agent witsml validate`, merges its rows into the stored
logs and keeps the body as received (after gzip decoding). The GET routes
return the stored logs as WITSML documents and the raw bodies, for tests and
demos. Like the readings query, they need no device token.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from lxml import etree  # type: ignore[import-untyped]
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from cloud.faults import FaultPlan
from cloud.ingest import IngestRejected, body_too_large, decode_body
from cloud.service import (
    BEARER,
    ServiceDep,
    error_response,
    injected,
    read_body,
    start_upload,
)
from cloud.witsml_store import StoredLog, WitsmlConflict
from uplink.witsml_doc import (
    WITSML_NS,
    ParsedLog,
    Problem,
    Row,
    build_document,
    check_log_document,
    format_time,
    parse_log_documents,
    parse_time,
)

__all__ = ["MAX_DOCUMENT_PAGE", "LogUpload", "parse_log_upload", "witsml_router"]

log = structlog.get_logger(__name__)

XML_MEDIA_TYPES = ("application/xml", "text/xml")
MAX_DOCUMENT_PAGE = 1000
"""Maximum number of documents that `GET /v1/witsml/documents` returns in one page."""

witsml_router = APIRouter(tags=["witsml"])


class WitsmlIngestResult(BaseModel):
    """Response body for an accepted WITSML document."""

    rows: int
    """Rows in the document, over all its logs."""
    new_rows: int
    """Rows whose index instant the service had not stored for that log before."""
    duplicate: bool
    """The device sent this Idempotency-Key before. The document is merged again all the same."""


class WitsmlLogSummary(BaseModel):
    """One stored log."""

    uid: str
    uid_well: str
    uid_wellbore: str
    name: str
    rows: int


class WitsmlLogList(BaseModel):
    """Body of `GET /v1/witsml/logs`."""

    logs: list[WitsmlLogSummary]


class ReceivedDocument(BaseModel):
    """One accepted request body, decompressed, in base64."""

    id: int
    device_id: str
    idempotency_key: str
    received_at: str
    """RFC 3339 UTC time the service stored the document."""
    body_base64: str


class ReceivedDocumentPage(BaseModel):
    """Body of `GET /v1/witsml/documents`."""

    documents: list[ReceivedDocument]
    next_after_id: int | None
    """The `after_id` of the next page, or null when this page is the last."""


@dataclass(frozen=True)
class LogUpload:
    """A decoded WITSML document that passed the server rules, with its parsed logs."""

    body: bytes
    logs: list[ParsedLog]

    def row_times(self) -> list[int]:
        return [ts_us for parsed in self.logs for ts_us, _ in parsed.rows]


def parse_log_upload(raw: bytes, content_encoding: str | None, *, limit: int) -> LogUpload:
    """Decode, check and parse an upload body.

    Raises IngestRejected with 400 for a body that is not gzip although
    Content-Encoding is gzip, and 413 above `limit` bytes, before or after
    decompression. Another Content-Encoding gets 415. A document that breaks
    the server rules gets 422 with every problem found (line and message).
    """
    if len(raw) > limit:
        raise body_too_large(limit)
    body = decode_body(raw, content_encoding, limit)
    problems = check_log_document(body)
    if problems:
        raise invalid_document(problems)
    try:
        logs = parse_log_documents(body)
    except ValueError as exc:
        raise invalid_document([Problem(line=None, message=str(exc))]) from exc
    upload = LogUpload(body=body, logs=logs)
    _check_finite(upload)
    return upload


def invalid_document(
    problems: Sequence[Problem], reason: str = "invalid_document"
) -> IngestRejected:
    """Build the 422 that lists `problems`, with a message naming their count and the first."""
    first = problems[0]
    where = f"line {first.line}: " if first.line is not None else ""
    count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
    detail: dict[str, Any] = {
        "message": f"WITSML document rejected with {count}, the first at {where}{first.message}",
        "problems": [{"line": p.line, "message": p.message} for p in problems],
    }
    return IngestRejected(422, reason, detail)


def _check_finite(upload: LogUpload) -> None:
    """Reject values that float() reads but that overflow to infinity, such as 1e999."""
    problems: list[Problem] = []
    lines: DocumentLines | None = None
    for parsed in upload.logs:
        for ts_us, values in parsed.rows:
            for curve, value in zip(parsed.curves, values, strict=True):
                if value is None or value == "" or _finite(value):
                    continue
                lines = lines or DocumentLines(upload.body)
                message = (
                    f"log {parsed.header.log_uid!r}: value {value!r} of curve {curve.mnemonic} "
                    f"at {format_time(ts_us)} is not a finite number: send a finite number "
                    "or the null value"
                )
                problems.append(Problem(lines.row(parsed.header.log_uid, ts_us), message))
    if problems:
        raise invalid_document(problems)


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class DocumentLines:
    """Line numbers of the logs, curves and rows of a document, for error messages."""

    def __init__(self, body: bytes) -> None:
        self._logs: dict[str, int] = {}
        self._curves: dict[tuple[str, str], int] = {}
        self._rows: dict[tuple[str, int], int] = {}
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
        try:
            root = etree.fromstring(body, parser)
        except etree.XMLSyntaxError:
            return  # not expected: check_log_document parsed the same bytes already
        for element in root.iter(f"{{{WITSML_NS}}}log"):
            self._add_log(element)

    def log(self, log_uid: str) -> int | None:
        return self._logs.get(log_uid)

    def curve(self, log_uid: str, mnemonic: str) -> int | None:
        return self._curves.get((log_uid, mnemonic), self.log(log_uid))

    def row(self, log_uid: str, ts_us: int) -> int | None:
        return self._rows.get((log_uid, ts_us), self.log(log_uid))

    def _add_log(self, element: Any) -> None:
        uid = element.get("uid") or ""
        if element.sourceline is not None:
            self._logs.setdefault(uid, element.sourceline)
        for info in element.iterfind(f"{{{WITSML_NS}}}logCurveInfo"):
            mnemonic = (info.findtext(f"{{{WITSML_NS}}}mnemonic") or "").strip()
            if info.sourceline is not None:
                self._curves.setdefault((uid, mnemonic), info.sourceline)
        delimiter = element.findtext(f"{{{WITSML_NS}}}dataDelimiter") or ","
        for data in element.iterfind(f"{{{WITSML_NS}}}logData/{{{WITSML_NS}}}data"):
            index = (data.text or "").split(delimiter, 1)[0].strip()
            try:
                ts_us = parse_time(index)
            except ValueError:
                continue
            if data.sourceline is not None:
                self._rows.setdefault((uid, ts_us), data.sourceline)


def _check_rejected_time(faults: FaultPlan, upload: LogUpload) -> None:
    ts_us = faults.take_rejected_time(upload.row_times())
    if ts_us is None:
        return
    lines = DocumentLines(upload.body)
    parsed = next(p for p in upload.logs if any(t == ts_us for t, _ in p.rows))
    message = f"row at {format_time(ts_us)} rejected by an injected fault"
    problem = Problem(lines.row(parsed.header.log_uid, ts_us), message)
    raise invalid_document([problem], reason="injected_fault")


def _conflict(exc: WitsmlConflict, body: bytes) -> IngestRejected:
    lines = DocumentLines(body)
    if exc.mnemonic is None:
        line = lines.log(exc.log_uid)
    else:
        line = lines.curve(exc.log_uid, exc.mnemonic)
    return invalid_document([Problem(line, str(exc))], reason="log_conflict")


def _check_media_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in XML_MEDIA_TYPES:
        msg = f"Content-Type {content_type!r} is not supported: send application/xml"
        raise IngestRejected(415, "unsupported_media_type", msg)


@witsml_router.post(
    "/v1/witsml/logs",
    response_model=WitsmlIngestResult,
    dependencies=[Depends(BEARER)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A WITSML 1.4.1.1 <logs> document, plain or with Content-Encoding: gzip",
            "content": {"application/xml": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={
        400: {"description": "Body not gzip although Content-Encoding says so"},
        401: {"description": "Bearer token missing or rejected; `reason` says which check"},
        413: {"description": "Body larger than the limit after decompression"},
        415: {"description": "Content-Type other than application/xml, or encoding not gzip"},
        422: {"description": "Invalid document; `detail.problems` lists line and message"},
    },
)
async def post_witsml_log(
    request: Request,
    service: ServiceDep,
    idempotency_key: Annotated[
        str, Header(description="{device_id}:witsml:{log_uid}:{first}-{last}")
    ] = "",
    content_encoding: Annotated[str | None, Header()] = None,
    content_type: Annotated[str | None, Header()] = None,
) -> Response:
    """Merge the rows of a WITSML log document into the stored logs and keep the document."""
    start = await start_upload(service, request, "witsml")
    if isinstance(start, JSONResponse):
        return start
    claims, fault = start.claims, start.fault_after_store

    limit = service.settings.max_body_bytes
    try:
        _check_media_type(content_type)
        raw = await read_body(request, limit)
        upload = await asyncio.to_thread(parse_log_upload, raw, content_encoding, limit=limit)
        _check_rejected_time(service.faults, upload)
    except IngestRejected as exc:
        return await service.reject(claims.device_id, exc)
    except ClientDisconnect:
        # The device gave up mid-upload (it stopped, or its link dropped); it will resend.
        log.info("client_disconnected", device_id=claims.device_id)
        return Response(status_code=400)
    try:
        result = await service.store.add_witsml(
            claims.device_id, idempotency_key, upload.body, upload.logs
        )
    except WitsmlConflict as exc:
        return await service.reject(claims.device_id, _conflict(exc, upload.body))

    log.info(
        "witsml_document_stored",
        device_id=claims.device_id,
        logs=[parsed.header.log_uid for parsed in upload.logs],
        rows=result.rows,
        new_rows=result.new_rows,
        duplicate=result.duplicate,
    )
    if fault is not None:
        # The document is stored but the device hears a failure, as when a response is lost.
        return error_response(injected(fault))
    body = {"rows": result.rows, "new_rows": result.new_rows, "duplicate": result.duplicate}
    return JSONResponse(body)


@witsml_router.get("/v1/witsml/logs", response_model=WitsmlLogList)
async def get_witsml_logs(service: ServiceDep) -> dict[str, Any]:
    """List the stored logs with their well and wellbore uids and row counts."""
    return {"logs": await service.store.witsml_logs()}


@witsml_router.get(
    "/v1/witsml/logs/{uid}",
    response_class=Response,
    responses={
        200: {"content": {"application/xml": {}}, "description": "WITSML 1.4.1.1 document"},
        404: {"description": "No log with this uid"},
    },
)
async def get_witsml_log(uid: str, service: ServiceDep) -> Response:
    """Return a stored log, all rows merged, as a WITSML 1.4.1.1 document."""
    stored = await service.store.witsml_log(uid)
    if stored is None:
        detail = f"no WITSML log with uid {uid!r}: GET /v1/witsml/logs lists the stored logs"
        raise HTTPException(status_code=404, detail=detail)
    document = await asyncio.to_thread(_build_stored, stored)
    return Response(document, media_type="application/xml")


def _build_stored(stored: StoredLog) -> bytes:
    rows = [Row(ts_us=ts_us, values=values) for ts_us, values in stored.rows]
    return build_document(stored.header, stored.curves, rows)


@witsml_router.get("/v1/witsml/documents", response_model=ReceivedDocumentPage)
async def get_witsml_documents(
    service: ServiceDep,
    after_id: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_DOCUMENT_PAGE)] = 100,
) -> Response:
    """List the accepted WITSML request bodies in the order received, one page at a time."""
    documents = await service.store.witsml_documents(after_id, limit)
    next_after_id = documents[-1]["id"] if len(documents) == limit else None
    return JSONResponse({"documents": documents, "next_after_id": next_after_id})
