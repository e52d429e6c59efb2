"""WITSML logs in the reference service: upload, merge, validation, limits, faults and queries."""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lxml import etree  # type: ignore[import-untyped]

from tests.peers import CloudService
from uplink.auth import jwk_thumbprint

AUDIENCE = "rig-cloud"
NETWORK_TIMEOUT = 10
NS = "{http://www.witsml.org/schemas/1series}"
NULL = "-999.25"
T0 = "2024-05-01T06:00:00Z"
T1 = "2024-05-01T06:00:01Z"
T2 = "2024-05-01T06:00:02Z"
CURVES = (("SPPA", "psi"), ("HKLA", "klbf"))

AssertValid = Callable[[bytes], None]


# --- helpers ----------------------------------------------------------------------


def es256_token(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    now = int(time.time())
    claims = {
        "iss": device_id,
        "sub": device_id,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    kid = jwk_thumbprint(key.public_key())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def log_document(
    uid: str,
    rows: Sequence[str],
    *,
    curves: Sequence[tuple[str, str]] = CURVES,
    null_value: str = NULL,
    well_uid: str = "W-001",
    mnemonic_list: str | None = None,
    unit_list: str | None = None,
) -> bytes:
    """A time log with one `<data>` per entry of `rows` ("time,value,value"), one element a line.

    `mnemonic_list` and `unit_list` replace the lists built from `curves`.
    """
    infos = [("TIME", "s", "date time"), *((m, u, "double") for m, u in curves)]
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<logs xmlns="http://www.witsml.org/schemas/1series" version="1.4.1.1">',
        f'  <log uidWell="{well_uid}" uidWellbore="WB-001" uid="{uid}">',
        "    <nameWell>Example 1H</nameWell>",
        "    <nameWellbore>Example 1H OH</nameWellbore>",
        "    <name>Rig 07 time log</name>",
        "    <indexType>date time</indexType>",
    ]
    if rows:
        lines.append(f"    <startDateTimeIndex>{rows[0].split(',')[0]}</startDateTimeIndex>")
        lines.append(f"    <endDateTimeIndex>{rows[-1].split(',')[0]}</endDateTimeIndex>")
    lines += [
        "    <direction>increasing</direction>",
        "    <indexCurve>TIME</indexCurve>",
        f"    <nullValue>{null_value}</nullValue>",
    ]
    for mnemonic, unit, kind in infos:
        lines.append(
            f'    <logCurveInfo uid="{mnemonic}"><mnemonic>{mnemonic}</mnemonic>'
            f"<unit>{unit}</unit><typeLogData>{kind}</typeLogData></logCurveInfo>"
        )
    mnemonics = mnemonic_list or ",".join(m for m, _, _ in infos)
    units = unit_list or ",".join(u for _, u, _ in infos)
    lines += [
        "    <logData>",
        f"      <mnemonicList>{mnemonics}</mnemonicList>",
        f"      <unitList>{units}</unitList>",
        *(f"      <data>{row}</data>" for row in rows),
        "    </logData>",
        "  </log>",
        "</logs>",
    ]
    return ("\n".join(lines) + "\n").encode()


def line_of(document: bytes, needle: str, occurrence: int = 1) -> int:
    """Return the 1-based line holding the `occurrence`-th line that contains `needle`."""
    found = [n for n, line in enumerate(document.decode().splitlines(), 1) if needle in line]
    return found[occurrence - 1]


def stored_rows(document: bytes) -> dict[str, list[float | None]]:
    """Map each row's time text in a document to its values, null values as None."""
    root = etree.fromstring(document)
    log = root.find(f"{NS}log")
    assert log is not None
    null_value = log.findtext(f"{NS}nullValue")
    rows: dict[str, list[float | None]] = {}
    for data in log.iterfind(f"{NS}logData/{NS}data"):
        index, *values = (data.text or "").split(",")
        rows[index] = [None if v in (null_value, "") else float(v) for v in values]
    return rows


def mnemonics(document: bytes) -> str:
    root = etree.fromstring(document)
    return str(root.findtext(f"{NS}log/{NS}logData/{NS}mnemonicList"))


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def service(device_key: ec.EllipticCurvePrivateKey) -> Iterator[CloudService]:
    """One uvicorn child process for the module, with `device_key` registered and faults on."""
    cloud = CloudService()
    cloud.register_key(
        device_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.close()


@pytest.fixture
async def faults(service: CloudService) -> AsyncIterator[CloudService]:
    """The module's service, with every pending fault cleared after the test."""
    try:
        yield service
    finally:
        await service.clear_faults()


@pytest.fixture
def device_id() -> str:
    return f"edge-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def log_uid() -> str:
    """A log uid no other test uses."""
    return f"log-{uuid.uuid4().hex[:10]}"


class Uploader:
    """Posts WITSML documents for one device with a fresh token each time."""

    def __init__(
        self, http: httpx.AsyncClient, key: ec.EllipticCurvePrivateKey, device_id: str
    ) -> None:
        self.http = http
        self.key = key
        self.device_id = device_id

    async def post(
        self,
        body: bytes,
        *,
        key: str = "",
        gzip_body: bool = False,
        bearer: str | None = None,
        anonymous: bool = False,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST a document, signed with a fresh token unless `bearer` or `anonymous` is given."""
        sent = {"Content-Type": "application/xml"}
        if not anonymous:
            sent["Authorization"] = f"Bearer {bearer or es256_token(self.key, self.device_id)}"
        if key:
            sent["Idempotency-Key"] = key
        if gzip_body:
            body = gzip.compress(body)
            sent["Content-Encoding"] = "gzip"
        sent |= headers or {}
        async with asyncio.timeout(NETWORK_TIMEOUT):
            return await self.http.post("/v1/witsml/logs", content=body, headers=sent)

    async def get(self, path: str, **params: Any) -> httpx.Response:
        async with asyncio.timeout(NETWORK_TIMEOUT):
            return await self.http.get(path, params=params)


@pytest.fixture
async def uploader(
    service: CloudService, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> AsyncIterator[Uploader]:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=NETWORK_TIMEOUT) as http:
        yield Uploader(http, device_key, device_id)


async def log_summary(service: CloudService, uid: str) -> dict[str, Any]:
    matches = [entry for entry in await service.witsml_logs() if entry["uid"] == uid]
    assert len(matches) == 1, f"log {uid} listed {len(matches)} times"
    return matches[0]


# --- upload and merge -------------------------------------------------------------


async def test_valid_log_stored(
    uploader: Uploader, service: CloudService, log_uid: str, assert_witsml_valid: AssertValid
) -> None:
    """A valid log is stored: the response counts its rows and the list shows the log."""
    document = log_document(log_uid, [f"{T0},1000,210.5", f"{T1},1001,{NULL}", f"{T2},1002,211"])
    assert_witsml_valid(document)
    response = await uploader.post(document, key=f"{uploader.device_id}:witsml:{log_uid}:1-3")
    summary = await log_summary(service, log_uid)
    assert response.status_code == 200
    assert response.json() == {"rows": 3, "new_rows": 3, "duplicate": False}
    assert summary == {
        "uid": log_uid,
        "uid_well": "W-001",
        "uid_wellbore": "WB-001",
        "name": "Rig 07 time log",
        "rows": 3,
    }


async def test_resent_rows_are_duplicate(
    uploader: Uploader, service: CloudService, log_uid: str
) -> None:
    """The same rows sent again with the same Idempotency-Key add no row and are flagged."""
    document = log_document(log_uid, [f"{T0},1000,210", f"{T1},1001,211"])
    key = f"{uploader.device_id}:witsml:{log_uid}:1-2"
    first = await uploader.post(document, key=key)
    again = await uploader.post(document, key=key)
    other_key = await uploader.post(document, key=f"{key}-other")
    summary = await log_summary(service, log_uid)
    assert first.json() == {"rows": 2, "new_rows": 2, "duplicate": False}
    assert again.json() == {"rows": 2, "new_rows": 0, "duplicate": True}
    assert other_key.json() == {"rows": 2, "new_rows": 0, "duplicate": False}
    assert summary["rows"] == 2


async def test_overlapping_rows_merge(
    uploader: Uploader, service: CloudService, log_uid: str, assert_witsml_valid: AssertValid
) -> None:
    """Overlapping rows merge: a value fills a null or replaces a value, a null changes nothing."""
    first = log_document(log_uid, [f"{T0},1000,{NULL}", f"{T1},1001,200"])
    second = log_document(log_uid, [f"{T0},{NULL},210", f"{T1},1005,{NULL}", f"{T2},,220"])
    await uploader.post(first)
    merged = await uploader.post(second)
    document = await service.witsml_log(log_uid)
    assert_witsml_valid(document)
    assert merged.json() == {"rows": 3, "new_rows": 1, "duplicate": False}
    assert stored_rows(document) == {
        T0: [1000.0, 210.0],
        T1: [1005.0, 200.0],
        T2: [None, 220.0],
    }


async def test_same_instant_other_zone_one_row(
    uploader: Uploader, service: CloudService, log_uid: str
) -> None:
    """A row at 06:00Z and one at 07:00+01:00 are the same instant, so one stored row."""
    await uploader.post(log_document(log_uid, [f"{T0},1000,{NULL}"]))
    shifted = await uploader.post(log_document(log_uid, ["2024-05-01T07:00:00+01:00,1001,205"]))
    fraction = await uploader.post(log_document(log_uid, ["2024-05-01T06:00:00.0000000Z,,206"]))
    document = await service.witsml_log(log_uid)
    assert shifted.json()["new_rows"] == 0
    assert fraction.json()["new_rows"] == 0
    assert stored_rows(document) == {T0: [1001.0, 206.0]}


async def test_bom_body_accepted(uploader: Uploader, service: CloudService, log_uid: str) -> None:
    """A body starting with a UTF-8 byte order mark is accepted and kept as received."""
    body = b"\xef\xbb\xbf" + log_document(log_uid, [f"{T0},1000,210"])
    response = await uploader.post(body)
    assert response.status_code == 200
    assert response.json()["rows"] == 1
    assert body in await service.witsml_documents()


async def test_gzip_body_accepted(uploader: Uploader, service: CloudService, log_uid: str) -> None:
    """A gzip body is decompressed, stored, and kept decompressed."""
    document = log_document(log_uid, [f"{T0},1000,210", f"{T1},1001,211"])
    response = await uploader.post(document, gzip_body=True)
    assert response.status_code == 200
    assert response.json()["rows"] == 2
    assert document in await service.witsml_documents()


async def test_new_curve_added_later(
    uploader: Uploader, service: CloudService, log_uid: str, assert_witsml_valid: AssertValid
) -> None:
    """A later document may add a curve; the stored log then has all curves in arrival order."""
    await uploader.post(log_document(log_uid, [f"{T0},1000,210"]))
    more = (("SPPA", "psi"), ("RPMA", "rpm"))
    added = await uploader.post(log_document(log_uid, [f"{T1},1001,120"], curves=more))
    document = await service.witsml_log(log_uid)
    assert_witsml_valid(document)
    assert added.status_code == 200
    assert mnemonics(document) == "TIME,SPPA,HKLA,RPMA"
    assert stored_rows(document) == {T0: [1000.0, 210.0, None], T1: [1001.0, None, 120.0]}


# --- rejected documents -----------------------------------------------------------


def _duplicate_mnemonic(uid: str) -> tuple[bytes, str, int, str]:
    document = log_document(uid, [f"{T0},1,2"], curves=(("SPPA", "psi"), ("SPPA", "psi")))
    # Two uids, so the only fault is the repeated mnemonic.
    first, second = document.split(b'uid="SPPA"', 1)
    document = first + b'uid="SPPA"' + second.replace(b'uid="SPPA"', b'uid="SPPA2"', 1)
    return document, '<logCurveInfo uid="SPPA2">', 1, "mnemonic 'SPPA'"


def _unit_list_mismatch(uid: str) -> tuple[bytes, str, int, str]:
    document = log_document(uid, [f"{T0},1,2"], unit_list="s,kPa,klbf")
    return document, "<unitList>", 1, "'kPa'"


def _row_width(uid: str) -> tuple[bytes, str, int, str]:
    document = log_document(uid, [f"{T0},1,2", f"{T1},1,2,3"])
    return document, f"<data>{T1}", 1, "4 values"


@pytest.mark.parametrize(
    "make",
    [_duplicate_mnemonic, _unit_list_mismatch, _row_width],
    ids=["duplicate-mnemonic", "unit-list-mismatch", "row-width"],
)
async def test_invalid_document_422(
    uploader: Uploader,
    service: CloudService,
    log_uid: str,
    make: Callable[[str], tuple[bytes, str, int, str]],
) -> None:
    """A document breaking a server rule gets 422 listing problems with the line at fault."""
    document, needle, occurrence, named = make(log_uid)
    response = await uploader.post(document)
    detail = response.json()["detail"]
    at_fault = [
        problem["message"]
        for problem in detail["problems"]
        if problem["line"] == line_of(document, needle, occurrence)
    ]
    listed = [entry["uid"] for entry in await service.witsml_logs()]
    assert response.status_code == 422
    assert response.json()["reason"] == "invalid_document"
    assert any(named in message for message in at_fault), detail["problems"]
    assert "WITSML document rejected" in detail["message"]
    assert log_uid not in listed


async def test_not_xml_422(uploader: Uploader) -> None:
    """A body that is not well-formed XML gets 422 naming the line of the syntax error."""
    response = await uploader.post(b"<logs>\n<log>\n</logs>\n")
    problems = response.json()["detail"]["problems"]
    assert response.status_code == 422
    assert [problem["line"] for problem in problems] == [3]


async def test_non_finite_value_422(uploader: Uploader, log_uid: str) -> None:
    """A value that overflows to infinity gets 422 naming the row's line."""
    document = log_document(log_uid, [f"{T0},1,2", f"{T1},1e999,2"])
    response = await uploader.post(document)
    lines = [problem["line"] for problem in response.json()["detail"]["problems"]]
    assert response.status_code == 422
    assert line_of(document, f"<data>{T1}") in lines


async def test_changed_unit_rejected(
    uploader: Uploader, service: CloudService, log_uid: str
) -> None:
    """A curve sent with another unit than the stored log's gets 422 and stores nothing.

    The new curve RPMA comes before the changed one, so it is written before
    the conflict shows and must be rolled back.
    """
    await uploader.post(log_document(log_uid, [f"{T0},1000,210"]))
    changed = log_document(log_uid, [f"{T1},120,7000"], curves=(("RPMA", "rpm"), ("SPPA", "kPa")))
    response = await uploader.post(changed)
    problem = response.json()["detail"]["problems"][0]
    summary = await log_summary(service, log_uid)
    document = await service.witsml_log(log_uid)
    assert response.status_code == 422
    assert response.json()["reason"] == "log_conflict"
    assert problem["line"] == line_of(changed, '<logCurveInfo uid="SPPA">')
    assert "'kPa'" in problem["message"]
    assert "'psi'" in problem["message"]
    assert summary["rows"] == 1
    assert mnemonics(document) == "TIME,SPPA,HKLA"


@pytest.mark.parametrize(
    ("null_value", "well_uid", "named"),
    [("-1", "W-001", "nullValue"), (NULL, "W-002", "W-002")],
    ids=["null-value", "well-uid"],
)
async def test_changed_header_rejected(
    uploader: Uploader, log_uid: str, null_value: str, well_uid: str, named: str
) -> None:
    """A document changing a stored log's null value or well gets 422 at the log's line."""
    await uploader.post(log_document(log_uid, [f"{T0},1000,210"]))
    changed = log_document(log_uid, [f"{T1},1001,211"], null_value=null_value, well_uid=well_uid)
    response = await uploader.post(changed)
    problem = response.json()["detail"]["problems"][0]
    assert response.status_code == 422
    assert problem["line"] == line_of(changed, "<log ")
    assert named in problem["message"]


async def test_index_name_as_curve_rejected(uploader: Uploader, log_uid: str) -> None:
    """A data curve named like the index curve gets 422, because TIME is the stored index."""
    document = log_document(
        log_uid,
        ["2024-05-01T06:00:00Z,1"],
        curves=(("time", "s"),),
    )
    response = await uploader.post(document)
    assert response.status_code == 422


async def test_other_content_type_415(uploader: Uploader, log_uid: str) -> None:
    """A body sent as JSON or with an empty Content-Type gets 415; a charset is fine."""
    document = log_document(log_uid, [f"{T0},1,2"])
    json_type = await uploader.post(document, headers={"Content-Type": "application/json"})
    empty = await uploader.post(document, headers={"Content-Type": ""})
    charset = await uploader.post(
        document, headers={"Content-Type": "application/xml; charset=utf-8"}
    )
    assert json_type.status_code == 415
    assert empty.status_code == 415
    assert charset.status_code == 200


async def test_missing_token_401(uploader: Uploader, log_uid: str) -> None:
    """Without a token the witsml route gets 401 with a Bearer challenge, like /v1/readings."""
    response = await uploader.post(log_document(log_uid, [f"{T0},1,2"]), anonymous=True)
    assert response.status_code == 401
    assert response.json()["reason"] == "missing_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_unknown_key_401(uploader: Uploader, device_id: str, log_uid: str) -> None:
    """A token signed by an unregistered key gets 401 naming the reason, and nothing is stored."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    document = log_document(log_uid, [f"{T0},1,2"])
    response = await uploader.post(document, bearer=es256_token(stranger, device_id))
    missing = await uploader.get(f"/v1/witsml/logs/{log_uid}")
    assert response.status_code == 401
    assert response.json()["reason"] == "unknown_kid"
    assert missing.status_code == 404


async def test_malformed_token_401(uploader: Uploader, log_uid: str) -> None:
    """A bearer value that is not a JWT gets 401."""
    response = await uploader.post(log_document(log_uid, [f"{T0},1,2"]), bearer="not-a-jwt")
    assert response.status_code == 401
    assert response.json()["reason"] == "malformed_token"


async def test_oversize_body_413(uploader: Uploader, log_uid: str) -> None:
    """A body above the 10 MB limit gets 413, whether plain or inflating from gzip."""
    document = log_document(log_uid, [f"{T0},1,2"])
    padded = document.replace(b"<logs ", b"<!--" + b" " * 10_500_000 + b"-->\n<logs ")
    plain = await uploader.post(padded)
    compressed = await uploader.post(padded, gzip_body=True)
    assert len(gzip.compress(padded)) < 1_000_000
    assert plain.status_code == 413
    assert compressed.status_code == 413
    assert compressed.json()["detail"]["limit"] == 10 * 1024 * 1024


# --- faults -----------------------------------------------------------------------


async def test_fault_503_retry_after(
    uploader: Uploader, faults: CloudService, log_uid: str
) -> None:
    """An injected 503 with Retry-After fails the next witsml request once."""
    await faults.inject_fault(status=503, retry_after=7)
    document = log_document(log_uid, [f"{T0},1,2"])
    failed = await uploader.post(document)
    after = await uploader.post(document)
    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "7"
    assert after.status_code == 200
    assert after.json()["new_rows"] == 1


async def test_fault_after_store(uploader: Uploader, faults: CloudService, log_uid: str) -> None:
    """A fault after storage returns 503 for a stored document, so the retry is a duplicate."""
    await faults.inject_fault(status=503, after_store=True)
    document = log_document(log_uid, [f"{T0},1,2"])
    key = f"{uploader.device_id}:witsml:{log_uid}:1-1"
    lost = await uploader.post(document, key=key)
    retry = await uploader.post(document, key=key)
    assert lost.status_code == 503
    assert retry.json() == {"rows": 1, "new_rows": 0, "duplicate": True}


async def test_fault_route_filter(
    uploader: Uploader, faults: CloudService, log_uid: str, device_id: str
) -> None:
    """A status fault for the readings route leaves witsml requests alone, and the reverse."""
    async with asyncio.timeout(NETWORK_TIMEOUT):
        added = await uploader.http.post(
            "/_test/faults",
            json=[{"status": 503, "route": "readings"}, {"status": 429, "route": "witsml"}],
        )
    witsml = await uploader.post(log_document(log_uid, [f"{T0},1,2"]))
    pending = (await uploader.get("/_test/faults")).json()["pending"]
    readings_body = {
        "device_id": device_id,
        "rig_id": "rig-07",
        "readings": [
            {
                "seq": 1,
                "ts": "2024-05-01T06:00:00Z",
                "channel": "standpipe_pressure",
                "value": 1.0,
                "unit": "psi",
                "quality": "good",
            }
        ],
    }
    async with asyncio.timeout(NETWORK_TIMEOUT):
        readings = await uploader.http.post(
            "/v1/readings",
            json=readings_body,
            headers={"Authorization": f"Bearer {es256_token(uploader.key, device_id)}"},
        )
    assert added.status_code == 200
    assert witsml.status_code == 429
    assert [fault["route"] for fault in pending] == ["readings"]
    assert readings.status_code == 503


async def test_fault_reject_time(uploader: Uploader, faults: CloudService, log_uid: str) -> None:
    """A row-time fault rejects every document with a row at that instant, naming its line."""
    async with asyncio.timeout(NETWORK_TIMEOUT):
        added = await uploader.http.post(
            "/_test/faults", json={"reject_time": "2024-05-01T07:00:01+01:00"}
        )
    holding = log_document(log_uid, [f"{T0},1,2", f"{T1},1,2", f"{T2},1,2"])
    first = await uploader.post(holding)
    second = await uploader.post(holding)
    other = await uploader.post(log_document(log_uid, [f"{T0},1,2"]))
    assert added.status_code == 200
    assert first.status_code == 422
    assert first.json()["reason"] == "injected_fault"
    assert first.json()["detail"]["problems"][0]["line"] == line_of(holding, f"<data>{T1}")
    assert second.status_code == 422
    assert other.status_code == 200


@pytest.mark.parametrize(
    "fault",
    [
        {"reject_time": "2024-05-01T06:00:01"},
        {"reject_time": T1, "status": 503},
        {"reject_seq": 4, "route": "witsml"},
    ],
    ids=["time-without-zone", "time-and-status", "route-on-seq-fault"],
)
async def test_fault_body_validated(
    uploader: Uploader, faults: CloudService, fault: dict[str, Any]
) -> None:
    """A fault with a zoneless time, two kinds, or a route on a non-status fault gets 422."""
    async with asyncio.timeout(NETWORK_TIMEOUT):
        response = await uploader.http.post("/_test/faults", json=fault)
    pending = (await uploader.get("/_test/faults")).json()["pending"]
    assert response.status_code == 422
    assert pending == []


# --- queries ----------------------------------------------------------------------


async def test_get_log_valid_document(
    uploader: Uploader, service: CloudService, log_uid: str, assert_witsml_valid: AssertValid
) -> None:
    """GET returns a schema-valid WITSML document holding the stored rows and header."""
    rows = [f"{T0},1000.5,210", f"{T1},{NULL},211.25", f"{T2},1002,{NULL}"]
    await uploader.post(log_document(log_uid, rows))
    document = await service.witsml_log(log_uid)
    root = etree.fromstring(document)
    log = root.find(f"{NS}log")
    assert_witsml_valid(document)
    assert log is not None
    assert log.get("uid") == log_uid
    assert log.get("uidWell") == "W-001"
    assert log.findtext(f"{NS}nullValue") == NULL
    assert log.findtext(f"{NS}logData/{NS}unitList") == "s,psi,klbf"
    assert stored_rows(document) == {
        T0: [1000.5, 210.0],
        T1: [None, 211.25],
        T2: [1002.0, None],
    }


async def test_get_unknown_log_404(uploader: Uploader, log_uid: str) -> None:
    """GET for a uid never stored gets 404 naming the uid."""
    response = await uploader.get(f"/v1/witsml/logs/{log_uid}")
    assert response.status_code == 404
    assert log_uid in response.json()["detail"]


async def test_documents_listed_in_order(
    uploader: Uploader, service: CloudService, log_uid: str
) -> None:
    """GET documents returns each accepted body in order with its device and key, and no other."""
    bodies = [log_document(log_uid, [f"{t},{n},1"]) for n, t in enumerate([T0, T1, T2])]
    rejected = log_document(log_uid, [f"{T0},1,2"], unit_list="s,x,y")
    for n, body in enumerate(bodies):
        await uploader.post(body, key=f"key-{log_uid}-{n}", gzip_body=n == 1)
    await uploader.post(rejected)
    everything = await service.witsml_documents()
    page = (await uploader.get("/v1/witsml/documents", limit=1)).json()
    ours = [body for body in everything if log_uid.encode() in body]
    assert ours == bodies
    assert len(page["documents"]) == 1
    assert page["next_after_id"] == page["documents"][0]["id"]
    mine: list[dict[str, Any]] = []
    after_id: int | None = 0
    while after_id is not None:
        listing = (await uploader.get("/v1/witsml/documents", after_id=after_id)).json()
        mine += [
            entry
            for entry in listing["documents"]
            if entry["idempotency_key"].startswith(f"key-{log_uid}-")
        ]
        after_id = listing["next_after_id"]
    assert [e["idempotency_key"] for e in mine] == [f"key-{log_uid}-{n}" for n in range(3)]
    assert {e["device_id"] for e in mine} == {uploader.device_id}
    assert all(e["received_at"].endswith("Z") for e in mine)


async def test_openapi_lists_witsml_routes(uploader: Uploader) -> None:
    """The OpenAPI document describes the witsml upload with an XML body."""
    schema = (await uploader.get("/openapi.json")).json()
    upload = schema["paths"]["/v1/witsml/logs"]["post"]
    assert "application/xml" in upload["requestBody"]["content"]
    assert "/v1/witsml/documents" in schema["paths"]
