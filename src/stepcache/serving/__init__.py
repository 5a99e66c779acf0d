"""Serving many episodes on one model: the batching engine and the policy server.

- :mod:`.engine`: :class:`BatchingEngine`, which runs the chunks of many episodes (sessions) on one
  pipeline with one DiT forward per denoising step, each episode deciding its own steps;
- :mod:`.lockstep`: :class:`LockstepEngine`, which runs each chunk at once in the calling thread (the
  engine of a distributed ``Omni``: every rank admits the same chunks in the same order);
- :mod:`.server`: the HTTP policy server behind ``stepcache serve`` (FastAPI + uvicorn, the ``serve``
  extra; imported only when used).

Sessions themselves are opened on :class:`stepcache.omni.Omni` (``omni.open_session()``).
"""

from __future__ import annotations

from stepcache.serving.engine import (
    BATCH_MEAN,
    DECISIONS,
    PER_SESSION,
    BatchingEngine,
    ChunkRequest,
    EngineClosedError,
    EngineConfig,
    EngineStats,
)
from stepcache.serving.lockstep import LockstepEngine

__all__ = [
    "BATCH_MEAN",
    "DECISIONS",
    "PER_SESSION",
    "BatchingEngine",
    "ChunkRequest",
    "EngineClosedError",
    "EngineConfig",
    "EngineStats",
    "LockstepEngine",
]
