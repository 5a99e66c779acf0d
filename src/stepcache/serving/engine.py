"""The batching engine: the chunks of many episodes on one pipeline, one DiT forward per denoising step.

A request is one chunk of one episode (:class:`~stepcache.models.dreamzero.pipeline.EpisodeContext`).
Requests queue up; a worker thread admits the waiting ones between steps (continuous batching: a
chunk may join while others are halfway through theirs), prefills them in one batched forward, then
steps every chunk in flight:

1. every decision group decides its step from its own velocities and its own ``StepCacheState``
   (``decision="per_session"``: a group is one chunk; ``"batch_mean"``: the chunks admitted together
   share one state and one batch-mean decision, upstream's behaviour, kept for comparison);
2. one DiT forward runs on the rows of the groups whose step computes, at each chunk's own step,
   with padding and a key mask where their contexts differ in length; the others reuse their own
   cached (or extrapolated) velocities;
3. every chunk's schedulers step.

A chunk's outputs therefore do not depend on who else is in the batch (to float32 rounding of the
batched forward). A request that fails (bad input, an exception in its forward) fails alone: the batch
is retried without it, and its episode is rolled back. The worker thread starts with the first request
and ends after ``idle_shutdown_s`` without work, or at :meth:`BatchingEngine.close`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stepcache.models.dreamzero.pipeline import ChunkJob, DecisionGroup, DreamZeroPipeline, EpisodeContext
from stepcache.state import StepCacheState

logger = logging.getLogger(__name__)

PER_SESSION = "per_session"
BATCH_MEAN = "batch_mean"
DECISIONS = (PER_SESSION, BATCH_MEAN)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches.

    Attributes:
        decision: ``"per_session"`` (each episode decides from its own velocity) or ``"batch_mean"``
            (the chunks admitted together take one decision from their mean cosine: upstream's rule,
            for comparison only).
        max_batch: chunks in flight at once (each is ``2 * B`` DiT rows with CFG).
        batching: False serves one chunk at a time, first come first served (for comparison).
        idle_shutdown_s: the worker thread ends after this long without work (a new request starts
            it again).
        admission_wait_s: align the chunks' steps: a chunk that arrives while others are in flight
            waits, up to this many seconds, for the cohort boundary (no chunk in flight), and at the
            boundary the next cohort starts once the chunks that just finished have come back (as many
            new ones as finished: the closed-loop robots), or this many seconds after the boundary
            (so a chunk waits at most twice this long). Set it to about one chunk's duration: a
            shorter bound lets chunks join mid-cohort, out of step, and they stay so. Chunks that
            start together are at the same step throughout, so with a schedule known in advance
            (``static_run_steps``, the ``planned`` policy) they compute the same steps and a skipped
            step is skipped by all of them: whole forwards disappear. 0 (default): admit at once,
            between any two steps (continuous batching). See docs/serving.md.
    """

    decision: str = PER_SESSION
    max_batch: int = 64
    batching: bool = True
    idle_shutdown_s: float = 2.0
    admission_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"EngineConfig.decision must be one of {list(DECISIONS)}, got {self.decision!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"EngineConfig.max_batch must be an integer >= 1, got {self.max_batch!r}")
        if not isinstance(self.batching, bool):
            raise ValueError(f"EngineConfig.batching must be True or False, got {self.batching!r}")
        if not (isinstance(self.idle_shutdown_s, (int, float)) and math.isfinite(self.idle_shutdown_s)
                and self.idle_shutdown_s > 0):
            raise ValueError(f"EngineConfig.idle_shutdown_s must be a number > 0, got {self.idle_shutdown_s!r}")
        if (isinstance(self.admission_wait_s, bool) or not isinstance(self.admission_wait_s, (int, float))
                or not math.isfinite(self.admission_wait_s) or self.admission_wait_s < 0):
            raise ValueError(f"EngineConfig.admission_wait_s must be a number of seconds >= 0 (0: no alignment), "
                             f"got {self.admission_wait_s!r}")

    @classmethod
    def coerce(cls, value: Any) -> EngineConfig:
        """An ``EngineConfig`` from itself, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = list(cls.__dataclass_fields__)
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"unknown EngineConfig fields {unknown}; allowed: {known}")
            return cls(**value)
        raise ValueError(f"engine_config must be an EngineConfig, a dict of its fields or None, got "
                         f"{type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EngineStats:
    """Counters since the engine was made."""

    chunks: int = 0  # chunks finished
    failed_chunks: int = 0
    steps: int = 0  # engine steps (one denoising step of every chunk in flight)
    denoise_forwards: int = 0  # DiT denoising forwards (batched: one per step that computes anything)
    prefill_forwards: int = 0
    chunk_forwards: int = 0  # sum over denoising forwards of the chunks in each
    chunk_steps: int = 0  # sum over engine steps of the chunks in flight
    denoise_rows: int = 0  # DiT rows over all denoising forwards (2 per single-sample chunk with CFG)
    prefill_rows: int = 0

    @property
    def chunks_per_forward(self) -> float:
        """Mean number of chunks sharing a denoising forward."""
        return self.chunk_forwards / self.denoise_forwards if self.denoise_forwards else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chunks_per_forward": self.chunks_per_forward}


@dataclass
class ChunkRequest:
    """One chunk asked of the engine; :attr:`future` gets its :class:`ChunkOutput` (or the error)."""

    context: EpisodeContext
    observation: Any
    instruction: str | int
    state: Any
    cache_state: StepCacheState | None = None
    generator: torch.Generator | None = None
    num_inference_steps: int | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    cancelled: bool = False

    @property
    def queue_s(self) -> float:
        """Seconds from submission to admission (waiting for a place in the batch)."""
        return 0.0 if self.admitted is None else self.admitted - self.submitted

    def cancel(self) -> None:
        """Ask the engine to drop the chunk: it is rolled back and its future cancelled."""
        self.cancelled = True


class EngineClosedError(RuntimeError):
    """The engine has been closed."""


class BatchingEngine:
    """Runs chunk requests of many episodes on one :class:`DreamZeroPipeline`, batched per step.

    Args:
        pipeline: the pipeline (its transformer runs in the engine's worker thread).
        config: an :class:`EngineConfig` (or a dict of its fields).

    Example:
        >>> engine = BatchingEngine(pipeline)                                       # doctest: +SKIP
        >>> request = engine.submit(pipeline.new_context(), frame, "reach the ring", state)  # doctest: +SKIP
        >>> request.future.result().actions.shape                                    # doctest: +SKIP
        (1, 8, 2)
    """

    def __init__(self, pipeline: DreamZeroPipeline, config: EngineConfig | dict[str, Any] | None = None) -> None:
        if getattr(pipeline, "dit", None) is not None:
            # Admission by timing differs between ranks, which would desynchronise their collectives.
            raise ValueError(
                "the batching engine cannot run a distributed pipeline (its admission of requests would differ "
                "between ranks); use Omni(..., parallel=...), which runs chunks in lockstep"
            )
        self.pipeline = pipeline
        self.config = EngineConfig.coerce(config)
        self._cond = threading.Condition()
        self._waiting: list[ChunkRequest] = []
        self._groups: list[DecisionGroup] = []
        self._worker: threading.Thread | None = None
        self._closed = False
        self._holds = 0
        self._finished_since_admission = 0  # chunks a closed-loop client may send again (alignment)
        self._boundary_at = 0.0  # when the last chunk in flight finished (alignment)
        self._stats = EngineStats()
        # torch's intra-op thread count is per thread (OpenMP): a new thread would take every core, so the
        # worker takes the count of the thread that made the engine.
        self.torch_threads = torch.get_num_threads()
        self.step_hook: Callable[[], None] | None = None  # called before every engine step (tests)

    # -- the caller's side ------------------------------------------------------------------------

    def submit(
        self,
        context: EpisodeContext,
        observation: Any,
        instruction: str | int,
        state: Any,
        *,
        cache_state: StepCacheState | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
    ) -> ChunkRequest:
        """Queue one chunk of ``context``'s episode; its ``future`` resolves when the chunk is done."""
        request = ChunkRequest(context, observation, instruction, state, cache_state, generator, num_inference_steps)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed: make a new Omni to generate again")
            self._waiting.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="stepcache-engine", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return request

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(**asdict(self._stats))

    @property
    def in_flight(self) -> int:
        """Chunks waiting or being denoised."""
        with self._cond:
            return len(self._waiting) + sum(len(group.jobs) for group in self._groups)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        with self._cond:
            return self._worker is not None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold admissions for the block: the chunks submitted inside it start together when it ends
        (chunks already in flight keep stepping)."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new requests, let the chunks in flight finish (for up to ``timeout`` s), end the worker."""
        with self._cond:
            self._closed = True
            worker = self._worker
            self._cond.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.torch_threads)
        with torch.no_grad():  # grad mode is per thread
            while True:
                admitted = self._next_requests()
                if admitted is None:
                    return
                try:
                    if admitted:
                        self._admit(admitted)
                    if self._groups:
                        if self.step_hook is not None:
                            self.step_hook()
                        self._step()
                except BaseException as error:  # a bug, not a chunk's failure: fail what is in flight, go on
                    logger.exception("serving engine: unexpected error; failing the chunks in flight")
                    self._fail_all(error)

    def _next_requests(self) -> list[ChunkRequest] | None:
        """The requests to admit now (possibly none); None: no work left, the worker ends."""
        with self._cond:
            idle_since = time.monotonic()
            while True:
                while not self._groups and not (self._waiting and not self._holds):
                    if self._waiting:  # held: wait for the hold to end
                        self._cond.wait()
                        continue
                    if self._closed:
                        self._worker = None
                        return None
                    remaining = self.config.idle_shutdown_s - (time.monotonic() - idle_since)
                    if remaining <= 0:
                        self._worker = None
                        return None
                    self._cond.wait(remaining)
                if self._holds:
                    return []
                in_flight = sum(len(group.jobs) for group in self._groups)
                # without batching, one chunk at a time
                capacity = self.config.max_batch - in_flight if self.config.batching else int(not in_flight)
                admitted, wait_s = self._admissible(max(capacity, 0))
                if wait_s is None:
                    break
                self._cond.wait(wait_s)  # at a cohort boundary, for the cohort to gather
            chosen = set(map(id, admitted))
            self._waiting = [request for request in self._waiting if id(request) not in chosen]
            if admitted:
                self._finished_since_admission = 0
            return admitted

    def _admissible(self, capacity: int) -> tuple[list[ChunkRequest], float | None]:
        """The waiting requests to admit now, and (at a cohort boundary, when the cohort is still
        gathering) how long to wait before looking again; see ``EngineConfig.admission_wait_s``."""
        wait_s = self.config.admission_wait_s
        if not wait_s or not self.config.batching or self._closed:
            return self._waiting[:capacity], None
        now = time.perf_counter()
        overdue = [request for request in self._waiting if now - request.submitted >= wait_s]
        if self._groups:  # mid-cohort: only a chunk that waited its bound joins now (out of step)
            return overdue[:capacity], None
        returned = sum(request.submitted >= self._boundary_at for request in self._waiting)
        gathered = returned >= self._finished_since_admission or len(self._waiting) >= capacity
        if gathered or now - self._boundary_at >= wait_s:
            return self._waiting[:capacity], None
        return [], max(wait_s - (now - self._boundary_at), 1e-4)

    def _admit(self, requests: list[ChunkRequest]) -> None:
        now = time.perf_counter()
        jobs: list[ChunkJob] = []
        for request in requests:
            request.admitted = now
            if request.cancelled:
                self._cancel(request)
                continue
            try:
                job = self.pipeline.begin_chunk(
                    request.context, request.observation, request.instruction, request.state,
                    generator=request.generator, num_inference_steps=request.num_inference_steps,
                    cache_state=request.cache_state,
                )
            except Exception as error:
                self._fail(request, error)
                continue
            job.request = request  # type: ignore[attr-defined]
            jobs.append(job)
        if not jobs:
            return
        failures = self.pipeline.prefill(jobs)
        with self._cond:
            self._stats.prefill_forwards += 1 + (len(jobs) if failures and len(jobs) > 1 else 0)
            self._stats.prefill_rows += sum(job.rows for job in jobs)
        for job, error in failures.items():
            job.rollback()
            self._fail(job.request, error)  # type: ignore[attr-defined]
        ready = [job for job in jobs if job not in failures]
        groups: list[DecisionGroup] = []
        if self.config.decision == PER_SESSION:
            candidates = [([job], job.cache_state) for job in ready]
        else:
            candidates = []
            for steps in sorted({job.steps for job in ready}):
                members = [job for job in ready if job.steps == steps]
                config = next((job.cache_state.config for job in members if job.cache_state is not None), None)
                candidates.append((members, None if config is None else StepCacheState(config)))
        for members, state in candidates:
            try:
                groups.append(DecisionGroup(members, state))
            except Exception as error:
                for job in members:
                    job.rollback()
                    self._fail(job.request, error)  # type: ignore[attr-defined]
        with self._cond:
            self._groups.extend(groups)

    def _step(self) -> None:
        groups = list(self._groups)
        before = {job: len(job.forward_batch_sizes) for group in groups for job in group.jobs}
        failures = self.pipeline.denoise_step(groups)
        computing = [job for job, count in before.items() if len(job.forward_batch_sizes) > count]
        computed = len(computing)
        finished = [group for group in groups if group.done and group not in failures]
        with self._cond:
            self._finished_since_admission += sum(len(group.jobs) for group in (*failures, *finished))
            self._stats.steps += 1
            self._stats.chunk_steps += len(before)
            if computed:
                self._stats.denoise_forwards += 1
                self._stats.chunk_forwards += computed
                self._stats.denoise_rows += sum(job.rows for job in computing)
            self._groups = [group for group in groups if group not in failures and group not in finished]
            if not self._groups:
                self._boundary_at = time.perf_counter()
        for group, error in failures.items():
            for job in group.jobs:
                job.rollback()
                self._fail(job.request, error)  # type: ignore[attr-defined]
        decoupled = self.pipeline.config.decoupled_video_noise
        for group in finished:
            for job in group.jobs:
                request: ChunkRequest = job.request  # type: ignore[attr-defined]
                if request.cancelled:
                    job.rollback()
                    self._cancel(request)
                    continue
                try:
                    output = job.finish(decoupled)
                except Exception as error:
                    job.rollback()
                    self._fail(request, error)
                    continue
                with self._cond:
                    self._stats.chunks += 1
                request.future.set_result(output)

    def _fail(self, request: ChunkRequest, error: BaseException) -> None:
        with self._cond:
            self._stats.failed_chunks += 1
        if not request.future.done():
            request.future.set_exception(error)

    def _cancel(self, request: ChunkRequest) -> None:
        if not request.future.done():
            request.future.set_exception(CancelledError("the chunk was cancelled; its episode is as before it"))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            groups, self._groups = self._groups, []
        for group in groups:
            for job in group.jobs:
                job.rollback()
                self._fail(job.request, error)  # type: ignore[attr-defined]

