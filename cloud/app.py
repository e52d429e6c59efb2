"""The FastAPI app of the reference ingest service: readings and WITSML uploads, queries, faults.

`uvicorn cloud.app:app` serves `app`, built from the `RIG_CLOUD_*` environment
variables; `create_app(settings)` builds one from explicit settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from cloud.faults import Fault, FaultPlan
from cloud.ingest import IngestRejected, ReadingBatch, parse_batch
from cloud.service import (
    BEARER,
    Service,
    ServiceDep,
    error_response,
    injected,
    read_body,
    start_upload,
)
from cloud.settings import CloudSettings
from cloud.witsml import witsml_router

__all__ = ["Service", "app", "create_app"]

log = structlog.get_logger(__name__)

MAX_PAGE = 100_000
"""Most readings `GET /v1/devices/{device_id}/readings` returns in one page."""


class IngestResult(BaseModel):
    """Response body for an accepted batch."""

    accepted: int
    duplicates: int


class DeviceStats(BaseModel):
    """Counters of one device."""

    readings: int
    duplicates: int
    min_seq: int | None
    max_seq: int | None
    requests: int
    batches: int
    """Distinct Idempotency-Key values of stored batches."""
    retried_batches: int
    """Batches whose Idempotency-Key arrived more than once."""
    backfill_batches: int = 0
    """Batches that arrived with `X-Rig-Backlog: 1`, retries included."""
    backfill_readings: int = 0
    """Readings in those batches, duplicates included."""
    rejected: dict[str, int]


class UnauthenticatedStats(BaseModel):
    """Requests rejected before a device was authenticated, by reason."""

    rejected: dict[str, int]


class Stats(BaseModel):
    """Body of `GET /v1/stats`."""

    devices: dict[str, DeviceStats]
    unauthenticated: UnauthenticatedStats


class ReadingOut(BaseModel):
    """One stored reading."""

    seq: int
    rig_id: str
    ts: str
    channel: str
    value: float | None
    unit: str
    quality: str


class ReadingsPage(BaseModel):
    """Body of `GET /v1/devices/{device_id}/readings`."""

    device_id: str
    readings: list[ReadingOut]
    next_after_seq: int | None
    """The `after_seq` of the next page, or null when this page is the last."""


router = APIRouter()
test_router = APIRouter(prefix="/_test", tags=["test faults"])


@router.post(
    "/v1/readings",
    response_model=IngestResult,
    dependencies=[Depends(BEARER)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "JSON, plain or with Content-Encoding: gzip",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ReadingBatch"}}
            },
        }
    },
    responses={
        400: {"description": "Body is not JSON, or not gzip although Content-Encoding says so"},
        401: {"description": "Bearer token missing or rejected; `reason` says which check"},
        403: {"description": "Body device_id is not the token's sub"},
        413: {"description": "Body larger than the limit after decompression"},
        415: {"description": "Content-Encoding other than gzip"},
        422: {"description": "Invalid batch; `detail.index` and `detail.seq` name the reading"},
    },
)
async def post_readings(
    request: Request,
    service: ServiceDep,
    idempotency_key: Annotated[str, Header(description="{device_id}:{first}-{last}")] = "",
    content_encoding: Annotated[str | None, Header()] = None,
    x_rig_backlog: Annotated[
        str, Header(description='"1" on batches of the backlog the device sends after an outage')
    ] = "",
) -> Response:
    """Store a batch of readings; readings already stored are counted as duplicates."""
    start = await start_upload(service, request, "readings")
    if isinstance(start, JSONResponse):
        return start
    claims, fault = start.claims, start.fault_after_store

    limit = service.settings.max_body_bytes
    try:
        raw = await read_body(request, limit)
        batch = await asyncio.to_thread(
            parse_batch, raw, content_encoding, limit=limit, device_id=claims.device_id
        )
        _check_rejected_seq(service.faults, batch)
    except IngestRejected as exc:
        return await service.reject(claims.device_id, exc)
    except ClientDisconnect:
        # The device gave up mid-upload (it stopped, or its link dropped); it will resend.
        log.info("client_disconnected", device_id=claims.device_id)
        return Response(status_code=400)

    backfill = x_rig_backlog == "1"
    result = await service.store.add_batch(
        batch.device_id, batch.rig_id, batch.readings, idempotency_key, backfill=backfill
    )
    log.info(
        "batch_stored",
        device_id=batch.device_id,
        first_seq=batch.readings[0]["seq"],
        last_seq=batch.readings[-1]["seq"],
        accepted=result.accepted,
        duplicates=result.duplicates,
        backfill=backfill,
    )
    if fault is not None:
        # The batch is stored but the device hears a failure, as when a response is lost.
        return error_response(injected(fault))
    return JSONResponse({"accepted": result.accepted, "duplicates": result.duplicates})


def _check_rejected_seq(faults: FaultPlan, batch: ReadingBatch) -> None:
    seq = faults.take_rejected_seq(r["seq"] for r in batch.readings)
    if seq is None:
        return
    index = next(i for i, r in enumerate(batch.readings) if r["seq"] == seq)
    detail = {
        "message": f"reading seq {seq} rejected by an injected fault",
        "index": index,
        "seq": seq,
    }
    raise IngestRejected(422, "injected_fault", detail)


@router.get("/v1/devices/{device_id}/readings", response_model=ReadingsPage)
async def get_readings(
    device_id: str,
    service: ServiceDep,
    after_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
) -> Response:
    """List a device's stored readings in seq order, one page at a time."""
    rows = await service.store.readings(device_id, after_seq, limit)
    next_after_seq = rows[-1]["seq"] if len(rows) == limit else None
    # Built by hand: validating a page of up to 100,000 rows through the model is slow.
    return JSONResponse(
        {"device_id": device_id, "readings": rows, "next_after_seq": next_after_seq}
    )


@router.get("/v1/stats", response_model=Stats)
async def get_stats(service: ServiceDep) -> dict[str, Any]:
    """Return stored readings, duplicates, seq range, requests and rejections per device."""
    return await service.store.stats()


@router.get("/healthz")
async def get_health(service: ServiceDep) -> dict[str, Any]:
    """Return ok and the number of registered device keys."""
    return {"status": "ok", "keys": len(service.verifier.registry.kids())}


@test_router.post("/faults")
async def add_faults(faults: list[Fault] | Fault, service: ServiceDep) -> dict[str, Any]:
    """Queue faults for the next upload requests; return the faults still pending."""
    service.faults.add(faults if isinstance(faults, list) else [faults])
    log.info("faults_added", pending=service.faults.pending())
    return {"pending": service.faults.pending()}


@test_router.get("/faults")
async def list_faults(service: ServiceDep) -> dict[str, Any]:
    """Return the faults still pending."""
    return {"pending": service.faults.pending()}


@test_router.delete("/faults")
async def clear_faults(service: ServiceDep) -> dict[str, Any]:
    """Drop every pending fault."""
    service.faults.clear()
    return {"pending": []}


def create_app(settings: CloudSettings | None = None) -> FastAPI:
    """Build the service; `settings` default to the `RIG_CLOUD_*` environment variables."""
    resolved = settings if settings is not None else CloudSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(resolved)
        await service.store.open()
        app.state.service = service
        log.info(
            "cloud_service_started",
            audience=resolved.audience,
            keys_dir=str(resolved.keys_dir),
            keys=len(service.verifier.registry.kids()),
            test_faults=resolved.test_faults,
        )
        try:
            yield
        finally:
            await service.store.close()

    app = FastAPI(
        title="rig-agent reference ingest service",
        version="1",
        description=(
            "Receives reading batches and WITSML 1.4.1.1 logs from rig agents that sign "
            "ES256 device tokens."
        ),
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(witsml_router)
    if resolved.test_faults:
        app.include_router(test_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """Build the OpenAPI document, adding the batch schema that the upload route reads by hand."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        batch = ReadingBatch.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(batch.pop("$defs", {}))
        components["ReadingBatch"] = batch
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
