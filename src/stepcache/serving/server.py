"""The policy server: an :class:`~stepcache.omni.Omni`'s sessions over HTTP (FastAPI + uvicorn).

Endpoints (JSON):

- ``GET /health``: model, cache backend, open sessions, their memory, the engine's counters;
- ``POST /sessions`` ``{"seed": 0}`` -> 201 ``{"session_id": ...}`` (503 when ``max_sessions`` are open);
- ``GET /sessions/{id}``: the session's chunk counter, idle time and memory;
- ``POST /sessions/{id}/reset`` ``{"seed": 3}``: a new episode in the same session;
- ``POST /sessions/{id}/chunks`` ``{"frame": [[...]] (S x S, grey in [0, 1]), "instruction": "reach the
  ring" (or 0..2), "state": [x, y], "return_frames": false}`` -> ``{"actions": [[dx, dy], ...],
  "frames": null | [[[...]]], "stats": {...}}``;
- ``DELETE /sessions/{id}`` -> 204.

Errors: a bad payload gets 422 with ``detail[0].loc`` naming the field (NaN, Infinity, huge integers,
strings or booleans for numbers and values outside the trained range included; at most
:data:`MAX_ERRORS` listed); a body above ``max_request_bytes`` 413 before it is parsed; an unknown
session 404 (closed, expired, or lost to a restart: sessions live in this process's memory only); a
second chunk on a session whose chunk is still in flight 409; a chunk that fails on the server 500,
its session rolled back to before the chunk (other sessions are not touched). A chunk whose outputs
are not finite is never served. Sessions idle for ``session_ttl_s`` are closed.

Why FastAPI + uvicorn: request validation that names the offending field comes with the framework
(pydantic), handlers are asyncio coroutines that await the batching engine without a thread per
waiting robot, and both are maintained, widely deployed and pure Python on top of what the project
already installs (pydantic, anyio, h11).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.websockets import WebSocket

from stepcache.models.dreamzero.world import INSTRUCTIONS
from stepcache.omni import Omni, SessionBusyError, SessionClosedError
from stepcache.serving.chunks import (
    ChunkRequestError,
    ModelInputs,
    checked_array,
    checked_instruction,
    generate_chunk,
    open_session_within,
)
from stepcache.serving.openpi import DEFAULT_MAX_MESSAGE_BYTES, add_openpi_route, deny

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SESSION_TTL_S = 300.0
DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # a valid chunk request is about 20 KB
MAX_ERRORS = 10  # validation errors listed in one 422 (a 1-D frame would otherwise list one per element)
_EXPIRED_REMEMBERED = 1024  # ids of expired sessions kept for a clearer 404
HTTP_FIELDS = {"observation": "frame", "state": "state"}  # the pipeline's input names -> this API's fields


class OpenSession(BaseModel):
    """``POST /sessions``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    seed: StrictInt = Field(0, ge=0, lt=2**63, description="seeds the session's chunk noise")


class ResetSession(BaseModel):
    """``POST /sessions/{id}/reset``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63, description="reseed the noise (default: keep it)")


class Observation(BaseModel):
    """``POST /sessions/{id}/chunks``: what the robot sees and where it is."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    frame: list[list[StrictFloat]] = Field(description="grey frame (frame_size x frame_size), values in [0, 1]")
    instruction: StrictStr | StrictInt = Field(description=f"one of {list(INSTRUCTIONS)} or its index")
    state: list[StrictFloat] = Field(description="robot state (state_dim numbers), values in [0, 1]")
    return_frames: StrictBool = Field(False, description="also return the predicted frames")


class RequestTooLarge(Exception):
    """A request body above the server's ``max_request_bytes``."""


class _TooManyDigits:
    """An integer literal too long for Python's int parsing (``sys.get_int_max_str_digits``): left to
    validation, which refuses it naming its field, instead of failing the whole body."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _TooManyDigits:
    try:
        return int(text)
    except ValueError:
        return _TooManyDigits(text)


def _parse_json(raw: bytes) -> Any:
    """The body as JSON; NaN and Infinity become floats that validation refuses, naming the field."""
    return json.loads(raw, parse_int=_parse_int)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (:class:`RequestTooLarge`) as soon as it is known to exceed ``limit`` bytes:
    from ``Content-Length`` before reading, else while it streams in; never held whole when too large."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestTooLarge(int(length))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _documented_body(model: type[BaseModel], required: bool) -> dict[str, Any]:
    """The OpenAPI entry of a body that the handler reads itself (to bound and parse it safely)."""
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _describe_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors as JSON-safe entries (no echo of the input, which may be NaN or huge), at most
    :data:`MAX_ERRORS` of them (the last says how many more there were)."""
    detail = []
    for error in errors[:MAX_ERRORS]:
        message = error["msg"]
        value = error.get("input")
        if isinstance(value, _TooManyDigits):
            message = f"an integer of {value.digits} digits is out of range"
        elif isinstance(value, float) and not math.isfinite(value):
            message = f"{message} (got {value!r}: NaN and Infinity are not allowed)"
        elif error["type"] != "missing" and not isinstance(value, (dict, list)):
            message = f"{message} (got {_describe_input(value)})"
        detail.append({"loc": ["body", *error["loc"]], "msg": message, "type": error["type"]})
    if len(errors) > MAX_ERRORS:
        detail.append({"loc": ["body"], "msg": f"... and {len(errors) - MAX_ERRORS} more errors",
                       "type": "too_many_errors"})
    return detail


def _field_error(field: str, message: str, status: int = 422) -> Exception:
    return _field_error_at([field], message, status)


def _field_error_at(loc: list[str], message: str, status: int = 422) -> Exception:
    return HTTPException(status_code=status, detail=[{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


def _http_error(error: ChunkRequestError) -> HTTPException:
    """A refusal of the shared session layer as this API's answer: a field's in ``detail[0].loc``."""
    if error.field is not None:
        return _field_error(error.field, error.message, error.status)
    return HTTPException(error.status, error.message)


def unknown_session(session_id: str) -> str:
    """The 404 for a session id the server does not hold: sessions live in this process's memory only."""
    return (f"unknown session {session_id!r}: it may have been closed, expired, or lost when the server restarted "
            "(sessions live in memory only); open a new one with POST /sessions")


def create_app(
    omni: Omni,
    *,
    session_ttl_s: float = DEFAULT_SESSION_TTL_S,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    sweep_interval_s: float | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI application serving ``omni``'s sessions.

    Args:
        omni: the loaded model (its engine batches the sessions' chunks).
        session_ttl_s: a session idle (no chunk in flight) for longer is closed.
        max_sessions: sessions open at once; opening one more gets 503.
        sweep_interval_s: how often idle sessions are looked for (default: a quarter of the TTL,
            at most 10 s).
        max_request_bytes: a request body above this size gets 413 before it is parsed.
        max_message_bytes: an openpi websocket message above this size closes its connection (1009)
            before it is held whole (the websocket layer's limit: :func:`uvicorn_config` passes it on).
        api_key: when given, every request and connection must carry ``Authorization: Api-Key <key>``
            (openpi's header); others get 401 before any work.
    """
    if not (isinstance(session_ttl_s, (int, float)) and math.isfinite(session_ttl_s) and session_ttl_s > 0):
        raise ValueError(f"session_ttl_s must be a number > 0, got {session_ttl_s!r}")
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
        raise ValueError(f"max_sessions must be an integer >= 1, got {max_sessions!r}")
    for name, value in (("max_request_bytes", max_request_bytes), ("max_message_bytes", max_message_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_api_key(api_key)
    interval = sweep_interval_s if sweep_interval_s is not None else min(10.0, session_ttl_s / 4)
    inputs = ModelInputs.of(omni)
    expired: OrderedDict[str, float] = OrderedDict()
    expiry_events: dict[str, asyncio.Event] = {}  # openpi connections, told when their session expires

    def sweep() -> None:
        for session_id in omni.close_idle_sessions(session_ttl_s):
            event = expiry_events.get(session_id)
            if event is not None:
                event.set()
            expired[session_id] = time.time()
            while len(expired) > _EXPIRED_REMEMBERED:
                expired.popitem(last=False)
            logger.info("session %s expired after %.0f s idle", session_id, session_ttl_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async def sweeper() -> None:
            while True:
                await asyncio.sleep(interval)
                sweep()

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(omni.close)

    app = FastAPI(title="stepcache policy server", lifespan=lifespan,
                  description="DreamZero-style world-action model sessions with StepCache")
    app.state.omni = omni
    app.state.max_message_bytes = max_message_bytes
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    add_openpi_route(app, omni, session_ttl_s=session_ttl_s, max_sessions=max_sessions,
                     max_message_bytes=max_message_bytes, sweep=sweep, expiry_events=expiry_events)

    def session_or_404(session_id: str) -> Any:
        try:
            return omni.session(session_id)
        except KeyError:
            if session_id in expired:
                raise HTTPException(404, f"session {session_id!r} expired after {session_ttl_s:g} s idle; "
                                         "open a new one") from None
            raise HTTPException(404, unknown_session(session_id)) from None

    async def body_of(request: Request, model: type[BaseModel], optional: bool) -> Any:
        try:
            raw = await _read_body(request, max_request_bytes)
        except RequestTooLarge as error:
            raise HTTPException(413, f"the request body ({error.args[0]} bytes or more) exceeds the server's limit of "
                                     f"{max_request_bytes} bytes (stepcache serve --max-request-bytes)") from None
        if optional and not raw.strip():
            return model()
        try:
            data = _parse_json(raw)
        except (ValueError, RecursionError) as error:
            raise _field_error_at([], f"the body is not JSON text: {type(error).__name__}: "
                                      f"{_describe_input(str(error))}") from None
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise HTTPException(422, _validation_errors(error.errors())) from None

    def describe(session: Any) -> dict[str, Any]:
        return {"session_id": session.id, "seed": session.seed, "chunk_index": session.chunk_index,
                "busy": session.busy, "idle_s": session.idle_s, "bytes": session.nbytes(),
                "expires_after_idle_s": session_ttl_s}

    @app.get("/health")
    def health() -> dict[str, Any]:
        sessions = omni.sessions
        return {
            "status": "ok",
            "model": str(omni.model),
            "cache_backend": omni.cache_backend_name,
            "decision": omni.engine.config.decision,
            "batching": omni.engine.config.batching,
            "sessions": len(sessions),
            "max_sessions": max_sessions,
            "session_ttl_s": session_ttl_s,
            "session_bytes": sum(session.nbytes() for session in sessions),
            "engine": omni.engine.stats.to_dict(),
            "inputs": {"frame": {"shape": list(inputs.frame_shape), "range": list(inputs.value_range)},
                       "state": {"shape": list(inputs.state_shape), "range": list(inputs.value_range)}},
            "max_request_bytes": max_request_bytes,
            "max_message_bytes": max_message_bytes,
            "openpi_websocket": "/",
            "sessions_persist": False,  # in this process's memory only: a restart loses them
        }

    @app.post("/sessions", status_code=201, openapi_extra=_documented_body(OpenSession, required=False))
    async def open_session(request: Request) -> dict[str, Any]:
        body = await body_of(request, OpenSession, optional=True)
        sweep()
        try:
            session = open_session_within(omni, body.seed, max_sessions, session_ttl_s)
        except ChunkRequestError as error:
            raise _http_error(error) from None
        return describe(session)

    @app.get("/sessions/{session_id}")
    def get_session(session_id: str) -> dict[str, Any]:
        return describe(session_or_404(session_id))

    @app.delete("/sessions/{session_id}", status_code=204, response_class=Response, response_model=None)
    def close_session(session_id: str) -> Response:
        session_or_404(session_id).close()
        return Response(status_code=204)

    @app.post("/sessions/{session_id}/reset", openapi_extra=_documented_body(ResetSession, required=False))
    async def reset_session(session_id: str, request: Request) -> dict[str, Any]:
        session = session_or_404(session_id)
        body = await body_of(request, ResetSession, optional=True)
        try:
            session.start_episode(body.seed)
        except SessionBusyError as error:
            raise HTTPException(409, str(error)) from None
        except SessionClosedError:
            raise HTTPException(404, unknown_session(session_id)) from None
        return describe(session)

    @app.post("/sessions/{session_id}/chunks", openapi_extra=_documented_body(Observation, required=True))
    async def generate(session_id: str, request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        session = session_or_404(session_id)
        body = await body_of(request, Observation, optional=False)
        try:
            frame = checked_array(body.frame, "frame", inputs.frame_shape, inputs.value_range)
            state = checked_array(body.state, "state", inputs.state_shape, inputs.value_range)
            instruction = checked_instruction(body.instruction, "instruction")
            output = await generate_chunk(session, frame, instruction, state, HTTP_FIELDS)
        except ChunkRequestError as error:
            if error.status == 404:
                raise HTTPException(404, unknown_session(session_id)) from None
            raise _http_error(error) from None
        stats = output.stats.to_dict()
        stats["server_s"] = time.perf_counter() - start
        return {
            "actions": output.actions.tolist(),
            "frames": output.frames.tolist() if body.return_frames else None,
            "stats": stats,
        }

    return app


API_KEY_ENV = "STEPCACHE_API_KEY"


def check_api_key(api_key: str | None) -> None:
    """An API key is printable ASCII without spaces (it travels in a header), at least 8 characters."""
    if api_key is None:
        return
    if not isinstance(api_key, str) or len(api_key) < 8 or not all(33 <= ord(c) < 127 for c in api_key):
        raise ValueError("the API key must be at least 8 printable ASCII characters without spaces")


class ApiKeyMiddleware:
    """Refuse every HTTP request and websocket connection without ``Authorization: Api-Key <key>``
    (openpi's header) before the application sees it: 401, nothing parsed, no session opened."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Api-Key {api_key}".encode()

    def _authorised(self, scope: dict[str, Any]) -> bool:
        given = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self.expected)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        message = ("missing or wrong API key: send the header 'Authorization: Api-Key <key>' (openpi-client: "
                   "WebsocketClientPolicy(..., api_key=KEY))")
        if scope["type"] == "http":
            response = JSONResponse({"detail": message}, status_code=401, headers={"WWW-Authenticate": "Api-Key"})
            await response(scope, receive, send)
        else:
            await deny(WebSocket(scope, receive, send), 401, message)


def uvicorn_config(app: Any, log_level: str) -> Any:
    """uvicorn's settings for ``app``: the websocket layer enforces the app's message limit, and no
    per-message compression (openpi clients ask for none; inflating an untrusted peer's data costs CPU)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, lifespan="on", ws_max_size=app.state.max_message_bytes,
                          ws_per_message_deflate=False)


def bind_socket(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); OSError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (with proto 0,
    # Nagle's algorithm holds each response's body back until the client's delayed ACK: 40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """uvicorn serving an app on a socket, in a background thread (tests and benchmarks).

    Example:
        >>> with ServerThread(create_app(omni)) as server:          # doctest: +SKIP
        ...     httpx.get(f"{server.url}/health").json()["status"]
        'ok'
    """

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, *, log_level: str = "warning") -> None:
        import uvicorn

        self.socket = bind_socket(host, port)
        self.url = socket_url(self.socket)
        self.server = uvicorn.Server(uvicorn_config(app, log_level))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name="stepcache-server", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server at {self.url} did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(omni: Omni, sock: socket.socket, *, session_ttl_s: float = DEFAULT_SESSION_TTL_S,
          max_sessions: int = DEFAULT_MAX_SESSIONS, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve ``omni`` on the listening socket ``sock`` until interrupted (``stepcache serve``)."""
    import uvicorn

    app = create_app(omni, session_ttl_s=session_ttl_s, max_sessions=max_sessions,
                     max_request_bytes=max_request_bytes, max_message_bytes=max_message_bytes, api_key=api_key)
    server = uvicorn.Server(uvicorn_config(app, log_level))
    server.run(sockets=[sock])
