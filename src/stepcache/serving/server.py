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

Errors: a bad payload gets 422 with ``detail[0].loc`` naming the field; an unknown (or expired) session
404; a second chunk on a session whose chunk is still in flight 409; a chunk that fails on the server
500, its session rolled back to before the chunk (other sessions are not touched). Sessions idle for
``session_ttl_s`` are closed.

Why FastAPI + uvicorn: request validation that names the offending field comes with the framework
(pydantic), handlers are asyncio coroutines that await the batching engine without a thread per
waiting robot, and both are maintained, widely deployed and pure Python on top of what the project
already installs (pydantic, anyio, h11).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from stepcache.models.dreamzero.world import INSTRUCTIONS, instruction_index
from stepcache.omni import Omni, SessionBusyError, SessionClosedError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SESSION_TTL_S = 300.0
DEFAULT_MAX_SESSIONS = 64
_EXPIRED_REMEMBERED = 1024  # ids of expired sessions kept for a clearer 404


class OpenSession(BaseModel):
    """``POST /sessions``."""

    model_config = ConfigDict(extra="forbid")
    seed: StrictInt = Field(0, ge=0, lt=2**63, description="seeds the session's chunk noise")


class ResetSession(BaseModel):
    """``POST /sessions/{id}/reset``."""

    model_config = ConfigDict(extra="forbid")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63, description="reseed the noise (default: keep it)")


class Observation(BaseModel):
    """``POST /sessions/{id}/chunks``: what the robot sees and where it is."""

    model_config = ConfigDict(extra="forbid")
    frame: list[list[float]] = Field(description="grey frame (frame_size x frame_size), values in [0, 1]")
    instruction: StrictStr | StrictInt = Field(description=f"one of {list(INSTRUCTIONS)} or its index")
    state: list[float] = Field(description="robot state (state_dim numbers)")
    return_frames: StrictBool = Field(False, description="also return the predicted frames")


def _field_error(field: str, message: str, status: int = 422) -> Exception:
    return HTTPException(status_code=status, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def _array(value: Any, field: str, shape: tuple[int, ...], low: float | None = None,
           high: float | None = None) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise _field_error(field, f"{field} must be an array of numbers of shape {list(shape)}") from None
    if array.shape != shape:
        raise _field_error(field, f"{field} must have shape {list(shape)}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise _field_error(field, f"{field} must be finite (no NaN or infinity)")
    if low is not None and (array.min() < low or array.max() > high):
        raise _field_error(field, f"{field} values must lie in [{low}, {high}], got [{array.min():.4g}, "
                                  f"{array.max():.4g}]")
    return array


def create_app(
    omni: Omni,
    *,
    session_ttl_s: float = DEFAULT_SESSION_TTL_S,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    sweep_interval_s: float | None = None,
) -> FastAPI:
    """The FastAPI application serving ``omni``'s sessions.

    Args:
        omni: the loaded model (its engine batches the sessions' chunks).
        session_ttl_s: a session idle (no chunk in flight) for longer is closed.
        max_sessions: sessions open at once; opening one more gets 503.
        sweep_interval_s: how often idle sessions are looked for (default: a quarter of the TTL,
            at most 10 s).
    """
    if not (isinstance(session_ttl_s, (int, float)) and math.isfinite(session_ttl_s) and session_ttl_s > 0):
        raise ValueError(f"session_ttl_s must be a number > 0, got {session_ttl_s!r}")
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
        raise ValueError(f"max_sessions must be an integer >= 1, got {max_sessions!r}")
    interval = sweep_interval_s if sweep_interval_s is not None else min(10.0, session_ttl_s / 4)
    model_cfg = omni.pipeline.transformer.config
    frame_shape = (model_cfg.frame_size, model_cfg.frame_size)
    state_shape = (model_cfg.state_dim,)
    expired: OrderedDict[str, float] = OrderedDict()

    def sweep() -> None:
        for session_id in omni.close_idle_sessions(session_ttl_s):
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

    def session_or_404(session_id: str) -> Any:
        try:
            return omni.session(session_id)
        except KeyError:
            if session_id in expired:
                raise HTTPException(404, f"session {session_id!r} expired after {session_ttl_s:g} s idle; "
                                         "open a new one") from None
            raise HTTPException(404, f"unknown session {session_id!r}") from None

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
        }

    @app.post("/sessions", status_code=201)
    def open_session(body: OpenSession | None = None) -> dict[str, Any]:
        sweep()
        if len(omni.sessions) >= max_sessions:
            raise HTTPException(503, f"the server holds its maximum of {max_sessions} sessions; close one, or wait "
                                     f"for idle ones to expire ({session_ttl_s:g} s)")
        session = omni.open_session(seed=(body or OpenSession()).seed)
        return describe(session)

    @app.get("/sessions/{session_id}")
    def get_session(session_id: str) -> dict[str, Any]:
        return describe(session_or_404(session_id))

    @app.delete("/sessions/{session_id}", status_code=204, response_class=Response, response_model=None)
    def close_session(session_id: str) -> Response:
        session_or_404(session_id).close()
        return Response(status_code=204)

    @app.post("/sessions/{session_id}/reset")
    def reset_session(session_id: str, body: ResetSession | None = None) -> dict[str, Any]:
        session = session_or_404(session_id)
        try:
            session.start_episode((body or ResetSession()).seed)
        except SessionBusyError as error:
            raise HTTPException(409, str(error)) from None
        except SessionClosedError:
            raise HTTPException(404, f"unknown session {session_id!r}") from None
        return describe(session)

    @app.post("/sessions/{session_id}/chunks")
    async def generate(session_id: str, body: Observation) -> dict[str, Any]:
        start = time.perf_counter()
        session = session_or_404(session_id)
        frame = _array(body.frame, "frame", frame_shape, 0.0, 1.0)
        state = _array(body.state, "state", state_shape)
        try:
            instruction = instruction_index(body.instruction)
        except ValueError as error:
            raise _field_error("instruction", str(error)) from None
        try:
            output = await session.agenerate(frame, instruction, state)
        except SessionBusyError as error:
            raise HTTPException(409, str(error)) from None
        except SessionClosedError:
            raise HTTPException(404, f"unknown session {session_id!r}") from None
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        except Exception as error:
            logger.exception("session %s: chunk failed", session_id)
            raise HTTPException(500, f"the chunk failed on the server ({type(error).__name__}: {error}); the "
                                     "session's episode is as before it, so the chunk can be retried") from None
        stats = output.stats.to_dict()
        stats["server_s"] = time.perf_counter() - start
        return {
            "actions": output.actions.tolist(),
            "frames": output.frames.tolist() if body.return_frames else None,
            "stats": stats,
        }

    return app


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
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
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
          max_sessions: int = DEFAULT_MAX_SESSIONS, log_level: str = "info") -> None:
    """Serve ``omni`` on the listening socket ``sock`` until interrupted (``stepcache serve``)."""
    import uvicorn

    app = create_app(omni, session_ttl_s=session_ttl_s, max_sessions=max_sessions)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    server.run(sockets=[sock])
