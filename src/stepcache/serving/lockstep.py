"""The lockstep engine: each chunk runs at once, in the calling thread (the engine of a distributed
:class:`~stepcache.omni.Omni`).

Its steps are batched like the :class:`~stepcache.serving.engine.BatchingEngine`'s, by the pipeline's
:meth:`~stepcache.models.dreamzero.pipeline.DreamZeroPipeline.denoise_step`; what differs is only
when chunks are admitted: one at a time, in call order, the same on every rank.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from stepcache.serving.engine import ChunkRequest, EngineClosedError, EngineConfig, EngineStats
from stepcache.state import StepCacheState


class LockstepEngine:
    """Runs each chunk at once, in the calling thread: the engine of a distributed :class:`Omni`.

    On several ranks every rank must issue the same collectives in the same order. The batching
    engine admits whatever requests are waiting when its thread looks, which differs from rank to
    rank, so here each ``submit`` runs its chunk to the end before returning (its future already
    resolved): the order of the calls is the order on every rank. A second call while one runs (from
    another thread) is refused, since its order against the first could differ between ranks.
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.config = EngineConfig(batching=False, max_batch=1)
        self._stats = EngineStats()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, context: Any, observation: Any, instruction: str | int, state: Any, *,
               cache_state: StepCacheState | None = None, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None) -> Any:
        """Run one chunk of ``context``'s episode now; returns its request, the future resolved."""
        if self._closed:
            raise EngineClosedError("the engine is closed: make a new Omni to generate again")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "a distributed Omni runs one chunk at a time, from one thread: every rank must issue the same "
                "chunks in the same order, which concurrent calls cannot guarantee; call generate() in turn"
            )
        request = ChunkRequest(context, observation, instruction, state, cache_state, generator, num_inference_steps)
        try:
            request.admitted = time.perf_counter()
            try:
                job = self.pipeline.begin_chunk(context, observation, instruction, state, generator=generator,
                                                num_inference_steps=num_inference_steps, cache_state=cache_state)
                output = self.pipeline.run_chunk(job)
            except Exception as error:
                self._stats.failed_chunks += 1
                request.future.set_exception(error)
            else:
                self._stats.chunks += 1
                self._stats.prefill_forwards += output.prefill_forwards
                self._stats.denoise_forwards += output.dit_forwards
                self._stats.chunk_forwards += output.dit_forwards
                self._stats.denoise_rows += output.dit_forwards * job.rows
                self._stats.prefill_rows += job.rows
                self._stats.steps += len(output.ran)
                self._stats.chunk_steps += len(output.ran)
                request.future.set_result(output)
        finally:
            self._lock.release()
        return request

    @property
    def stats(self) -> Any:
        return EngineStats(**vars(self._stats))

    @property
    def in_flight(self) -> int:
        return int(self._lock.locked())

    @property
    def running(self) -> bool:
        return False  # no worker thread

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new chunks (one running in another thread finishes first)."""
        self._closed = True
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
