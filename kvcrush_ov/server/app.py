"""The HTTP app: OpenAI's /v1/completions, /v1/chat/completions (server-sent events when
``stream`` is true), /v1/models, plus /health and /metrics (Prometheus text format).

One :class:`EngineLoop` serves every request; a client that disconnects cancels its request (its
KV blocks are freed at the engine's next step); an invalid request gets HTTP 400 with an
OpenAI-style error body naming the field, an unknown model 404, a missing or wrong API key 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kvcrush_ov.backends.native import check_eviction
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.model_info import block_size_for
from kvcrush_ov.pipeline import Pipeline
from kvcrush_ov.server import openai_api as api
from kvcrush_ov.server.engine_loop import EngineLoop, ServerRequest


def _bad(e: ConfigError, status: int = 400) -> JSONResponse:
    return JSONResponse(api.error(status, str(e), e.field), status_code=status)


def create_app(pipe: Pipeline, model_name: str, api_key: str | None = None) -> Starlette:
    """The app serving ``pipe`` (native backend) as ``model_name``."""
    state: dict = {"loop": None, "started": time.time()}

    def engine() -> EngineLoop:
        if state["loop"] is None:
            state["loop"] = EngineLoop(pipe)
        return state["loop"]

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and secrets.compare_digest(got[7:], api_key)

    def unauthorized() -> JSONResponse:
        return JSONResponse(api.error(401, "a valid API key is required: header "
                                      "'Authorization: Bearer <key>'", None,
                                      "authentication_error", "invalid_api_key"),
                            status_code=401)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(state["started"]),
             "owned_by": "kvcrush-ov"}]})

    async def metrics(request: Request) -> Response:
        s = engine().snapshot()
        lines = []
        for name, key, kind in (
                ("kvcrush_requests_running", "requests_running", "gauge"),
                ("kvcrush_requests_waiting", "requests_waiting", "gauge"),
                ("kvcrush_kv_blocks_used", "kv_blocks_used", "gauge"),
                ("kvcrush_kv_blocks_free", "kv_blocks_free", "gauge"),
                ("kvcrush_kv_blocks_total", "kv_blocks_total", "gauge"),
                ("kvcrush_kv_bytes_saved_by_eviction", "kv_bytes_saved", "gauge"),
                ("kvcrush_preemptions_total", "preemptions", "counter"),
                ("kvcrush_engine_failures_total", "failures", "counter")):
            lines += [f"# TYPE {name} {kind}", f"{name} {s[key]:g}"]
        lines.append("# TYPE kvcrush_requests_finished_total counter")
        for reason, n in sorted(s["finished"].items()):
            lines.append(f'kvcrush_requests_finished_total{{finish_reason="{reason}"}} {n}')
        lines += s["ttft"] + s["tpot"]
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4")

    def parse(body: object, kind: str) -> tuple[dict, ServerRequest]:
        req = api.parse(body, kind, model_name)
        spec = None
        if req["eviction"] is not None:
            if pipe.eviction is None:
                raise ConfigError("kv_cache_eviction", body.get("kv_cache_eviction"),
                                  "null: this server runs without eviction (start it with "
                                  "--budget)")
            if req["eviction"].importance == "upstream" \
                    or pipe.eviction.importance == "upstream":
                raise ConfigError("kv_cache_eviction.importance", req["eviction"].importance,
                                  "a native policy, per request on a server that runs one")
            if req["eviction"].importance == "kvzap" and pipe.eviction.importance != "kvzap":
                raise ConfigError("kv_cache_eviction.importance", "kvzap",
                                  "another importance on a server started without KVzap "
                                  "(kvcrush-ov serve --importance kvzap)")
            try:
                check_eviction(req["eviction"], block_size_for(pipe.device))
            except ConfigError as e:
                raise api.renamed(e) from None
            spec = make_spec(req["eviction"], pipe.model_path)
        return req, ServerRequest(config=req["config"], prompt=req.get("prompt"),
                                  messages=req.get("messages"), eviction=spec)

    async def generate(request: Request, kind: str) -> Response:
        if not authorized(request):
            return unauthorized()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return JSONResponse(api.error(400, "the body is not valid JSON", "body"),
                                status_code=400)
        try:
            parsed, sreq = parse(body, kind)
        except ConfigError as e:
            return _bad(e)
        if body["model"] != model_name:
            return JSONResponse(api.error(404, f"model {body['model']!r} does not exist: this "
                                          f"server serves {model_name!r}", "model",
                                          code="model_not_found"), status_code=404)
        loop = engine()
        sreq.loop, sreq.events = asyncio.get_running_loop(), asyncio.Queue()
        loop.submit(sreq)
        first = await sreq.events.get()
        if first[0] == "error":
            e = first[1]
            if isinstance(e, ConfigError):
                return _bad(api.renamed(e))
            return JSONResponse(api.error(500, f"the engine failed: {e}", None, "server_error"),
                                status_code=500)
        prompt_tokens = first[1]
        rid = api.new_id(kind)
        if parsed["stream"]:
            return StreamingResponse(_sse(request, loop, sreq, kind, rid, prompt_tokens),
                                     media_type="text/event-stream")
        return await _whole(request, loop, sreq, kind, rid, prompt_tokens)

    async def _whole(request: Request, loop: EngineLoop, sreq: ServerRequest, kind: str,
                     rid: str, prompt_tokens: int) -> Response:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, loop, sreq))
        try:
            while True:
                ev = await sreq.events.get()
                if ev[0] == "end":
                    _, reason, text, n = ev
                    return JSONResponse(api.body(kind, rid, model_name, text, reason,
                                                 api.usage(prompt_tokens, n)))
                if ev[0] == "error":
                    return JSONResponse(api.error(500, f"the engine failed: {ev[1]}", None,
                                                  "server_error"), status_code=500)
        finally:
            watcher.cancel()

    async def _sse(request: Request, loop: EngineLoop, sreq: ServerRequest, kind: str,
                   rid: str, prompt_tokens: int) -> AsyncIterator[str]:
        done = False
        try:
            yield _event(api.chunk(kind, rid, model_name, None, None, first=True))
            while True:
                ev = await sreq.events.get()
                if ev[0] == "text":
                    yield _event(api.chunk(kind, rid, model_name, ev[1], None))
                elif ev[0] == "end":
                    final = api.chunk(kind, rid, model_name, None, ev[1])
                    final["usage"] = api.usage(prompt_tokens, ev[3])
                    yield _event(final)
                    break
                else:
                    yield _event(api.error(500, f"the engine failed: {ev[1]}", None,
                                           "server_error"))
                    break
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server stops): free the request
                loop.cancel(sreq)

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine()
        yield
        if state["loop"] is not None:
            await asyncio.to_thread(state["loop"].stop)

    app = Starlette(middleware=[Middleware(ProcessHeader)], routes=[
        Route("/health", health), Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.engine = engine
    return app


class ProcessHeader:
    """Every response says which server process answered (``X-Kvcrush-Process``: host:pid), so
    a client can see how requests spread over replicas."""

    def __init__(self, app) -> None:
        import os
        import socket

        self.app = app
        self.value = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-kvcrush-process", self.value)]
            await send(message)

        await self.app(scope, receive, send_with_header)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _cancel_on_disconnect(request: Request, loop: EngineLoop, sreq: ServerRequest) -> None:
    while True:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            loop.cancel(sreq)
            return


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but SIGTERM / SIGINT end it with exit status 0 once running requests
    finished (uvicorn re-raises the signal after its graceful shutdown, so the process would
    die of it); a second SIGINT forces the exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def handle(sig: int, frame: object) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
