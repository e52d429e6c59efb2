"""Request bodies of `POST /v1/readings`: gzip decoding with a size limit, JSON and validation."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import zlib
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict

__all__ = [
    "NAME_PATTERN",
    "IngestRejected",
    "ReadingBatch",
    "ReadingIn",
    "body_too_large",
    "decode_body",
    "parse_batch",
]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""Device and rig ids: the same pattern the agent's config enforces."""
MAX_SEQ = 2**63 - 1

_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|\+00:00)")
_STORED_FORM = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
"""YYYY-MM-DDTHH:MM:SS.ffffffZ: the form the service stores, and the one the agent sends."""


class IngestRejected(Exception):
    """A request the service rejects with a 4xx status other than 401.

    `reason` is a short code for counting; `detail` goes into the JSON body as is.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str | dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail if isinstance(detail, str) else detail.get("message", reason))
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers


def _utc_timestamp(value: str) -> str:
    """Check an RFC 3339 UTC timestamp and return it as YYYY-MM-DDTHH:MM:SS.ffffffZ."""
    # Fast path: a timestamp already in the stored form needs only its date and time
    # of day checked. Readings of one poll share that second, so the check is cached.
    if _STORED_FORM.fullmatch(value) and _is_real_second(value[:19]):
        return value
    if not _RFC3339_UTC.fullmatch(value):
        msg = "expected RFC 3339 UTC with at most 6 fractional digits, like 2024-05-01T12:00:00.5Z"
        raise ValueError(msg)
    parsed = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return f"{parsed:%Y-%m-%dT%H:%M:%S.%f}Z"


@functools.lru_cache(maxsize=4096)
def _is_real_second(text: str) -> bool:
    """Return whether YYYY-MM-DDTHH:MM:SS is a real date and time (not 2024-02-30 or 24:00:00)."""
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


@with_config(ConfigDict(allow_inf_nan=False))
class ReadingIn(TypedDict):
    """One reading as the agent sends it.

    A TypedDict rather than a model, because a batch contains thousands of
    readings: with pydantic 2.14, validating 5,000 of them from JSON into
    dicts took about half the time that model instances took.
    """

    seq: Annotated[StrictInt, Field(ge=1, le=MAX_SEQ)]
    ts: Annotated[StrictStr, AfterValidator(_utc_timestamp)]
    channel: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    value: Annotated[float | None, Field(strict=True)]
    """Required, but null for a reading that marks a channel going bad; NaN and ±inf are invalid."""
    unit: Annotated[StrictStr, Field(max_length=64)]
    quality: Literal["good", "uncertain", "bad"]


class ReadingBatch(BaseModel):
    """The body of `POST /v1/readings`."""

    device_id: StrictStr = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    rig_id: StrictStr = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)
    readings: list[ReadingIn] = Field(min_length=1)


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo `Content-Encoding` (gzip or identity) without producing more than `limit` bytes."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return raw
    if codings not in (["gzip"], ["x-gzip"]):
        msg = f"Content-Encoding {content_encoding!r} is not supported: send gzip or no encoding"
        raise IngestRejected(415, "unsupported_encoding", msg)
    return _gunzip(raw, limit)


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress every gzip member, stopping as soon as the output would pass `limit`."""
    out = bytearray()
    try:
        while data:
            member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            # max_length is at least 1 here: zero would mean "no limit" to zlib.
            out += member.decompress(data, limit + 1 - len(out))
            if len(out) > limit or member.unconsumed_tail:
                raise body_too_large(limit)
            if not member.eof:
                msg = "body is truncated gzip: send the whole compressed body"
                raise IngestRejected(400, "invalid_gzip", msg)
            data = member.unused_data
    except zlib.error as exc:
        msg = f"body is not valid gzip ({exc}) although Content-Encoding is gzip"
        raise IngestRejected(400, "invalid_gzip", msg) from exc
    return bytes(out)


def body_too_large(limit: int) -> IngestRejected:
    msg = f"request body is larger than {limit} bytes (decompressed): send smaller batches"
    return IngestRejected(413, "body_too_large", {"message": msg, "limit": limit})


def parse_batch(
    raw: bytes, content_encoding: str | None, *, limit: int, device_id: str
) -> ReadingBatch:
    """Decode, parse and validate a readings body sent by the authenticated `device_id`.

    Raises IngestRejected: 400 for a body that is not gzip or JSON, 413 above
    `limit`, 403 for another device's batch, and 422 for a failed validation,
    naming the index and seq of the first invalid reading.
    """
    if len(raw) > limit:
        raise body_too_large(limit)
    body = decode_body(raw, content_encoding, limit)
    try:
        # The usual case: pydantic parses and validates the whole body in one call.
        batch = ReadingBatch.model_validate_json(body)
    except ValidationError:
        batch = _parse_rejected(body, device_id)
    _check_device(batch.device_id, device_id)
    return batch


def _parse_rejected(body: bytes, device_id: str) -> ReadingBatch:
    """Parse and validate a body that `model_validate_json` rejected, raising the matching error.

    json.loads separates a broken body (400) from an invalid batch (422) and
    provides the seq to name. It also reads the rare bodies that pydantic's
    parser rejects, such as UTF-16 or a leading byte order mark, so those pass.
    """
    try:
        # json.loads accepts NaN and Infinity, so such a value reaches validation
        # and is reported as one invalid reading rather than a broken body.
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        msg = f"body is not JSON ({exc}): send a JSON object, optionally gzip-compressed"
        raise IngestRejected(400, "invalid_json", msg) from exc

    claimed = document.get("device_id") if isinstance(document, dict) else None
    if isinstance(claimed, str):
        _check_device(claimed, device_id)
    try:
        return ReadingBatch.model_validate(document)
    except ValidationError as exc:
        raise _invalid(document, exc) from exc


def _check_device(claimed: str, device_id: str) -> None:
    """Raise 403 for a batch whose device_id is not the authenticated device's."""
    if claimed != device_id:
        msg = f"body device_id {claimed!r} does not match the token's sub {device_id!r}"
        raise IngestRejected(403, "device_mismatch", msg)


def _invalid(document: Any, exc: ValidationError) -> IngestRejected:
    """Build the 422 for a failed validation, pointing at the first invalid reading."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    reading_errors = [
        e
        for e in errors
        if len(e["loc"]) >= 2 and e["loc"][0] == "readings" and isinstance(e["loc"][1], int)
    ]
    envelope_errors = [e for e in errors if e not in reading_errors]
    if envelope_errors or not reading_errors:
        detail: dict[str, Any] = {
            "message": "batch envelope is invalid: expected device_id, rig_id and readings",
            "index": None,
            "seq": None,
            "errors": _plain(envelope_errors or errors),
        }
        return IngestRejected(422, "invalid_batch", detail)

    index = min(int(e["loc"][1]) for e in reading_errors)
    reading = document["readings"][index]
    seq = reading.get("seq") if isinstance(reading, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool):
        seq = None
    first = [e for e in reading_errors if e["loc"][1] == index]
    fields = ", ".join(str(e["loc"][2]) if len(e["loc"]) > 2 else "reading" for e in first)
    detail = {
        "message": f"reading at index {index} (seq {seq}) is invalid: {fields}",
        "index": index,
        "seq": seq,
        "errors": _plain(first),
    }
    return IngestRejected(422, "invalid_reading", detail)


def _plain(errors: list[Any]) -> list[dict[str, Any]]:
    """Reduce pydantic errors to JSON-safe loc, msg and type."""
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
