"""HTTP routes: authenticate, parse, call ``dispatcher.service``, serialise. Nothing else.

Errors are raised as FaceFarm errors and turned into responses by ``http_errors``; a job that
belongs to another owner is simply "not found" (the service never reveals it exists).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dispatcher import service
from dispatcher.auth import authenticate
from dispatcher.http_errors import describe_validation
from dispatcher.service import FarmContext
from shared.errors import BadInputError, LimitExceededError, NotFoundError
from shared.schemas import JobOptions, JobView

router = APIRouter()


class SubmitByUri(BaseModel):
    """``POST /jobs`` as JSON: inputs already in storage (``s3://`` or an allowed ``file://``)."""

    model_config = ConfigDict(extra="forbid")
    video_uri: str
    face_uri: str
    reference_uri: str | None = None
    options: JobOptions = JobOptions()


class Submitted(BaseModel):
    job_id: str
    status: str


def get_context(request: Request) -> FarmContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def get_owner(
    request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> str:
    return authenticate(authorization, get_context(request).settings.api_tokens)


Ctx = Annotated[FarmContext, Depends(get_context)]
Owner = Annotated[str, Depends(get_owner)]


def parse_options(text: str | None) -> JobOptions:
    """The multipart ``options`` field (JSON) as JobOptions; BadInputError names what is wrong."""
    if not text:
        return JobOptions()
    try:
        return JobOptions.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"options is not valid JSON: {exc.msg} at char {exc.pos}") from exc
    except ValidationError as exc:
        raise BadInputError(describe_validation(exc.errors())) from exc


def uri_name(uri: str) -> str:
    """The file name at the end of a URI (its extension tells the storage what it holds)."""
    return PurePosixPath(unquote(urlparse(uri).path)).name or "input"


@router.post("/jobs", status_code=201, response_model=Submitted)
async def submit(request: Request, ctx: Ctx, owner: Owner) -> Submitted:
    """Multipart upload (``video``, ``face``, optional ``reference``, JSON ``options``) or JSON URIs."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        view = await _submit_upload(request, ctx, owner)
    else:
        try:
            body = SubmitByUri.model_validate_json(await request.body())
        except ValidationError as exc:
            raise BadInputError(describe_validation(exc.errors())) from exc
        view = await run_in_threadpool(
            service.submit_job,
            ctx,
            owner=owner,
            video=body.video_uri,
            video_name=uri_name(body.video_uri),
            face=body.face_uri,
            face_name=uri_name(body.face_uri),
            options=body.options,
            reference=body.reference_uri,
            reference_name=uri_name(body.reference_uri) if body.reference_uri else None,
        )
    return Submitted(job_id=view.job_id, status=str(view.status))


async def _submit_upload(request: Request, ctx: FarmContext, owner: str) -> JobView:
    declared = int(request.headers.get("content-length") or 0)
    if declared > ctx.settings.max_upload_bytes:
        raise LimitExceededError(
            f"upload of {declared} bytes exceeds the limit of {ctx.settings.max_upload_bytes} bytes"
        )
    async with request.form(max_files=3, max_fields=4) as form:
        files: dict[str, UploadFile] = {}
        for name in ("video", "face", "reference"):
            part = form.get(name)
            if isinstance(part, UploadFile):
                files[name] = part
            elif part is not None:
                raise BadInputError(f"form field {name!r} must be a file upload")
        for required in ("video", "face"):
            if required not in files:
                raise BadInputError(f"missing file field {required!r} in the upload")
        options_field = form.get("options")
        options = parse_options(options_field if isinstance(options_field, str) else None)
        reference = files.get("reference")
        return await run_in_threadpool(
            service.submit_job,
            ctx,
            owner=owner,
            video=files["video"].file,
            video_name=files["video"].filename or "video",
            face=files["face"].file,
            face_name=files["face"].filename or "face",
            options=options,
            reference=reference.file if reference else None,
            reference_name=(reference.filename or "reference") if reference else None,
        )


@router.get("/jobs", response_model=list[JobView])
def list_jobs(ctx: Ctx, owner: Owner) -> list[JobView]:
    return service.list_jobs(ctx, owner)


@router.get("/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, ctx: Ctx, owner: Owner) -> JobView:
    return service.get_job(ctx, owner, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: str, ctx: Ctx, owner: Owner) -> JobView:
    return service.cancel_job(ctx, owner, job_id)


@router.post("/jobs/{job_id}/retry", response_model=JobView)
def retry_job(job_id: str, ctx: Ctx, owner: Owner) -> JobView:
    return service.retry_job(ctx, owner, job_id)


@router.get("/jobs/{job_id}/logs", response_model=list[str])
def job_logs(job_id: str, ctx: Ctx, owner: Owner) -> list[str]:
    return service.job_logs(ctx, owner, job_id)


@router.get("/jobs/{job_id}/audit")
def job_audit(job_id: str, ctx: Ctx, owner: Owner) -> dict[str, Any]:
    return service.audit_record(ctx, owner, job_id)


@router.get("/jobs/{job_id}/output", response_class=FileResponse)
def job_output(job_id: str, ctx: Ctx, owner: Owner) -> Response:
    """The rendered file: streamed with Range support, or a redirect to a presigned S3 URL."""
    location = service.output_location(ctx, owner, job_id)
    if location.startswith(("http://", "https://")):
        return RedirectResponse(location, status_code=307)
    path = Path(unquote(urlparse(location).path)) if location.startswith("file://") else Path(location)
    if not path.is_file():
        raise NotFoundError(f"output of job {job_id} is missing from storage", job_id=job_id)
    return FileResponse(path, media_type="video/mp4", filename=f"{job_id}{path.suffix}")


@router.get("/healthz")
def healthz(ctx: Ctx) -> dict[str, str]:
    """Liveness plus the state store's reachability; no token, no job data."""
    ctx.store.ping()
    return {"status": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
