"""The HTTP side of ``pmf serve`` (FastAPI): the page (``/`` and ``/static/``), and the API the page itself uses.

* ``GET /api/health``: ``{"status": "ok", "queue": {...}, ...}``.
* ``GET /api/info``: the model's defaults, modes, size, examples, limits (what the page's form shows).
* ``POST /api/retarget`` (multipart, :mod:`pmf_jax.serve.request_form`): one generation, queued
  (:mod:`pmf_jax.serve.job_queue`). ``Accept: image/png``: the first image's PNG bytes; otherwise JSON with every
  image as base64 PNG, the skeleton the model was given, the pose as received and the settings used.
* ``GET /api/progress/{job}``: the progress of the request sent with ``job=...``.
* ``POST /api/fit-doodle`` (JSON ``{"strokes": [[[x, y], ...], ...], "width": W, "height": H}``): the stick
  figure's keypoints (:func:`pmf_jax.pose.doodle_fit.fit_doodle`).
* ``POST /api/detect-pose`` (multipart ``source`` or ``example``): the source person's keypoints, by the OpenPose
  detector when its weights are there.
* ``GET /api/examples/{name}``: an example source image of the server's list.

Bad input: 400 with ``{"error": "<one line>"}``; a body over the upload limit: 413; a full queue: 503 with
``Retry-After``. Every request is independent: a bad one leaves the server as it was.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Dict

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import check_pixel_count
from pmf_jax.pose.doodle_fit import check_strokes, fit_doodle
from pmf_jax.pose.keypoints import COLORS, KEYPOINT_NAMES, LIMBS, select_person
from pmf_jax.pose.openpose_json import openpose_data
from pmf_jax.serve import request_form
from pmf_jax.serve.job_queue import GenerationQueue, QueueFull
from pmf_jax.serve.standing_pose import UNIT_POSE, FILL

STATIC = Path(__file__).resolve().parent / "static"
MAX_STROKES = 500
MAX_STROKE_POINTS = 50_000


def create_app(model, queue: GenerationQueue, max_upload_bytes: int) -> FastAPI:
    """The application serving ``model`` (a :class:`~pmf_jax.serve.model.ServedModel`) through ``queue``."""
    app = FastAPI(title="pmf serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def upload_limit(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "send the request body with a Content-Length")
            if int(length) > max_upload_bytes:
                return _error(413, f"the request body is {int(length):,} bytes, more than the limit of "
                                   f"{max_upload_bytes:,} (pmf serve --max-upload-mb)")
        return await call_next(request)

    @app.exception_handler(PMFInputError)
    async def bad_input(request: Request, err: PMFInputError):
        return _error(400, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return _error(503, str(err), {"Retry-After": str(err.retry_after)})

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    async def health():
        return {"status": "ok", "model": str(model.args.model), "mode": model.pipe.mode, "queue": queue.health(),
                "compiled_programs": model.compiled_programs()}

    @app.get("/api/info")
    async def info():
        return dict(model.info(), skeleton={"names": KEYPOINT_NAMES, "limbs": LIMBS, "colors": COLORS,
                                            "standing": UNIT_POSE.tolist(), "fill": FILL},
                    limits={"max_steps": request_form.MAX_STEPS, "max_images": request_form.MAX_IMAGES,
                            "max_side": request_form.MAX_SIDE, "max_upload_bytes": max_upload_bytes})

    @app.get("/api/examples/{name}")
    async def example(name: str):
        if name not in model.examples:
            raise HTTPException(404, f"no example {name!r}")
        return FileResponse(model.examples[name])

    @app.get("/api/progress/{job}")
    async def progress(job: str):
        return queue.status(job)

    @app.post("/api/retarget")
    async def retarget(request: Request):
        fields = await _form_fields(request, max_upload_bytes)
        parsed = await run_in_threadpool(request_form.parse_request, fields, model.examples)
        try:
            future = queue.submit(lambda on_step: model.generate(parsed, on_step), parsed.job)
        except ValueError as err:
            raise PMFInputError(str(err)) from None
        result = await asyncio.wrap_future(future)
        pngs = await run_in_threadpool(lambda: [_png(image) for image in result.images])
        settings = result.settings
        if "image/png" in request.headers.get("accept", ""):
            return Response(pngs[0], media_type="image/png",
                            headers={"X-PMF-Settings": json.dumps(settings, separators=(",", ":"))})
        received = parsed.keypoints
        return {"images": [_b64(p) for p in pngs], "pose_image": _b64(await run_in_threadpool(_png, result.pose.image)),
                "pose": None if received is None else openpose_data(received, *parsed.pose_frame),
                "pose_on_output": (None if result.pose.keypoints is None
                                   else openpose_data(result.pose.keypoints, settings["height"], settings["width"])),
                "settings": settings, "seconds": round(result.seconds, 3)}

    @app.post("/api/fit-doodle")
    async def fit(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PMFInputError(f"doodle: the body is not valid JSON ({err})") from None
        return await run_in_threadpool(_fit, body)

    @app.post("/api/detect-pose")
    async def detect_pose(request: Request):
        fields = await _form_fields(request, max_upload_bytes)
        unknown = sorted(set(fields) - {"source", "example"})
        if unknown:
            raise PMFInputError(f"unknown field {unknown[0]!r} (the fields are source, example)")
        source = await run_in_threadpool(request_form.read_source, fields, model.examples)
        future = queue.submit(lambda on_step: model.detect(source))
        keypoints = await asyncio.wrap_future(future)
        return {"pose": openpose_data(select_person(keypoints), *source.shape[:2])}

    return app


def _error(status: int, message: str, headers: Dict[str, str] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _form_fields(request: Request, max_upload_bytes: int) -> Dict:
    """The multipart (or urlencoded) fields: text as str, files as bytes; a field given twice is an error."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise PMFInputError(f"send the fields as multipart/form-data (got Content-Type {kind or 'none'!r})")
    fields = {}
    async with request.form(max_files=4, max_fields=64, max_part_size=max_upload_bytes) as form:
        for key, value in form.multi_items():
            if key in fields:
                raise PMFInputError(f"field {key!r} is given twice")
            fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields


def _fit(body) -> dict:
    if not isinstance(body, dict) or set(body) - {"strokes", "width", "height"}:
        raise PMFInputError('doodle: expected {"strokes": [[[x, y], ...], ...], "width": W, "height": H}')
    width, height = body.get("width"), body.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise PMFInputError("doodle: width and height must be positive integers (the drawing's size in pixels)")
    check_pixel_count(height, width, "doodle")
    strokes = body.get("strokes")
    if isinstance(strokes, list) and len(strokes) > MAX_STROKES:
        raise PMFInputError(f"doodle: at most {MAX_STROKES} strokes, got {len(strokes)}")
    strokes = check_strokes(strokes)
    if sum(len(s) for s in strokes) > MAX_STROKE_POINTS:
        raise PMFInputError(f"doodle: at most {MAX_STROKE_POINTS} points in all")
    for stroke in strokes:
        request_form.check_in_frame(stroke, (height, width), "doodle")
    keypoints = fit_doodle(strokes)
    return {"pose": openpose_data(keypoints, height, width)}


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


__all__ = ["MAX_STROKES", "MAX_STROKE_POINTS", "STATIC", "create_app"]
