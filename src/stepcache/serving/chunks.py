"""What every transport of the policy server shares: a chunk's inputs as the loaded model takes them,
their checks, opening a session within the server's limit, and what a failed chunk means.

The two transports (:mod:`.server`: JSON over HTTP; :mod:`.openpi`: msgpack over a websocket) decode a
request their own way, then call :func:`checked_array`, :func:`checked_instruction` and
:func:`generate_chunk` here. Every refusal is a :class:`ChunkRequestError` carrying an HTTP-style
status and the field it is about; each transport words it for its clients (an HTTP status with
``detail[0].loc``; an openpi error text frame naming the key). One session layer, two transports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepcache.models.dreamzero.pipeline import INPUT_RANGE, NonFiniteOutputError
from stepcache.models.dreamzero.world import INSTRUCTIONS, instruction_index
from stepcache.omni import Omni, OmniOutput, Session, SessionBusyError, SessionClosedError

logger = logging.getLogger(__name__)


class ChunkRequestError(Exception):
    """A request refused: ``status`` as HTTP would say it (422 bad input, 404 closed session, 409 busy,
    500 failed on the server, 503 full), ``field`` the input it is about (None: the request as a whole)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@dataclass(frozen=True)
class ModelInputs:
    """The shapes a chunk takes and gives back, read from the loaded model (never assumed)."""

    frame_shape: tuple[int, int]  # one grey observation frame
    state_shape: tuple[int]  # the robot state
    action_shape: tuple[int, int]  # one chunk of actions: (action_horizon, action_dim)
    frames_shape: tuple[int, int, int]  # the predicted frames of a chunk
    value_range: tuple[float, float] = INPUT_RANGE  # of frame and state: the range the model was trained on
    instructions: tuple[str, ...] = INSTRUCTIONS

    @classmethod
    def of(cls, omni: Omni) -> ModelInputs:
        config = omni.pipeline.transformer.config
        size = config.frame_size
        return cls(frame_shape=(size, size), state_shape=(config.state_dim,),
                   action_shape=(config.action_horizon, config.action_dim),
                   frames_shape=(config.future_frames, size, size))


def checked_array(value: Any, field: str, shape: tuple[int, ...], value_range: tuple[float, float] | None = None
                  ) -> np.ndarray:
    """``value`` as a float32 array of ``shape``, finite and within ``value_range``; else a 422 naming ``field``."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ChunkRequestError(422, f"{field} must be an array of numbers of shape {list(shape)}", field) from None
    if not array.flags.writeable:  # a view on a received message's bytes: torch wants memory it may own
        array = array.copy()
    if array.shape != shape:
        raise ChunkRequestError(422, f"{field} must have shape {list(shape)}, got {list(array.shape)}", field)
    if not np.isfinite(array).all():
        raise ChunkRequestError(422, f"{field} must be finite (no NaN or infinity)", field)
    if value_range is not None:
        low, high = value_range
        if array.min() < low or array.max() > high:
            raise ChunkRequestError(422, f"{field} values must lie in [{low}, {high}], got [{array.min():.4g}, "
                                         f"{array.max():.4g}]", field)
    return array


def checked_instruction(value: Any, field: str) -> int:
    """The instruction's index (text or index accepted); else a 422 naming ``field``."""
    try:
        return instruction_index(value)
    except ValueError as error:
        raise ChunkRequestError(422, str(error), field) from None


def open_session_within(omni: Omni, seed: int, max_sessions: int, session_ttl_s: float) -> Session:
    """A new session, or a 503 when ``max_sessions`` are already open."""
    if len(omni.sessions) >= max_sessions:
        raise ChunkRequestError(503, f"the server holds its maximum of {max_sessions} sessions; close one, or wait "
                                     f"for idle ones to expire ({session_ttl_s:g} s)")
    return omni.open_session(seed=seed)


async def generate_chunk(session: Session, frame: np.ndarray, instruction: int, state: np.ndarray,
                         field_names: Mapping[str, str]) -> OmniOutput:
    """The session's next chunk, its failures as :class:`ChunkRequestError`.

    ``field_names`` maps the pipeline's input names (``"observation"``, ``"state"``) to the transport's,
    so that a non-finite chunk caused by an input is a 422 naming the key the client sent. A failed
    chunk has rolled its session back (the pipeline's contract), so the chunk can be retried.
    """
    try:
        return await session.agenerate(frame, instruction, state)
    except SessionBusyError as error:
        raise ChunkRequestError(409, str(error)) from None
    except SessionClosedError as error:
        raise ChunkRequestError(404, str(error)) from None
    except NonFiniteOutputError as error:
        if error.field is None:
            logger.error("session %s: %s", session.id, error)
            raise ChunkRequestError(500, str(error)) from None
        name = field_names.get(error.field, error.field)
        raise ChunkRequestError(422, str(error), name) from None
    except ValueError as error:
        raise ChunkRequestError(422, str(error)) from None
    except Exception as error:
        logger.exception("session %s: chunk failed", session.id)
        raise ChunkRequestError(500, f"the chunk failed on the server ({type(error).__name__}: {error}); the "
                                     "session's episode is as before it, so the chunk can be retried") from None
