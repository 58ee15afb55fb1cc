"""The HTTP routes (FastAPI) over a `Service`: the OpenAI Videos API's shape.

    POST   /v1/videos               JSON or multipart (image file) -> 202 {"id", "status": "queued", ...}
    GET    /v1/videos               {"object": "list", "data": [job, ...]}
    GET    /v1/videos/{id}          the job: status, progress {step, steps, stage}, seed, error, times
    GET    /v1/videos/{id}/content  the file (404 unknown / no output, 409 not finished yet)
    DELETE /v1/videos/{id}          queued: dropped; running: stops at the next step; finished: deleted
    GET    /healthz                 liveness (no key needed)
    GET    /metrics                 Prometheus text

Every error is `{"error": "<one line>"}`. With an API key set, every route but /healthz wants
`Authorization: Bearer <key>` (compared in constant time) and answers 401 otherwise. The
body is read up to the upload limit before anything is parsed or decoded.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .service import Service
from .submission import RequestError, submission_from_body

MEDIA_TYPES = {"mp4": "video/mp4", "safetensors": "application/octet-stream"}


def create_app(service: Service, shutdown_reason=lambda: "shutdown") -> FastAPI:
    """The application; the lifespan starts the service's worker and stops it on shutdown
    (`shutdown_reason()` names why, e.g. SIGTERM, in the records of interrupted jobs)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop, shutdown_reason())

    app = FastAPI(title="wanengine", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    settings = service.settings

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        if exc.status in (400, 413, 422):
            service.reject("invalid" if exc.status != 413 else "too_large")
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)

    expected = hashlib.sha256(settings.api_key.encode()).digest() if settings.api_key else None

    def authorized(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # hashing first makes the comparison's time independent of the given key's length
        same = hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), expected)
        if scheme.lower() != "bearer" or not same:
            raise RequestError(401, "missing or wrong API key (send the header Authorization: Bearer <key>)")

    auth = [Depends(authorized)]

    @app.post("/v1/videos", status_code=202, dependencies=auth)
    async def create_video(request: Request) -> JSONResponse:
        service.check_capacity()  # cheap refusal before reading the body
        body = await read_limited_body(request, settings.max_upload_bytes)
        content_type = request.headers.get("content-type")
        form = await parse_multipart(request, body) if _is_multipart(content_type) else None
        submission = await run_in_threadpool(submission_from_body, body, content_type, form,
                                             settings.max_image_pixels)
        return JSONResponse(service.submit(submission), status_code=202)

    @app.get("/v1/videos", dependencies=auth)
    async def list_videos() -> Dict[str, Any]:
        return {"object": "list", "data": service.list()}

    @app.get("/v1/videos/{video_id}", dependencies=auth)
    async def get_video(video_id: str) -> Dict[str, Any]:
        view = service.view(video_id)
        if view is None:
            raise RequestError(404, f"no job {video_id!r}")
        return view

    @app.get("/v1/videos/{video_id}/content", dependencies=auth)
    async def get_content(video_id: str) -> FileResponse:
        path = service.content(video_id)
        fmt = path.suffix.lstrip(".")
        return FileResponse(path, media_type=MEDIA_TYPES.get(fmt, "application/octet-stream"), filename=path.name)

    @app.delete("/v1/videos/{video_id}", dependencies=auth)
    async def delete_video(video_id: str) -> JSONResponse:
        status, body = service.delete(video_id)
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4")

    return app


def _is_multipart(content_type: Optional[str]) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower() == "multipart/form-data"


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = RequestError(413, f"body: larger than the upload limit of {limit / 2**20:g} MB (--max-upload-mb)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_multipart(request: Request, body: bytes) -> Dict[str, Any]:
    """Form fields -> str, the uploaded image file -> bytes; repeated fields are refused."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay() -> AsyncIterator[bytes]:
        yield body
        yield b""

    try:
        try:
            parser = MultiPartParser(request.headers, replay(), max_files=1, max_fields=32,
                                     max_part_size=len(body) + 1)
        except TypeError:  # starlette < 0.40 has no part size limit (the body's limit still holds)
            parser = MultiPartParser(request.headers, replay())
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, f"body: malformed multipart form ({exc.message})") from None
    fields: Dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in fields:
            raise RequestError(400, f"{name}: given more than once")
        if isinstance(value, UploadFile):
            if name != "image":
                raise RequestError(400, f"{name}: only the image may be a file")
            value = await value.read()
        fields[name] = value
    await form.close()
    return fields
