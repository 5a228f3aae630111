"""The step-verification service: FastAPI app over a loaded :class:`~crv.api.verifier.Verifier`.

Endpoints: ``POST /v1/verify``, ``POST /v1/intervene``, ``GET /v1/model``, ``GET /healthz``,
the trace viewer at ``/`` and the OpenAPI docs at ``/docs``. Model work runs one request at a
time on one dedicated model thread (the model is not re-entrant); requests wait in a bounded
queue, and a full queue answers 429 with ``Retry-After``. torch's OpenMP team belongs to the
calling thread: two threads that each run torch ops with several threads keep two teams, which
fight over the cores (measured: the verifier 2x slower on 2 cores). So the model thread sets
``ServiceSettings.torch_threads`` for itself, and ``crv serve`` keeps the main thread at one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from crv.api.schemas import (MAX_STEPS, InterveneRequest, InterveneResponse, Problem, StepResult, TopFeature, VerifyRequest,
                             VerifyResponse)
from crv.api.verifier import StepFormatError, Verifier, split_text
from crv.lm.encode import UnknownCharacterError

STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "CRV_API_KEY"


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and access of the service."""

    max_body_bytes: int = 64_000  # 413 above
    max_chars: int = 4_000  # question + steps, 413 above
    max_steps: int = MAX_STEPS  # 413 above (the schema refuses more than MAX_STEPS with 422)
    max_tokens: int | None = None  # default: the model's context; 413 above
    max_queue: int = 16  # requests waiting for the model; 429 above
    max_wait_s: float = 2.0  # an accepted request waits at most this long for the model, else 503 + Retry-After
    retry_after_s: int = 1
    api_key: str | None = None  # required on /v1/* when set
    torch_threads: int = 0  # torch threads of the model thread (0: torch's default)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: set {API_KEY_ENV} (loopback needs none)")


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body crosses the limit: an HTTPException, so FastAPI's body reader passes
    it on as a 413 (it turns any other exception there into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: at most ``limit`` request-body bytes on any path, counted as they stream in.

    A declared ``Content-Length`` over the limit is answered 413 before anything is read; a body without one
    (chunked) is counted chunk by chunk and answered 413 as soon as it crosses the limit, so a client can never
    make the server hold more than ``limit`` bytes of one body. Nothing is read that the app does not ask for.
    """

    def __init__(self, app, limit: int) -> None:  # type: ignore[no-untyped-def]
        self.app, self.limit = app, limit

    async def _too_large(self, send) -> None:  # type: ignore[no-untyped-def]
        body = ('{"detail": "request body over the limit of %d bytes"}' % self.limit).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send)
        received, started = 0, False

        async def limited_receive():  # type: ignore[no-untyped-def]
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        async def tracking_send(message):  # type: ignore[no-untyped-def]
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send)


class ApiKeyAuth:
    """ASGI middleware: ``/v1/*`` needs the API key (``X-API-Key`` or ``Authorization: Bearer``) when one is set.
    It reads headers only; the body is never touched here."""

    def __init__(self, app, api_key: str | None) -> None:  # type: ignore[no-untyped-def]
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http" and self.api_key and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                response = JSONResponse({"detail": "missing or wrong API key (X-API-Key or Authorization: Bearer)"}, 401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class Metrics:
    """Counters and sums for ``GET /metrics`` (Prometheus text format 0.0.4)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.wait_count, self.wait_sum, self.wait_max = 0, 0.0, 0.0
        self.model_count, self.model_sum = 0, 0.0
        self.stage_seconds: dict[str, float] = {}

    def observe_wait(self, seconds: float) -> None:
        self.wait_count, self.wait_sum, self.wait_max = self.wait_count + 1, self.wait_sum + seconds, max(self.wait_max, seconds)

    def text(self, queue_length: int) -> str:
        lines = ["# HELP crv_queue_length Requests waiting for or running on the model.", "# TYPE crv_queue_length gauge",
                 f"crv_queue_length {queue_length}",
                 "# HELP crv_requests_total Answered requests by path and status.", "# TYPE crv_requests_total counter"]
        lines += [f'crv_requests_total{{path="{path}",status="{status}"}} {n}'
                  for (path, status), n in sorted(self.requests.items())]
        lines += ["# HELP crv_queue_wait_seconds Time accepted requests waited for the model.",
                  "# TYPE crv_queue_wait_seconds summary", f"crv_queue_wait_seconds_count {self.wait_count}",
                  f"crv_queue_wait_seconds_sum {self.wait_sum:.6f}",
                  "# HELP crv_queue_wait_seconds_max Longest wait so far.", "# TYPE crv_queue_wait_seconds_max gauge",
                  f"crv_queue_wait_seconds_max {self.wait_max:.6f}",
                  "# HELP crv_model_seconds Time requests held the model.", "# TYPE crv_model_seconds summary",
                  f"crv_model_seconds_count {self.model_count}", f"crv_model_seconds_sum {self.model_sum:.6f}",
                  "# HELP crv_stage_seconds_total Engine time per stage (forward, rows, greedy, adjacency, logits).",
                  "# TYPE crv_stage_seconds_total counter"]
        lines += [f'crv_stage_seconds_total{{stage="{k}"}} {v:.6f}' for k, v in sorted(self.stage_seconds.items())]
        return "\n".join(lines) + "\n"


class _Queue:
    """At most one request on the model (always the same thread); at most ``limit`` waiting, each at most ``max_wait``."""

    def __init__(self, limit: int, torch_threads: int = 0, max_wait: float = 2.0, metrics: Metrics | None = None) -> None:
        self.limit, self.pending, self.max_wait = limit, 0, max_wait
        self.metrics = metrics or Metrics()
        self.lock = asyncio.Lock()
        init = (lambda: torch.set_num_threads(torch_threads)) if torch_threads else None
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crv-model", initializer=init)

    async def run(self, fn: Callable[[], Any], retry_after: int) -> Any:
        if self.pending >= self.limit + 1:
            raise HTTPException(429, f"queue full ({self.limit} requests waiting); retry later",
                                headers={"Retry-After": str(retry_after)})
        self.pending += 1
        start = time.monotonic()
        try:
            try:
                await asyncio.wait_for(self.lock.acquire(), timeout=self.max_wait)
            except asyncio.TimeoutError:
                raise HTTPException(503, f"the model stayed busy for {self.max_wait:g} s; retry later",
                                    headers={"Retry-After": str(retry_after)}) from None
            self.metrics.observe_wait(time.monotonic() - start)
            try:
                t0 = time.monotonic()
                return await asyncio.get_running_loop().run_in_executor(self.thread, fn)
            finally:
                self.metrics.model_count += 1
                self.metrics.model_sum += time.monotonic() - t0
                self.lock.release()
        finally:
            self.pending -= 1


def create_app(verifier: Verifier, settings: ServiceSettings = ServiceSettings()) -> FastAPI:
    """The service app around a loaded verifier."""
    metrics = Metrics()
    queue = _Queue(settings.max_queue, settings.torch_threads, settings.max_wait_s, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        queue.thread.shutdown(wait=True)  # the request in flight finishes; the model thread exits

    app = FastAPI(title="crv step verification", version="1", lifespan=lifespan,
                  description="Per-step fault probabilities of a chain of thought, from its attribution graphs (CRV).",
                  responses={413: {"model": Problem}, 422: {"model": Problem}, 429: {"model": Problem}, 401: {"model": Problem}})
    max_tokens = settings.max_tokens or verifier.att.model.config.max_position_embeddings

    app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    # outermost: the body limit holds on every path, whatever reads the body, as the bytes stream in
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msgs.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse({"detail": "; ".join(msgs) or "invalid request"}, 422)

    def check_size(task: str, question: str, steps: list[str]) -> None:
        if len(steps) > settings.max_steps:
            raise HTTPException(413, f"{len(steps)} steps: over the limit of {settings.max_steps} steps")
        chars = len(question) + sum(len(s) for s in steps)
        if chars > settings.max_chars:
            raise HTTPException(413, f"{chars} characters: over the limit of {settings.max_chars} characters")
        try:
            tokens = verifier.n_tokens(task, question, steps)
        except (StepFormatError, UnknownCharacterError, ValueError) as e:
            raise HTTPException(422, str(e)) from e
        if tokens > max_tokens:
            raise HTTPException(413, f"{tokens} tokens: over the limit of {max_tokens} tokens")

    @app.middleware("http")
    async def count(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        path = request.url.path if request.url.path in ("/v1/verify", "/v1/intervene", "/v1/model", "/healthz",
                                                        "/metrics") else "other"
        metrics.requests[(path, response.status_code)] = metrics.requests.get((path, response.status_code), 0) + 1
        return response

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "queue": queue.pending}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(queue.pending), media_type="text/plain; version=0.0.4")

    @app.get("/v1/model")
    async def model_info() -> dict:
        return {**verifier.info(), "limits": {"max_body_bytes": settings.max_body_bytes, "max_chars": settings.max_chars,
                                              "max_steps": settings.max_steps, "max_tokens": max_tokens,
                                              "max_queue": settings.max_queue}}

    @app.post("/v1/verify", response_model=VerifyResponse)
    async def verify(req: VerifyRequest) -> VerifyResponse:
        steps = req.steps if req.steps is not None else split_text(req.text or "")
        if not steps:
            raise HTTPException(422, "no steps to verify")
        check_size(req.task, req.question, steps)
        start = time.perf_counter()
        try:
            verdicts = await queue.run(lambda: verifier.verify(req.task, req.question, steps, req.include_graph,
                                                               stage_seconds=metrics.stage_seconds),
                                       settings.retry_after_s)
        except (StepFormatError, UnknownCharacterError) as e:
            raise HTTPException(422, str(e)) from e
        out = [StepResult(index=v.index, text=v.text, p_faulty=v.p_faulty, flagged=v.flagged, threshold=v.threshold,
                          top_features=[TopFeature(layer=l, position=p, feature=f, influence=i,
                                                   description=v.descriptions[j] if j < len(v.descriptions) else None)
                                        for j, (l, p, f, i) in enumerate(v.top_features)],
                          fingerprint=v.fingerprint, graph=v.graph) for v in verdicts]
        return VerifyResponse(steps=out, model=verifier.att.model_id, classifier=verifier.classifier_id,
                              elapsed_ms=1000 * (time.perf_counter() - start))

    @app.get("/v1/features/{layer}/{index}", responses={404: {"description": "no such feature in the set, or no "
                                                                                  "descriptions beside it (the message says which)"}})
    async def feature_card(layer: Annotated[int, PathParam(examples=[0])], index: Annotated[int, PathParam(examples=[12])]) -> dict:
        """One feature's card: activation examples, WeightLens input/output tokens, CircuitLens upstream."""
        if verifier.features is None:
            raise HTTPException(404, "no feature descriptions beside this transcoder set: write them with "
                                     "`crv describe-features --model DIR --transcoders DIR`")
        try:
            return verifier.features.card(layer, index).to_dict()
        except IndexError as e:
            raise HTTPException(404, str(e)) from e

    @app.post("/v1/intervene", response_model=InterveneResponse)
    async def intervene(req: InterveneRequest) -> InterveneResponse:
        from crv.api.intervene import run_intervention

        check_size(req.task, req.question, req.steps)
        try:
            return await queue.run(lambda: run_intervention(verifier, req), settings.retry_after_s)
        except (StepFormatError, UnknownCharacterError, ValueError) as e:
            raise HTTPException(422, str(e)) from e

    patterns = verifier.text_patterns() if hasattr(verifier, "text_patterns") else None

    def openapi() -> dict:
        """The schema, with the characters this model reads stated on every text field (a char-level vocabulary)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if patterns is not None:
                for name in ("VerifyRequest", "InterveneRequest"):
                    props = doc.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                    if "question" in props:
                        props["question"]["pattern"] = patterns["line"]
                    if "text" in props:
                        props["text"]["pattern"] = patterns["text"]
                    if "steps" in props and "items" in props["steps"]:
                        props["steps"]["items"]["pattern"] = patterns["line"]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
