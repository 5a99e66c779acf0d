"""``Omni``: the vLLM-Omni-style front door to the bundled DreamZero-style world-action model.

    omni = Omni(model="dreamzero-mini", cache_backend="step_cache", cache_config={...})
    omni.start_episode(seed=0)
    result = omni.generate(observation, "reach the ring", state)   # one chunk, closed loop
    result.actions, result.frames, result.stats.dit_forwards

Many episodes at once (one per robot), batched on the one model:

    session = omni.open_session(seed=3)
    result = session.generate(observation, "reach the ring", state)  # from any thread
    session.close()

Every session holds its own episode (KV context, instruction, chunk counter, noise generator) and its
own StepCache state; concurrent ``generate`` calls of different sessions share each DiT forward
(:mod:`stepcache.serving.engine`), and each session's outputs are those it would get alone (to
float32 rounding). ``omni.start_episode`` / ``omni.generate`` drive one implicit session.

On several ranks (launched with ``torchrun``), ``Omni(..., parallel={"cfg_parallel": 2,
"sequence_parallel": 2})`` spreads the model over them (docs/distributed.md): every rank runs the same
script, makes the same calls in the same order, and gets the same outputs; chunks then run one at a
time in the calling thread (no batching across sessions).

A ``cache_config`` implies ``cache_backend="step_cache"``; with neither, the ``DIFFUSION_CACHE_BACKEND``
environment variable decides (unset, empty or "none": no cache); ``cache_backend=None`` or ``"none"``
runs every step whatever the environment says, and refuses a ``cache_config``. The backend's
``enable(pipeline)`` runs once here, its ``refresh`` before every chunk of the implicit session
(explicit sessions reset their own state per chunk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepcache.backend import CacheBackend, get_stepcache_config, get_stepcache_state
from stepcache.selector import NO_CACHE_NAMES, get_cache_backend
from stepcache.state import StepCacheState, schedule_string

logger = logging.getLogger(__name__)


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()


@dataclass
class RequestStats:
    """What one ``generate`` call cost and how StepCache decided."""

    dit_forwards: int  # denoising forwards (one per computed step)
    prefill_forwards: int  # timestep-0 context forwards (never skipped)
    num_inference_steps: int
    latency_s: float  # wall clock of the chunk: cache refresh, prefill, denoising (diagnostics excluded)
    ran: list[bool]  # per step: forward computed or velocity reused
    # per step i: cosine of the last two computed video velocities before step i (what the rule compares with
    # its thresholds at step i; the trace's "similarity" where the rule needed one); None before two are computed
    velocity_similarity: list[float | None]
    trace: list[dict[str, Any]] = field(default_factory=list)  # StepCache's per-step records (empty when off)
    chunk_index: int = 0  # chunk number within the episode (0 = first)
    context_frames: int = 0  # frames in the KV cache for this chunk
    context_reset: bool = False
    cache_backend: str = "none"
    queue_s: float = 0.0  # waiting for a place in the engine's batch, before the chunk started
    forward_batch_sizes: list[int] = field(default_factory=list)  # per forward: chunks that shared it
    session_id: str = ""

    @property
    def schedule(self) -> str:
        """``RR....R....R....``: R = forward computed, . = velocity reused."""
        return schedule_string(self.ran)

    @property
    def mean_forward_batch(self) -> float:
        """Mean number of chunks (sessions) in this chunk's denoising forwards (1 = ran alone)."""
        return float(np.mean(self.forward_batch_sizes)) if self.forward_batch_sizes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dit_forwards": self.dit_forwards,
            "prefill_forwards": self.prefill_forwards,
            "num_inference_steps": self.num_inference_steps,
            "latency_s": self.latency_s,
            "queue_s": self.queue_s,
            "schedule": self.schedule,
            "velocity_similarity": self.velocity_similarity,
            "trace": self.trace,
            "chunk_index": self.chunk_index,
            "context_frames": self.context_frames,
            "context_reset": self.context_reset,
            "cache_backend": self.cache_backend,
            "mean_forward_batch": self.mean_forward_batch,
            "session_id": self.session_id,
        }


@dataclass
class OmniOutput:
    """One chunk: the actions to execute ``(H, 2)``, the predicted frames ``(F, S, S)`` in [0, 1] (a
    leading batch dimension when the observation had one), and the request's stats."""

    actions: np.ndarray
    frames: np.ndarray
    stats: RequestStats


class SessionClosedError(RuntimeError):
    """The session was closed (or expired): open a new one."""


class SessionBusyError(RuntimeError):
    """The session is already generating a chunk (from another thread or request)."""


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int, or a ValueError naming ``name``: an integer in [0, 2**63) (no bool, no float)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 0, got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


class Session:
    """One episode served by an :class:`Omni`: its KV context, instruction, chunk counter, noise
    generator and StepCache state.

    :meth:`generate` continues the episode by one chunk; sessions are independent of each other and
    can be used from different threads at once (their chunks are batched together). One chunk at a
    time per session: a second concurrent ``generate`` raises :class:`SessionBusyError`. After
    :meth:`close`, every use raises :class:`SessionClosedError`.
    """

    def __init__(self, omni: Omni, context: Any, cache_state: StepCacheState | None, seed: int, session_id: str,
                 *, implicit: bool = False) -> None:
        self.id = session_id
        self.omni = omni
        self.context = context
        self.cache_state = cache_state
        self.generator = torch.Generator().manual_seed(seed)
        context.generator = self.generator
        self.seed = seed
        self.implicit = implicit
        self.created = self.last_active = time.monotonic()
        self.chunks_served = 0
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False

    # -- state ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def chunk_index(self) -> int:
        """The number of the episode's next chunk (0 = first)."""
        return self.context.chunk_index

    @property
    def idle_s(self) -> float:
        """Seconds since the last chunk ended (0 while one is in flight)."""
        return 0.0 if self._busy else time.monotonic() - self.last_active

    def nbytes(self) -> int:
        """Bytes of tensors the session holds (its KV cache and noise generator state)."""
        return self.context.nbytes()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id} is closed; open a new one (Omni.open_session)")

    # -- episodes -------------------------------------------------------------------------------

    def start_episode(self, seed: int | None = None) -> None:
        """Start a new episode: clear the KV context; reseed the chunk noise when ``seed`` is given."""
        seed = None if seed is None else check_seed(seed)
        with self._lock:
            self._check_open()
            if self._busy:
                raise SessionBusyError(self._busy_message())
            self.context.reset()
            if seed is not None:
                self.generator.manual_seed(seed)
                self.seed = seed
            self.last_active = time.monotonic()

    def submit(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> Future:
        """Queue the episode's next chunk; returns a future of its :class:`OmniOutput`."""
        return self._submit(observation, instruction, state, generator)[0]

    def _submit(self, observation: Any, instruction: str | int, state: Any,
                generator: torch.Generator | None) -> tuple[Future, Any]:
        with self._lock:
            self._check_open()
            if self._busy:
                raise SessionBusyError(self._busy_message())
            self._busy = True
            self.last_active = time.monotonic()
        omni = self.omni
        try:
            start = time.perf_counter()
            if self.implicit and omni.cache_backend is not None:
                omni.cache_backend.refresh(omni.pipeline, omni.num_inference_steps, verbose=False)
            refresh_s = time.perf_counter() - start
            request = omni.engine.submit(self.context, observation, instruction, state, cache_state=self.cache_state,
                                         generator=generator if generator is not None else self.generator)
        except BaseException:
            with self._lock:
                self._busy = False
            raise
        result: Future = Future()
        batched = np.ndim(observation) == 3

        def deliver(done: Future) -> None:
            with self._lock:
                self._busy = False
                self.last_active = time.monotonic()
                closed = self._closed
            error = done.exception()
            if closed:
                self._release()
            if error is not None:
                result.set_exception(error)
                return
            self.chunks_served += 1
            result.set_result(self._output(done.result(), request.queue_s, refresh_s, batched))

        request.future.add_done_callback(deliver)
        return result, request

    def generate(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> OmniOutput:
        """Continue the episode by one chunk from ``observation`` ``(S, S)`` (grey, [0, 1]), the
        instruction (text or index) and the robot state ``(2,)``; a leading batch dimension is allowed.
        A chunk that fails leaves the episode as it was (retry it, or go on)."""
        future, request = self._submit(observation, instruction, state, generator)
        try:
            return future.result()
        except BaseException:
            if not future.done():  # interrupted while waiting (Ctrl-C): drop the chunk, wait for its rollback
                request.cancel()
                wait_for_futures([future])
            raise

    async def agenerate(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
    ) -> OmniOutput:
        """:meth:`generate` for asyncio: awaits the chunk without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(observation, instruction, state))

    def close(self) -> None:
        """Free the session (its KV cache); a chunk in flight finishes first. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = self._busy
        self.omni._forget(self)
        if not busy:
            self._release()

    def _release(self) -> None:
        if not self.context.busy:
            self.context.kv_cache.reset()

    def _busy_message(self) -> str:
        what = "omni.generate" if self.implicit else f"session {self.id}"
        return (f"{what} is already generating a chunk (in another thread or request); one chunk at a time per "
                "episode: wait for it, or give each robot (thread) its own session with omni.open_session()")

    def _output(self, out: Any, queue_s: float, refresh_s: float, batched: bool) -> OmniOutput:
        stats = RequestStats(
            dit_forwards=out.dit_forwards,
            prefill_forwards=out.prefill_forwards,
            num_inference_steps=len(out.ran),
            latency_s=refresh_s + out.latency_s,  # the pipeline's clock stops before its diagnostics
            ran=out.ran,
            velocity_similarity=out.velocity_similarity,
            trace=[
                {"step": r.step, "ran": r.ran, "reason": r.reason, "similarity": r.similarity} for r in out.trace
            ],
            chunk_index=out.chunk_index,
            context_frames=out.context_frames,
            context_reset=out.context_reset,
            cache_backend=self.omni.cache_backend_name,
            queue_s=queue_s,
            forward_batch_sizes=out.forward_batch_sizes,
            session_id=self.id,
        )
        actions, frames = (out.actions, out.frames) if batched else (out.actions[0], out.frames[0])
        return OmniOutput(actions=actions, frames=frames, stats=stats)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("busy" if self._busy else "open")
        return f"Session({self.id!r}, {state}, chunk {self.chunk_index})"


def _backend_name(cache_backend: Any, cache_config: Any) -> str | None:
    """The backend ``Omni`` asks the selector for. A ``cache_config`` asks for a cache: without
    ``cache_backend`` it means ``"step_cache"`` (whatever ``DIFFUSION_CACHE_BACKEND`` says), and with
    ``cache_backend=None``/``"none"`` it is refused rather than silently unused."""
    if cache_backend is NOT_GIVEN:
        return None if cache_config is None else "step_cache"  # None: DIFFUSION_CACHE_BACKEND decides
    name = "none" if cache_backend is None else cache_backend
    if cache_config is not None and isinstance(name, str) and name.strip().lower() in NO_CACHE_NAMES:
        raise ValueError(
            f"cache_config was given with cache_backend={cache_backend!r}, which runs no cache: pass "
            "cache_backend='step_cache' to use the config, or leave cache_config out to run every step"
        )
    return name


def _check_model(model: Any) -> str | Path:
    if isinstance(model, bool) or not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            f"model must be a bundled model name ('dreamzero-mini', 'dreamzero-detour') or the path of a folder "
            f"holding config.json and model.safetensors, got {model!r} ({type(model).__name__})"
        )
    if isinstance(model, str) and not model.strip():
        raise ValueError("model must be a bundled model name ('dreamzero-mini', 'dreamzero-detour') or a folder path, "
                         "got ''")
    return model


def _check_pipeline_config(pipeline_config: Any) -> Any:
    from stepcache.models.dreamzero.pipeline import DreamZeroPipelineConfig

    if pipeline_config is None or isinstance(pipeline_config, DreamZeroPipelineConfig):
        return pipeline_config
    if isinstance(pipeline_config, dict):
        try:
            return DreamZeroPipelineConfig.from_dict(pipeline_config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"pipeline_config: {error}") from None
    raise ValueError(
        f"pipeline_config must be a DreamZeroPipelineConfig, a dict of its fields or None, got "
        f"{type(pipeline_config).__name__}"
    )


def _check_parallel(parallel: Any, engine_config: Any) -> Any:
    if parallel is None:
        return None
    from stepcache.models.dreamzero.parallel import ParallelConfig

    try:
        parallel = ParallelConfig.coerce(parallel)
    except (TypeError, ValueError) as error:
        raise ValueError(f"parallel: {error}") from None
    if engine_config is not None:
        raise ValueError(
            "engine_config does not apply with parallel: on several ranks every rank must run the same chunks in "
            "the same order, so Omni runs them one at a time in the calling thread (no batching across sessions); "
            "leave engine_config out"
        )
    return parallel


class Omni:
    """Load a DreamZero-style model and generate action chunks, with or without StepCache, for one
    episode (:meth:`generate`) or many at once (:meth:`open_session`).

    Args:
        model: ``"dreamzero-mini"`` (bundled) or a directory holding ``config.json`` and
            ``model.safetensors``.
        cache_backend: ``"step_cache"`` (or ``"stepcache"``, ``"step_cache_dit"``), ``None``/``"none"``
            for no cache; not given: ``"step_cache"`` when ``cache_config`` is given, else the
            ``DIFFUSION_CACHE_BACKEND`` environment variable.
        cache_config: ``DiffusionCacheConfig``, a dict or JSON string of its fields, a preset name, or
            None (the seed's defaults when the backend is ``step_cache``); refused with no cache.
        pipeline_config: a :class:`DreamZeroPipelineConfig` or a dict of its fields (steps, CFG scale,
            decoupled noise, ...).
        seed: seeds the noise of the implicit session's chunks; :meth:`start_episode` can reseed.
        engine_config: how sessions are batched: a :class:`~stepcache.serving.EngineConfig` or a dict
            of its fields (default: per-session decisions, continuous batching of up to 64 chunks).
        device: where the model runs (``"cpu"``, ``"cuda"``, ...; default: CPU). The noise is drawn on
            the CPU either way, so a seed gives the same chunk noise everywhere. With ``parallel``,
            ``"cuda"`` means this rank's GPU (``cuda:LOCAL_RANK``).
        parallel: spread the model over the ranks of a ``torchrun`` job: a
            :class:`~stepcache.models.dreamzero.parallel.ParallelConfig` or a dict of its fields
            (``cfg_parallel``, ``sequence_parallel``, ``check_consistency``, ``backend``,
            ``timeout_s``); the default process group is started from torchrun's environment unless it
            already runs. Every rank must pass the same arguments (checked once, here) and make the
            same calls in the same order; chunks run one at a time in the calling thread, so
            ``engine_config`` does not apply. None (default): one process.
    """

    def __init__(
        self,
        model: str | Path = "dreamzero-mini",
        cache_backend: str | None = NOT_GIVEN,
        cache_config: Any = None,
        *,
        pipeline_config: Any = None,
        seed: int = 0,
        engine_config: Any = None,
        device: str | torch.device | None = None,
        parallel: Any = None,
    ) -> None:
        from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
        from stepcache.serving.engine import BatchingEngine, EngineConfig
        from stepcache.serving.lockstep import LockstepEngine

        model = _check_model(model)
        seed = check_seed(seed)
        pipeline_config = _check_pipeline_config(pipeline_config)
        parallel = _check_parallel(parallel, engine_config)
        engine_config = EngineConfig.coerce(engine_config)
        try:
            device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: {error}") from None
        backend = get_cache_backend(_backend_name(cache_backend, cache_config), cache_config)
        self.model = model
        self.cache_backend: CacheBackend | None = backend
        self.cache_backend_name = "none" if backend is None else "step_cache"
        self.parallel = parallel
        self._owns_process_group = False
        if parallel is None:
            self.pipeline = DreamZeroPipeline.from_pretrained(model, pipeline_config)
            if device is not None:
                self.pipeline.transformer.to(device)
        else:
            self._load_parallel(parallel, device, pipeline_config, seed)
        if backend is not None:
            if parallel is None:
                backend.enable(self.pipeline)
            else:
                backend.enable(self.pipeline, process_group=self.pipeline.decision_group,
                               check_consistency=parallel.check_consistency)
            step_config = get_stepcache_config(self.pipeline)
            if step_config is not None:  # e.g. a fixed schedule naming steps past the end
                step_config.check_num_steps(self.num_inference_steps)
        self.engine = BatchingEngine(self.pipeline, engine_config) if parallel is None else LockstepEngine(
            self.pipeline)
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._default = Session(self, self.pipeline.context, get_stepcache_state(self.pipeline), seed, "default",
                                implicit=True)
        logger.debug("Omni: model %s, cache backend %s", model, self.cache_backend_name)

    @property
    def world_config(self) -> Any:
        """The world the model was trained on: ``omni.world_config.make_world()`` starts an episode of it."""
        return self.pipeline.world_config

    @property
    def num_inference_steps(self) -> int:
        return self.pipeline.config.num_inference_steps

    # -- several ranks --------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank in the default group (0 for one process)."""
        if self.parallel is None:
            return 0
        import torch.distributed as dist

        return dist.get_rank()

    @property
    def world_size(self) -> int:
        """The ranks the model is spread over (1 for one process)."""
        if self.parallel is None:
            return 1
        import torch.distributed as dist

        return dist.get_world_size()

    def _load_parallel(self, parallel: Any, device: torch.device | None, pipeline_config: Any, seed: int) -> None:
        """Start the default group (unless it runs), make the groups, load the pipeline on them, and
        check that every rank got the same arguments (one all_gather): a rank that fails or differs
        fails every rank here, at load, instead of leaving the others waiting in a forward."""
        from stepcache.models.dreamzero.parallel import fingerprint, init_distributed, ranks_agree
        from stepcache.models.dreamzero.pipeline import DreamZeroPipeline

        if device is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        self._owns_process_group = init_distributed(parallel.backend, device=device, timeout_s=parallel.timeout_s)
        try:
            groups = parallel.create_groups()  # collective, the same on every rank: fails alike
            settings = {  # what must be equal on every rank; the pipeline's part filled in once it loaded
                "model": fingerprint(str(self.model)), "model_config": 0, "pipeline_config": 0, "seed": seed,
                "cache_backend": fingerprint(self.cache_backend_name),
                "cache_config": fingerprint(None if self.cache_backend is None else self.cache_backend.config),
                "parallel": fingerprint(parallel),
            }
            error = None
            try:
                self.pipeline = DreamZeroPipeline.from_pretrained(self.model, pipeline_config, parallel=groups)
                if device is not None:
                    self.pipeline.transformer.to(device)
                settings["model_config"] = fingerprint(self.pipeline.transformer.config)
                settings["pipeline_config"] = fingerprint(self.pipeline.config)
            except Exception as local_error:
                error = local_error
            ranks_agree(settings, groups.model_group, "the Omni arguments", ok=error is None)
            if error is not None:
                raise error
        except BaseException:
            self._end_parallel()
            raise

    def _end_parallel(self, together: bool = False) -> None:
        """End the default group if this Omni started it; ``together``: after a barrier (every rank is
        closing), so that no rank tears gloo down while a peer still talks to it."""
        if self._owns_process_group:
            import torch.distributed as dist

            self._owns_process_group = False
            if dist.is_initialized():
                dit = getattr(getattr(self, "pipeline", None), "dit", None)
                broken = dit is not None and dit.groups.health.broken is not None
                if together and not broken:  # a broken group's barrier could pair with a stale collective
                    dist.barrier()
                dist.destroy_process_group()

    # -- the implicit session -------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """The implicit session's noise generator."""
        return self._default.generator

    @property
    def chunk_index(self) -> int:
        """The implicit session's next chunk number."""
        return self._default.chunk_index

    def start_episode(self, seed: int | None = None) -> None:
        """Start a new episode: clear the KV context; reseed the chunk noise when ``seed`` is given."""
        self._default.start_episode(seed)

    def generate(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> OmniOutput:
        """Continue the episode by one chunk from ``observation`` ``(S, S)`` (grey, [0, 1]), the
        instruction (text or index) and the robot state ``(2,)``; a leading batch dimension is allowed."""
        return self._default.generate(observation, instruction, state, generator=generator)

    # -- sessions -------------------------------------------------------------------------------

    def open_session(self, seed: int = 0, session_id: str | None = None) -> Session:
        """A new episode of its own (its own KV context, noise seeded with ``seed``, StepCache state)."""
        seed = check_seed(seed)
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"session_id must be a non-empty string or None, got {session_id!r}")
        config = get_stepcache_config(self.pipeline)
        state = None
        if config is not None and config.enabled:
            if self.parallel is None:
                state = StepCacheState(config)
            else:  # decisions reduced (and checked) across the ranks, as the implicit session's
                state = StepCacheState(config, process_group=self.pipeline.decision_group,
                                       check_consistency=self.parallel.check_consistency)
        with self._sessions_lock:
            session_id = session_id or uuid.uuid4().hex
            if session_id in self._sessions or session_id == "default":
                raise ValueError(f"session_id {session_id!r} is already in use")
            session = Session(self, self.pipeline.new_context(), state, seed, session_id)
            self._sessions[session_id] = session
        return session

    def session(self, session_id: str) -> Session:
        """The open session with this id (KeyError when there is none)."""
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise KeyError(f"no open session {session_id!r}")
        return session

    @property
    def sessions(self) -> list[Session]:
        """The open sessions (not the implicit one)."""
        with self._sessions_lock:
            return list(self._sessions.values())

    def close_idle_sessions(self, max_idle_s: float) -> list[str]:
        """Close the sessions idle for more than ``max_idle_s`` seconds; returns their ids."""
        expired = [session for session in self.sessions if session.idle_s > max_idle_s]
        for session in expired:
            session.close()
        return [session.id for session in expired]

    def _forget(self, session: Session) -> None:
        with self._sessions_lock:
            self._sessions.pop(session.id, None)

    def close(self) -> None:
        """Close every session and stop the engine (chunks in flight finish first). On several ranks,
        also end the default process group when this Omni started it (every rank calls close)."""
        for session in self.sessions:
            session.close()
        self.engine.close()
        if self.parallel is not None:
            self._end_parallel(together=True)

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
