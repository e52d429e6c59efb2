"""State and checks shared by the service's routes: settings, store, tokens, faults, body limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from cloud.auth import AuthError, DeviceClaims, KeyRegistry, TokenVerifier
from cloud.faults import Fault, FaultPlan, Route
from cloud.ingest import IngestRejected, body_too_large
from cloud.settings import CloudSettings, sqlite_path
from cloud.store import NO_DEVICE, ReadingStore

__all__ = [
    "BEARER",
    "Service",
    "ServiceDep",
    "UploadStart",
    "error_response",
    "injected",
    "read_body",
    "start_upload",
]

log = structlog.get_logger(__name__)

BEARER = HTTPBearer(auto_error=False, description="ES256 device JWT")
"""Documents the bearer token in OpenAPI; upload routes check the token themselves."""


class Service:
    """Everything a request handler needs: settings, store, token verifier and faults."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.store = ReadingStore(sqlite_path(settings.db))
        self.verifier = TokenVerifier(
            KeyRegistry(settings.keys_dir),
            audience=settings.audience,
            leeway_s=settings.leeway_s,
            max_lifetime_s=settings.max_token_lifetime_s,
        )
        self.faults = FaultPlan()

    async def reject(self, device_id: str, error: IngestRejected) -> JSONResponse:
        """Count and log a rejected request and build its JSON error response."""
        await self.store.count_rejection(device_id, error.reason)
        log.warning(
            "request_rejected",
            status=error.status,
            reason=error.reason,
            device_id=device_id or None,
            error=str(error),
        )
        return error_response(error)


def error_response(error: IngestRejected) -> JSONResponse:
    """Render an error as `{"detail": ..., "reason": ...}` with its status and headers."""
    return JSONResponse(
        {"detail": error.detail, "reason": error.reason},
        status_code=error.status,
        headers=error.headers,
    )


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]


@dataclass(frozen=True)
class UploadStart:
    """An upload request that passed the token check."""

    claims: DeviceClaims
    fault_after_store: Fault | None
    """A status fault whose error is sent after the body is stored, or None."""


async def start_upload(
    service: Service, request: Request, route: Route
) -> UploadStart | JSONResponse:
    """Apply a pending status fault for `route`, then check the bearer token.

    Returns the error response to send when a fault fires before storage or
    the token is rejected (401 with a Bearer challenge).
    """
    fault = service.faults.take_status(route)
    if fault is not None and not fault.after_store:
        return await service.reject(NO_DEVICE, injected(fault))
    try:
        claims = service.verifier.verify(request.headers.get("authorization"))
    except AuthError as exc:
        headers = {
            "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'
        }
        return await service.reject(
            NO_DEVICE, IngestRejected(401, exc.reason, exc.message, headers)
        )
    return UploadStart(claims, fault)


async def read_body(request: Request, limit: int) -> bytes:
    """Read the raw body, giving up with 413 once it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise body_too_large(limit)
    return bytes(body)


def injected(fault: Fault) -> IngestRejected:
    """Build the error of a status fault, with Retry-After when the fault sets one."""
    status = fault.status or 500  # only status faults reach here
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
    return IngestRejected(status, "injected_fault", f"injected fault {status}", headers)
