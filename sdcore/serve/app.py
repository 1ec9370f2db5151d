"""The FastAPI application: AUTOMATIC1111's /sdapi/v1 endpoints and the web page.

Errors have A1111's shapes: a bad request is a 422 ``{"detail": [...]}`` (FastAPI's validation errors,
which A1111 answers too, with every refused field named in ``loc``); anything else is ``{"error", "detail",
"body", "errors"}`` as A1111's api exception handler writes it. An unexpected exception is logged here and
answered with that shape and no traceback; the worker thread and the server carry on."""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import options as opts, samplers
from .queue import Closed, Job, JobQueue, QueueFull
from .requests import Invalid, Limits, build, error
from .runner import preview
from .schemas import Img2ImgRequest, Txt2ImgRequest

log = logging.getLogger("sdcore.serve")
STATIC = Path(__file__).parent / "static"
POLL = 0.2  # seconds between checks that a waiting client is still there


def _json_safe(value):
    """``value`` with every non-finite float written as text (JSON has no inf or NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def a1111_error(status: int, exc: Exception, detail=None, headers=None) -> JSONResponse:
    """A1111's api error body (modules/api/api.py, handle_exception)."""
    detail = str(exc) if detail is None else detail
    body = {"error": type(exc).__name__, "detail": detail, "body": "", "errors": str(exc)}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of everything: HTTP basic auth (--api-auth) and the body size cap, checked
    on the declared Content-Length and again on the bytes actually received (a chunked body declares
    none), before the application parses anything."""

    def __init__(self, app, *, credentials: list[tuple[str, str]] | None, max_body: int):
        self.app, self.credentials, self.max_body = app, credentials, max_body

    def _authorized(self, header: bytes | None) -> bool:
        if not header or not header.lower().startswith(b"basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok = False
        for u, p in self.credentials:  # every pair compared, in constant time
            ok |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(),
                                                                                             p.encode())
        return ok

    async def _refuse(self, send, status: int, detail: str, headers=()) -> None:
        response = a1111_error(status, HTTPException(status, detail), detail)
        response.raw_headers.extend(headers)
        await response({"type": "http"}, None, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.credentials and not self._authorized(headers.get(b"authorization")):
            return await self._refuse(send, 401, "Incorrect username or password",
                                      [(b"www-authenticate", b'Basic realm="sdcore"')])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await self._refuse(send, 400, "Content-Length is not a number")
        too_big = f"the request body is over this server's limit of {self.max_body} bytes (--max-body-mb)"
        if int(declared) > self.max_body:
            return await self._refuse(send, 413, too_big)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._refuse(send, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: what the server says next (a disconnect)
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def create_app(engine, *, queue_size: int = 16, limits: Limits | None = None, credentials=None,
               max_body: int = 32 << 20, default_size=None) -> FastAPI:
    """The application around ``engine`` (sdcore.serve.runner.Engine). ``app.state.queue.close()`` starts
    the shutdown: no new job, the waiting ones answered 503, the running one finishes."""
    from sdcore import __version__

    limits = limits or Limits()
    app = FastAPI(title="sdcore", version=__version__, description="AUTOMATIC1111-compatible /sdapi/v1 API")
    queue = JobQueue(queue_size)
    app.state.queue, app.state.engine = queue, engine
    app.add_middleware(Guard, credentials=credentials, max_body=max_body)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # FastAPI's own 422 body, except that an input JSON can't hold (1e999 parses to inf) is sent as text.
        return JSONResponse({"detail": jsonable_encoder(_json_safe(exc.errors()))}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return a1111_error(exc.status_code, exc, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
        return a1111_error(500, exc, f"internal error: {type(exc).__name__}: {exc}")

    async def run(job: Job, request: Request):
        """Queue ``job`` and wait for it. A client that goes away while its job waits frees its place; one
        that goes away while its job runs interrupts it (nobody would read the images)."""
        try:
            queue.submit(job)
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except Closed as exc:
            raise HTTPException(503, str(exc)) from None
        waiting = asyncio.wrap_future(job.future)
        while not waiting.done():
            await asyncio.wait([waiting], timeout=POLL)
            if not waiting.done() and await request.is_disconnected():
                if not queue.cancel(job):
                    job.interrupted = True
                return JSONResponse(None, status_code=499)  # nobody reads it
        try:
            return waiting.result()
        except asyncio.CancelledError:
            return JSONResponse(None, status_code=499)
        except Invalid as exc:
            raise RequestValidationError(exc.errors) from None
        except Closed as exc:
            raise HTTPException(503, str(exc)) from None

    async def generate(req, kind: str, request: Request):
        if req.save_images and engine.outdir is None:
            raise RequestValidationError([error("save_images", "this server keeps no images (start it with "
                                                               "--outdir to allow save_images)", True)])
        try:
            plan = await run_in_threadpool(build, req, kind, options=dict(engine.options), limits=limits,
                                           lora_dir=engine.lora_dir, find_model=engine.find_model,
                                           default_size=default_size)
        except Invalid as exc:
            raise RequestValidationError(exc.errors) from None
        return await run(Job(lambda job: engine.run(plan, job), kind), request)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate(req, "txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate(req, "img2img", request)

    @app.get("/sdapi/v1/options")
    async def get_options():
        return dict(engine.options)

    @app.post("/sdapi/v1/options")
    async def set_options(changes: dict, request: Request):
        errors = []
        for key, value in changes.items():
            problem = opts.check(key, value)
            if not problem and key == "sd_model_checkpoint":
                try:
                    changes[key] = engine.find_model(value)
                except ValueError as exc:
                    problem = str(exc)
            if problem:
                errors.append(error(key, problem, value))
        if errors:
            raise RequestValidationError(errors)
        await run(Job(lambda job: engine.set_options(changes), "options"), request)
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": e.title, "model_name": e.name, "hash": None, "sha256": None,
                 "filename": str(e.path) if e.path else e.title, "config": None} for e in engine.entries()]

    @app.get("/sdapi/v1/loras")
    async def loras():
        from . import files

        return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}}
                for e in files.loras(engine.lora_dir)]

    @app.get("/sdapi/v1/samplers")
    async def sampler_list():
        return samplers.samplers_list()

    @app.get("/sdapi/v1/schedulers")
    async def scheduler_list():
        return samplers.schedulers_list()

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        job = queue.current
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                 "queued": len(queue)}
        if job is None or job.started is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": None, "current_task": None}
        fraction, elapsed = job.progress(), time.monotonic() - job.started
        state.update(skipped=job.skipped, interrupted=job.interrupted, job=job.description,
                     job_count=job.job_count, job_no=job.job_no, sampling_step=job.step,
                     sampling_steps=job.steps, job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        image = None if skip_current_image else preview(job.latents)
        return {"progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
                "state": state, "current_image": image, "textinfo": None, "current_task": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        queue.interrupt()

    @app.post("/sdapi/v1/skip")
    async def skip():
        queue.skip()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    return app
