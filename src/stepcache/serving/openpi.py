"""The openpi websocket policy protocol on ``stepcache serve``: robots that run openpi-client's
``WebsocketClientPolicy`` (or ``ActionChunkBroker`` around it) connect as they do to an openpi server.

The protocol (as the ``openpi-client`` package implements it):

- a websocket at ``/``; one connection is one session, opened on connect (``?seed=N`` in the query
  string, default 0), closed on disconnect, closed by the server after ``session_ttl_s`` idle;
- on connect the server sends one msgpack message of metadata (:func:`metadata`): the model, the keys
  to send with dtype and shape, what comes back, the cache config in force, the stepcache version;
- each request is one binary msgpack message, numpy arrays packed the way
  ``openpi_client.msgpack_numpy`` packs them (a map ``{b"__ndarray__": True, b"data", b"dtype",
  b"shape"}``); each reply is one msgpack map with ``"actions"`` (action_horizon x action_dim,
  float32), ``"server_timing"`` (``infer_ms``, ``queue_ms``, ``server_ms``) and ``"stepcache"``
  (forwards, schedule, chunk index, ...); ``"frames"`` only when the request says ``return_frames``;
- ``{"reset": True}`` (optionally with ``"seed"``) starts a new episode on the same connection and is
  answered ``{"reset": True, "seed", "chunk_index": 0}``;
- a refused request is answered with a text frame naming the key and what was expected (the client
  raises it as ``RuntimeError``); the session stays usable. Where the connection cannot go on, it is
  closed with a close reason: a message above ``max_message_bytes`` (1009, by the websocket layer,
  before it is held whole), an expired session (4408), a server that stops (1012, uvicorn's).

The observation keys (openpi's naming; shapes from the loaded model, :class:`~.chunks.ModelInputs`):
``observation/image`` is the model's grey frame (uint8 0..255 as cameras give it, divided by 255, or
a float dtype in [0, 1]), ``observation/state`` the robot state (a float dtype, in [0, 1]),
``prompt`` the instruction (its text, or its index).

Why a FastAPI websocket route, not the ``websockets`` library's own server: one server on one port
for both transports (uvicorn already speaks websockets through that library), one lifespan (the idle
sweeper and the model's shutdown), one API-key check in front of both, and the same session layer
(:mod:`.chunks`) without a second event loop or thread to hand sessions across. Arrays are packed
here rather than with ``openpi_client.msgpack_numpy``: that package declares ``numpy<2``, so the
server cannot depend on it; the wire format is a documented fact of the protocol, decoded with
stricter checks than the client needs (an untrusted peer may send any dtype or shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketState

import stepcache
from stepcache.config import describe_config
from stepcache.omni import Omni, Session, check_seed
from stepcache.serving.chunks import (
    ChunkRequestError,
    ModelInputs,
    checked_array,
    checked_instruction,
    generate_chunk,
    open_session_within,
)

logger = logging.getLogger(__name__)

IMAGE = "observation/image"
STATE = "observation/state"
PROMPT = "prompt"
RETURN_FRAMES = "return_frames"
RESET = "reset"
SEED = "seed"
CHUNK_KEYS = (IMAGE, STATE, PROMPT, RETURN_FRAMES)
RESET_KEYS = (RESET, SEED)
OPENPI_FIELDS = {"observation": IMAGE, "state": STATE}  # the pipeline's input names -> this protocol's keys

# A DROID observation (three 180x320x3 uint8 camera images and an 8-value state) packs to 518 KB; the
# default leaves it twice that. The bundled model's observation is about 4 KB.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
CLOSE_EXPIRED = 4408  # application close code: the session expired (idle)
_MAX_NDIM = 8
_ARRAY_KEYS = {b"__ndarray__", b"data", b"dtype", b"shape"}
_SCALAR_KEYS = {b"__npgeneric__", b"data", b"dtype"}
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: no object, void, complex, strings or dates


class ProtocolError(ValueError):
    """A message this protocol cannot take; ``key`` names the entry it is about (None: the message)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# -- the wire format ---------------------------------------------------------------------------------

def _pack_numpy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"cannot pack an array of dtype {value.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(value).tobytes(), b"dtype": value.dtype.str,
                b"shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    raise TypeError(f"cannot pack {type(value).__name__}")


def pack(message: Any) -> bytes:
    """``message`` as msgpack, numpy arrays and scalars as ``openpi_client.msgpack_numpy`` unpacks them."""
    return msgpack.packb(message, default=_pack_numpy, use_bin_type=True)


def _dtype(text: Any, key: str) -> np.dtype:
    try:
        dtype = np.dtype(text.decode() if isinstance(text, bytes) else text)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{key}: {text!r:.40} is not a numpy dtype", key) from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"{key}: dtype {dtype.str!r} is not allowed (numbers and booleans only)", key)
    return dtype


def _decode_value(value: Any, key: str) -> Any:
    """An entry of a request: an openpi-packed array or scalar as numpy, anything else as msgpack gave it."""
    if not isinstance(value, dict):
        return value
    if b"__ndarray__" in value:
        if set(value) != _ARRAY_KEYS:
            raise ProtocolError(f"{key}: a packed array has exactly the entries __ndarray__, data, dtype, shape", key)
        data, shape = value[b"data"], value[b"shape"]
        dtype = _dtype(value[b"dtype"], key)
        if not isinstance(data, bytes):
            raise ProtocolError(f"{key}: a packed array's data must be bytes", key)
        if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ProtocolError(f"{key}: a packed array's shape must be a list of at most {_MAX_NDIM} integers >= 0",
                                key)
        count = int(np.prod(shape, dtype=np.float64))
        if count * dtype.itemsize != len(data):
            raise ProtocolError(f"{key}: {len(data)} bytes of data do not fill shape {shape} of dtype {dtype.str}",
                                key)
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in value:
        if set(value) != _SCALAR_KEYS:
            raise ProtocolError(f"{key}: a packed scalar has exactly the entries __npgeneric__, data, dtype", key)
        dtype = _dtype(value[b"dtype"], key)
        try:
            return dtype.type(value[b"data"])
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError(f"{key}: {value[b'data']!r:.40} is not a value of dtype {dtype.str}", key) from None
    raise ProtocolError(f"{key}: a map is not allowed here (only packed numpy arrays)", key)


def unpack_request(raw: bytes) -> dict[str, Any]:
    """A request message as a dict of its entries, arrays decoded; :class:`ProtocolError` otherwise."""
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack's errors (ExtraData, FormatError, StackError, ...) and bad UTF-8
        raise ProtocolError(f"the message is not one msgpack value ({type(error).__name__}); send the observation "
                            "dict packed with openpi_client.msgpack_numpy") from None
    if not isinstance(message, dict) or not all(isinstance(key, str) for key in message):
        raise ProtocolError(f"a request is a msgpack map with string keys, got {type(message).__name__}")
    return {key: _decode_value(value, key) for key, value in message.items()}


# -- requests ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkMessage:
    frame: np.ndarray
    state: np.ndarray
    instruction: int
    return_frames: bool


@dataclass(frozen=True)
class ResetMessage:
    seed: int | None


def _shown_keys(keys: Any) -> str:
    return ", ".join(repr(key) for key in keys)


def _observation_array(value: Any, key: str, shape: tuple[int, ...], inputs: ModelInputs, image: bool) -> np.ndarray:
    expected = f"{list(shape)} of {'uint8 (0..255) or float32 in [0, 1]' if image else 'float32 in [0, 1]'}"
    if not isinstance(value, np.ndarray):
        raise ProtocolError(f"{key}: expected a numpy array {expected}, got {type(value).__name__}", key)
    if image and value.dtype == np.uint8:
        value = value.astype(np.float32) / np.float32(255)
    elif value.dtype.kind != "f":
        raise ProtocolError(f"{key}: expected a numpy array {expected}, got dtype {value.dtype}", key)
    try:
        return checked_array(value, key, shape, inputs.value_range)
    except ChunkRequestError as error:
        raise ProtocolError(error.message, key) from None


def decode_request(message: dict[str, Any], inputs: ModelInputs) -> ChunkMessage | ResetMessage:
    """A request's entries checked against the model's inputs; :class:`ProtocolError` naming the key."""
    if RESET in message:
        unknown = [key for key in message if key not in RESET_KEYS]
        if unknown:
            raise ProtocolError(f"unknown key {_shown_keys(unknown)} in a reset; a reset has {_shown_keys(RESET_KEYS)}",
                                unknown[0])
        if message[RESET] is not True:
            raise ProtocolError(f"{RESET}: expected true, got {message[RESET]!r:.40}", RESET)
        seed = message.get(SEED)
        if seed is not None:
            try:
                seed = check_seed(seed.item() if isinstance(seed, np.integer) else seed, SEED)
            except ValueError as error:
                raise ProtocolError(f"{SEED}: {error}", SEED) from None
        return ResetMessage(seed)
    unknown = [key for key in message if key not in CHUNK_KEYS]
    if unknown:
        raise ProtocolError(f"unknown key {_shown_keys(unknown)}; a request has {_shown_keys(CHUNK_KEYS[:3])}, "
                            f"optionally {RETURN_FRAMES!r}, or is a reset {{'reset': True}}", unknown[0])
    missing = [key for key in CHUNK_KEYS[:3] if key not in message]
    if missing:
        described = {IMAGE: f"a numpy array {list(inputs.frame_shape)}", STATE: f"a numpy array "
                     f"{list(inputs.state_shape)}", PROMPT: f"one of {list(inputs.instructions)}"}
        raise ProtocolError(f"missing key {missing[0]!r}: expected {described[missing[0]]}", missing[0])
    frame = _observation_array(message[IMAGE], IMAGE, inputs.frame_shape, inputs, image=True)
    state = _observation_array(message[STATE], STATE, inputs.state_shape, inputs, image=False)
    prompt = message[PROMPT]
    if isinstance(prompt, (bool, np.bool_)) or not isinstance(prompt, (str, int, np.integer)):
        raise ProtocolError(f"{PROMPT}: expected a string, one of {list(inputs.instructions)}, got "
                            f"{type(prompt).__name__}", PROMPT)
    try:
        instruction = checked_instruction(prompt.item() if isinstance(prompt, np.integer) else prompt, PROMPT)
    except ChunkRequestError as error:
        raise ProtocolError(f"{PROMPT}: {error.message}", PROMPT) from None
    return_frames = message.get(RETURN_FRAMES, False)
    if not isinstance(return_frames, (bool, np.bool_)):
        raise ProtocolError(f"{RETURN_FRAMES}: expected true or false, got {return_frames!r:.40}", RETURN_FRAMES)
    return ChunkMessage(frame, state, instruction, bool(return_frames))


# -- the endpoint ------------------------------------------------------------------------------------

def metadata(omni: Omni, session: Session, inputs: ModelInputs, *, session_ttl_s: float,
             max_message_bytes: int) -> dict[str, Any]:
    """What the server sends on connect: what to send, what comes back, and the cache in force."""
    from stepcache.backend import get_stepcache_config

    config = get_stepcache_config(omni.pipeline) if omni.cache_backend is not None else None
    low, high = inputs.value_range
    return {
        "server": "stepcache serve",
        "stepcache_version": stepcache.__version__,
        "model": str(omni.model),
        "session_id": session.id,
        "seed": session.seed,
        "expires_after_idle_s": session_ttl_s,
        "max_message_bytes": max_message_bytes,
        "observation": {
            IMAGE: {"dtype": ["uint8", "float32"], "shape": list(inputs.frame_shape),
                    "range": {"uint8": [0, 255], "float32": [low, high]}, "meaning": "the grey frame the robot sees"},
            STATE: {"dtype": "float32", "shape": list(inputs.state_shape), "range": [low, high],
                    "meaning": "the robot state"},
            PROMPT: {"dtype": "str", "choices": list(inputs.instructions), "meaning": "the instruction (or its index)"},
            RETURN_FRAMES: {"dtype": "bool", "optional": True, "meaning": "also return the predicted frames"},
        },
        "reset": {RESET: True, SEED: "optional integer: reseed the chunk noise"},
        "actions": {"dtype": "float32", "shape": list(inputs.action_shape)},
        "action_horizon": inputs.action_shape[0],
        "action_dim": inputs.action_shape[1],
        "frames": {"dtype": "float32", "shape": list(inputs.frames_shape), "only_when": RETURN_FRAMES},
        "cache_backend": omni.cache_backend_name,
        "cache_config": None if config is None else config.to_diffusion_cache_config().to_dict(),
        "cache_config_text": "off" if config is None else describe_config(config),
        "decision": omni.engine.config.decision,
    }


def chunk_reply(output: Any, return_frames: bool, server_s: float) -> dict[str, Any]:
    stats = output.stats
    reply = {
        "actions": np.ascontiguousarray(output.actions, dtype=np.float32),
        "server_timing": {"infer_ms": 1000 * stats.latency_s, "queue_ms": 1000 * stats.queue_s,
                          "server_ms": 1000 * server_s},
        "stepcache": {"dit_forwards": stats.dit_forwards, "prefill_forwards": stats.prefill_forwards,
                      "num_inference_steps": stats.num_inference_steps, "schedule": stats.schedule,
                      "chunk_index": stats.chunk_index, "context_frames": stats.context_frames,
                      "context_reset": stats.context_reset, "mean_forward_batch": stats.mean_forward_batch,
                      "cache_backend": stats.cache_backend, "session_id": stats.session_id},
    }
    if return_frames:
        reply["frames"] = np.ascontiguousarray(output.frames, dtype=np.float32)
    return reply


def _query_seed(websocket: WebSocket) -> int:
    unknown = [key for key in websocket.query_params if key != SEED]
    if unknown:
        raise ProtocolError(f"unknown query parameter {unknown[0]!r}; allowed: seed (an integer >= 0)", unknown[0])
    text = websocket.query_params.get(SEED)
    if text is None:
        return 0
    if not text.isdigit() or len(text) > 19:
        raise ProtocolError(f"query parameter seed: expected an integer in [0, 2**63), got {text!r:.40}", SEED)
    try:
        return check_seed(int(text))
    except ValueError as error:
        raise ProtocolError(f"query parameter seed: {error}", SEED) from None


async def deny(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse the connection before it is accepted: an HTTP answer the client raises (InvalidStatus)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(message, status_code=status))
    else:
        await websocket.close(code=1008, reason=message[:120])


def _forget_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a chunk whose client left is not an unhandled error


def add_openpi_route(app: Any, omni: Omni, *, session_ttl_s: float, max_sessions: int, max_message_bytes: int,
                     sweep: Callable[[], None], expiry_events: dict[str, asyncio.Event], path: str = "/") -> None:
    """Serve the openpi protocol on ``app`` at ``path`` (``stepcache serve`` mounts it at ``/``).

    ``sweep`` closes idle sessions (the server's, shared with HTTP) and sets the ``expiry_events`` entry
    of each one it closes, so that its connection is closed with :data:`CLOSE_EXPIRED` at once.
    """
    inputs = ModelInputs.of(omni)

    @app.websocket(path)
    async def openpi_endpoint(websocket: WebSocket) -> None:
        try:
            seed = _query_seed(websocket)
            sweep()
            session = open_session_within(omni, seed, max_sessions, session_ttl_s)
        except ProtocolError as error:
            await deny(websocket, 400, str(error))
            return
        except ChunkRequestError as error:
            await deny(websocket, error.status, error.message)
            return
        expired = expiry_events[session.id] = asyncio.Event()
        expired_wait = asyncio.ensure_future(expired.wait())
        incoming: asyncio.Future | None = None
        try:
            await websocket.accept()
            await websocket.send_bytes(pack(metadata(omni, session, inputs, session_ttl_s=session_ttl_s,
                                                     max_message_bytes=max_message_bytes)))
            incoming = asyncio.ensure_future(websocket.receive())
            while True:
                await asyncio.wait({incoming, expired_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not incoming.done():  # expired while waiting for the robot
                    await websocket.close(CLOSE_EXPIRED, f"session expired after {session_ttl_s:g} s idle; "
                                                         "reconnect for a new one")
                    return
                message = incoming.result()
                if message["type"] == "websocket.disconnect":
                    return
                received = time.perf_counter()
                # the next receive runs while this request is served: a disconnect mid-chunk frees the session
                incoming = asyncio.ensure_future(websocket.receive())
                reply = await _serve_one(session, message, inputs, incoming)
                if reply is None:  # the client left during the chunk
                    return
                if isinstance(reply, str):
                    await websocket.send_text(reply)
                    continue
                if "server_timing" in reply:
                    reply["server_timing"]["server_ms"] = 1000 * (time.perf_counter() - received)
                await websocket.send_bytes(pack(reply))
        except _SessionGone as gone:
            await websocket.close(CLOSE_EXPIRED, str(gone)[:120])
        except Exception as error:  # the connection broke (or a bug): the session is freed either way
            if websocket.client_state == WebSocketState.DISCONNECTED or _is_disconnect(error):
                logger.debug("session %s: the client left (%s)", session.id, type(error).__name__)
            else:
                logger.exception("session %s: websocket handler failed", session.id)
                with contextlib.suppress(Exception):
                    await websocket.close(1011, f"server error ({type(error).__name__}); reconnect")
        finally:
            expiry_events.pop(session.id, None)
            session.close()
            for task in (incoming, expired_wait):
                if task is not None and not task.done():
                    task.cancel()

    async def _serve_one(session: Session, message: dict[str, Any], inputs: ModelInputs,
                         incoming: asyncio.Future) -> dict[str, Any] | str | None:
        """The reply to one message: a dict to pack, an error text, or None when the client left mid-chunk."""
        raw = message.get("bytes")
        if raw is None:
            return "send each request as one binary msgpack message (got a text frame)"
        try:
            request = decode_request(unpack_request(raw), inputs)
        except ProtocolError as error:
            return str(error)
        if isinstance(request, ResetMessage):
            try:
                session.start_episode(request.seed)
            except Exception as error:  # closed (expired) or busy: neither can happen between two messages
                raise _SessionGone(f"{error}") from None
            return {RESET: True, SEED: session.seed, "chunk_index": session.chunk_index}
        start = time.perf_counter()
        chunk = asyncio.ensure_future(generate_chunk(session, request.frame, request.instruction, request.state,
                                                     OPENPI_FIELDS))
        await asyncio.wait({chunk, incoming}, return_when=asyncio.FIRST_COMPLETED)
        if not chunk.done():
            if incoming.result()["type"] == "websocket.disconnect":
                session.close()  # the chunk in flight finishes, then frees the session's KV cache
                chunk.add_done_callback(_forget_result)
                return None
            await chunk  # a second message arrived early: it is read once this one is answered
        try:
            output = chunk.result()
        except ChunkRequestError as error:
            if error.status == 404:
                raise _SessionGone(f"session {session.id} is closed; reconnect for a new one") from None
            return f"{error.field}: {error.message}" if error.field and not error.message.startswith(
                error.field) else error.message
        return chunk_reply(output, request.return_frames, time.perf_counter() - start)


class _SessionGone(Exception):
    """The connection's session was closed under it (expired): the connection ends."""


def _is_disconnect(error: Exception) -> bool:
    from starlette.websockets import WebSocketDisconnect

    return isinstance(error, (WebSocketDisconnect, OSError))  # uvicorn's ClientDisconnected is an OSError
