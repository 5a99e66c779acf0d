"""``DreamZeroPipeline``: closed-loop, chunk-by-chunk world-action denoising with optional StepCache.

Per chunk (DreamZero's loop):

1. context bookkeeping: a new instruction, or ``context_reset_chunks`` chunks since the last reset,
   clears the episode's KV cache;
2. prefill: the clean observed frame goes into the KV cache through a timestep-0 forward (never
   skipped), for the conditional and (with CFG) the unconditional branch;
3. ``num_inference_steps`` denoising steps on diffusers ``UniPCMultistepScheduler`` schedules (flow
   sigmas, shift 5), one for the video latents and one for the actions. Each step runs the DiT once on
   the batch ``[conditional; unconditional]``; the video velocity is
   ``uncond + guidance_scale * (cond - uncond)``, the action velocity is the conditional one;
4. with StepCache active: the state is reset, then every step asks it whether to run
   (``plan_step`` + ``commit_step``, i.e. ``should_run_step``); a run appends
   ``(video_velocity, action_velocity)`` to the history (``push_computed``), a skip answers with
   ``reused_prediction(history)`` (the cached velocities, or their extrapolation). The schedulers step
   either way; with ``solver_aware``, through :class:`~stepcache.integrations.schedulers.SkipAwareStepper`.

Optionally ("decoupled noise") the video schedule is compressed to end at ``video_final_sigma``
(0.8) while the actions denoise fully; the predicted frames are then the video's last x0 estimate.

**Episodes and batching.** An :class:`EpisodeContext` holds one episode between chunks (KV cache,
instruction, chunk counter, noise generator). The pipeline itself owns one, used by ``__call__``;
:meth:`DreamZeroPipeline.new_context` makes more, and the serving engine (:mod:`stepcache.serving`)
runs the chunks of many contexts at once: :meth:`~DreamZeroPipeline.begin_chunk`, one batched
:meth:`~DreamZeroPipeline.prefill`, then :meth:`~DreamZeroPipeline.denoise_step` per step over
:class:`DecisionGroup` s (the chunks that share one StepCache decision: one chunk, or several for the
batch-mean rule). The DiT runs in one place, :meth:`~DreamZeroPipeline.denoise_forward`, on the rows of
the chunks whose step computes; caches of different lengths are padded and masked
(:class:`~stepcache.models.dreamzero.model.StackedKVCache`). A chunk that fails rolls its episode back.

**How steps are batched.** :meth:`~DreamZeroPipeline.denoise_step` does each part of a step once for
every chunk in flight: the decision signals of all deciding chunks in one reduction
(:func:`stepcache.state.prefetch_signals`), one DiT forward, one CFG combination, and one scheduler
product per cohort of chunks that started together
(:class:`~stepcache.integrations.scheduler_replay.ReplayCohort`: the UniPC update replayed from
coefficients read off diffusers' scheduler; ``replay_schedulers=False`` steps the schedulers
themselves, bit for bit the loop before the replay existed).

**Several ranks.** ``DreamZeroPipeline(transformer, config, parallel=groups)`` runs the DiT through
:class:`~stepcache.models.dreamzero.parallel.ParallelWorldActionDiT` (``torchrun``; sequence and/or CFG
parallelism): every rank draws the whole noise, keeps its shard of the video (``dit.shard_video``),
runs its share of each forward, and steps its shard with the schedulers; the actions stay whole; the
frames are gathered at the end of the chunk. StepCache decides on the sharded guided velocity with its
signals reduced over ``pipeline.decision_group`` (``backend.enable(pipeline, process_group=...)``). Every
rank must make the same calls in the same order; each chunk starts with one small ``all_gather`` that
checks the ranks were given the same inputs (see docs/distributed.md).

Units: frames are grey in [0, 1] (latent = ``2 * frame - 1``), the state is the agent position in the
unit square (model input ``2 * state - 1``), actions are world moves (model units = world /
``action_scale``). Convention: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, velocity ``noise - x0``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from stepcache import StepCacheState, StepRecord, get_stepcache_state, is_stepcache_active
from stepcache.integrations.scheduler_replay import (
    DirectStepper,
    ReplayCohort,
    SchedulerNotLinearError,
    SchedulerReplay,
    instance_vars,
    set_instance_vars,
)
from stepcache.models.dreamzero.model import CausalWorldActionDiT, KVCache
from stepcache.models.dreamzero.parallel import (
    FAILED_AFTER_COLLECTIVES,
    FAILED_IN_COLLECTIVES,
    SUCCEEDED,
    ParallelGroups,
    ParallelWorldActionDiT,
    agree_on_outcome,
    fingerprint,
    ranks_agree,
)
from stepcache.models.dreamzero.world import instruction_index
from stepcache.state import prefetch_signals, reduce_statistics, signals_from_statistics, velocity_statistics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DreamZeroPipelineConfig:
    """Sampling settings (DreamZero's defaults where they transfer)."""

    num_inference_steps: int = 16
    guidance_scale: float = 5.0  # CFG on the video velocity only
    flow_shift: float = 5.0  # sigma' = shift * s / (1 + (shift - 1) * s)
    decoupled_video_noise: bool = False
    video_final_sigma: float = 0.8  # where the video schedule ends when decoupled
    context_reset_chunks: int = 4  # the KV context is cleared after this many chunks
    # Step the schedulers by replaying their linear update (see the module docstring); False: call
    # diffusers' scheduler.step every step (slower; the same maths to float32 rounding).
    replay_schedulers: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
        if not 0.0 <= self.video_final_sigma < 1.0:
            raise ValueError(f"video_final_sigma must be in [0, 1), got {self.video_final_sigma}")
        if not isinstance(self.context_reset_chunks, int) or self.context_reset_chunks < 1:
            raise ValueError(f"context_reset_chunks must be a positive integer, got {self.context_reset_chunks!r}")
        for name in ("decoupled_video_noise", "replay_schedulers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DreamZeroPipelineConfig:
        """Build from a dict of fields; an unknown key is an error that lists the allowed ones."""
        if not isinstance(data, dict):
            raise ValueError(f"DreamZeroPipelineConfig needs a dict of its fields, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown DreamZeroPipelineConfig fields {unknown}; allowed: {known}")
        return cls(**data)


@dataclass
class ChunkOutput:
    """One chunk: the actions to execute, the predicted frames, and what it cost."""

    actions: np.ndarray  # (B, H, 2) world moves
    frames: np.ndarray  # (B, F, S, S) predicted future frames in [0, 1]
    dit_forwards: int  # denoising forwards run (one per computed step; CFG branches batched)
    prefill_forwards: int
    ran: list[bool]  # per denoising step: forward computed (True) or velocity reused
    # per step i: the cosine of the last two computed video velocities before step i, i.e. what StepCache's
    # rule compares with its thresholds at step i (the trace's ``similarity`` wherever the rule needed one);
    # None while fewer than two steps have been computed
    velocity_similarity: list[float | None]
    trace: list[StepRecord] = field(default_factory=list)  # StepCache decisions (empty when off)
    latency_s: float = 0.0  # from the start of the chunk to its last step (diagnostics excluded)
    context_frames: int = 0  # frames in the KV cache after the prefill
    context_reset: bool = False  # the context was cleared before this chunk
    chunk_index: int = 0  # the chunk's number in its episode (0 = first)
    # per denoising forward this chunk took part in: how many episode chunks shared it (1 = alone)
    forward_batch_sizes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepSchedule:
    """The per-step times of one generation: sigmas (``num_steps + 1`` values, the last one where the
    final step goes) and the DiT's timesteps (``num_steps`` values), for the video and the actions."""

    video_sigmas: torch.Tensor
    video_timesteps: torch.Tensor
    action_sigmas: torch.Tensor
    action_timesteps: torch.Tensor

    @property
    def video_timestep_values(self) -> list[float]:
        """The video timesteps as Python floats (the forward's rows are built on the host)."""
        return self._values("video_timesteps")

    @property
    def action_timestep_values(self) -> list[float]:
        return self._values("action_timesteps")

    def _values(self, name: str) -> list[float]:
        cache = self.__dict__.setdefault("_value_lists", {})  # frozen: cached beside the fields
        if name not in cache:
            cache[name] = getattr(self, name).tolist()
        return cache[name]


# The range the bundled models were trained on: grey frames in [0, 1], states in the unit-square arena.
INPUT_RANGE = (0.0, 1.0)


class NonFiniteOutputError(ValueError):
    """A chunk produced NaN or infinite actions or frames; it is refused and its episode rolled back.
    ``field`` names the input outside the trained range that caused it (None: the inputs were in range)."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


class ContextBusyError(RuntimeError):
    """An episode context was asked for a second chunk while one is still in flight."""


class EpisodeContext:
    """One episode's state between chunks: the KV cache of its context frames, its instruction, the
    chunks since the last context reset, its chunk counter and (optionally) its noise generator.

    One chunk at a time: :meth:`DreamZeroPipeline.begin_chunk` on a context whose chunk is still in
    flight raises :class:`ContextBusyError`.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.kv_cache = KVCache()
        self.chunks_in_context = 0
        self.instruction: int | None = None
        self.chunk_index = 0
        self.generator = generator
        self._in_flight = threading.Lock()

    @property
    def busy(self) -> bool:
        """True while a chunk of this episode is in flight."""
        return self._in_flight.locked()

    def reset(self) -> None:
        """Start a new episode: clear the KV cache, forget the instruction, restart the chunk count."""
        if self.busy:
            raise ContextBusyError("cannot start a new episode while a chunk of this one is in flight")
        self.kv_cache.reset()
        self.chunks_in_context = 0
        self.instruction = None
        self.chunk_index = 0

    def snapshot(self) -> tuple:
        """What a chunk may change, to :meth:`restore` if it fails (the generator's state apart)."""
        return self.kv_cache.snapshot(), self.chunks_in_context, self.instruction, self.chunk_index

    def restore(self, snapshot: tuple) -> None:
        kv, self.chunks_in_context, self.instruction, self.chunk_index = snapshot
        self.kv_cache.restore(kv)

    def nbytes(self) -> int:
        """Bytes held by the episode's tensors (the KV cache and the generator's state)."""
        generator = 0 if self.generator is None else self.generator.get_state().numel()
        return self.kv_cache.nbytes() + generator

    def _claim(self) -> None:
        if not self._in_flight.acquire(blocking=False):
            raise ContextBusyError(
                "a chunk of this episode is already being generated (by another thread or request); an "
                "episode takes one chunk at a time: wait for it, or give each robot its own session "
                "(Omni.open_session)"
            )

    def _release(self) -> None:
        if self._in_flight.locked():
            self._in_flight.release()


def _state_snapshot(state: StepCacheState | None) -> dict[str, Any] | None:
    # The decision state is plain attributes; lists are copied so that the chunk's appends stay out.
    return None if state is None else instance_vars(state)


def _state_restore(state: StepCacheState | None, snapshot: dict[str, Any] | None) -> None:
    if state is not None and snapshot is not None:
        set_instance_vars(state, snapshot)


def _make_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


# -- chunks in flight --------------------------------------------------------------------------------


class ChunkJob:
    """One chunk of one episode in flight: its inputs, latents and stepping, and how to undo it.

    Made by :meth:`DreamZeroPipeline.begin_chunk`; its episode context stays claimed until
    :meth:`finish` (success) or :meth:`rollback` (failure: the context, chunk counter, noise generator
    and StepCache state go back to where they were before the chunk).
    """

    def __init__(self, context: EpisodeContext, generator: torch.Generator | None,
                 cache_state: StepCacheState | None, steps: int, batch: int, branches: int,
                 rows: int | None = None, dit: ParallelWorldActionDiT | None = None) -> None:
        self.context = context
        self.generator = generator
        self.cache_state = cache_state
        self.steps = steps
        self.batch = batch
        self.branches = branches  # 2: the forward gives [cond; uncond] rows, guided here; 1: one velocity
        self.rows = batch * branches if rows is None else rows  # this process's KV cache rows
        self.dit = dit  # several ranks: the video is this rank's shard (gathered in finish)
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._snapshot = context.snapshot()
        self._generator_state = (generator if generator is not None else torch.default_generator).get_state()
        self._state_snapshot = _state_snapshot(cache_state)
        self._kv_before_prefill: tuple | None = None
        self._open = True
        self.collectives_done = False  # several ranks: every collective of the chunk has completed here
        self.callback: Callable[[dict[str, Any]], None] | None = None
        # set by begin_chunk / prefill
        self.instruction_id = 0
        self.instructions: torch.Tensor
        self.model_state: torch.Tensor
        self.prefill_frames: torch.Tensor
        self.context_reset = False
        self.schedule: StepSchedule
        self.video: torch.Tensor
        self.actions: torch.Tensor
        self.stepper: ReplayCohort | DirectStepper
        self.member = 0  # this chunk's place in its stepper's cohort
        self.action_scale = 1.0
        # progress
        self.step = 0
        self.computed: list[torch.Tensor | None] = []  # per step: the new video velocity, None when reused
        self.forward_batch_sizes: list[int] = []
        self.video_x0: torch.Tensor | None = None
        self.group: DecisionGroup | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def record_step(self, video: torch.Tensor, actions: torch.Tensor, video_velocity: torch.Tensor,
                    action_velocity: torch.Tensor, computed: bool) -> None:
        """Take the samples its stepper computed from this step's velocities (computed or reused)."""
        index = self.step
        self.computed.append(video_velocity if computed else None)
        self.video, self.actions = video, actions
        self.step += 1
        if self.step == self.steps:
            self.finished = time.perf_counter()
        if self.callback is not None:
            self.callback({"step": index, "ran": computed, "video_velocity": video_velocity,
                           "action_velocity": action_velocity, "video": self.video, "actions": self.actions})

    def finish(self, decoupled_video_noise: bool, *, commit: bool = True) -> ChunkOutput:
        """The chunk's outputs; the episode moves on (chunk counter) and its context is released
        (``commit=False``: not yet, until :meth:`commit`; :meth:`rollback` still undoes it)."""
        if not self.done:
            raise RuntimeError(f"the chunk has run {self.step} of its {self.steps} steps")
        final_video = self.video_x0 if decoupled_video_noise else self.video
        if self.dit is not None:  # every rank gets the whole video (its shard stepped here)
            final_video = self.dit.gather_video(final_video)
        actions = self.actions * self.action_scale
        predicted = ((final_video + 1.0) / 2.0).clamp(0.0, 1.0)
        latency = (self.finished or time.perf_counter()) - self.started
        # diagnostics, after the clock stopped
        if self.dit is None:
            similarities = _successive_similarities(self.computed)
        else:
            similarities = _sharded_successive_similarities(self.computed, self.dit)
            self.collectives_done = True
        # checked after the collectives above, so that every rank of a group reaches them before any raises
        self._check_finite(actions, final_video)
        group = self.group
        trace = list(group.cache_state.trace) if group is not None and group.cache_state is not None else []
        result = ChunkOutput(
            actions=actions.cpu().numpy().astype(np.float32),
            frames=predicted.cpu().numpy().astype(np.float32),
            dit_forwards=len(self.forward_batch_sizes),
            prefill_forwards=1,
            ran=[velocity is not None for velocity in self.computed],
            velocity_similarity=_read_before_each_step(similarities),
            trace=trace,
            latency_s=latency,
            context_frames=self.context.kv_cache.num_frames,
            context_reset=self.context_reset,
            chunk_index=self.context.chunk_index,
            forward_batch_sizes=list(self.forward_batch_sizes),
        )
        if commit:
            self.commit()
        logger.debug("chunk: %d/%d forwards, %.1f ms", result.dit_forwards, self.steps, 1000 * latency)
        return result

    def commit(self) -> None:
        """The finished chunk counts: the episode moves on and its context is released."""
        self.context.chunk_index += 1
        self._close()

    def _check_finite(self, actions: torch.Tensor, video: torch.Tensor) -> None:
        """Refuse a chunk whose outputs are not finite (a NaN served as an action is a silent wrong result),
        naming the input outside the trained range where there is one."""
        bad = [name for name, tensor in (("actions", actions), ("frames", video)) if not torch.isfinite(tensor).all()]
        if not bad:
            return
        low, high = INPUT_RANGE
        ranges = {"state": (self.model_state + 1.0) / 2.0, "observation": (self.prefill_frames + 1.0) / 2.0}
        culprit, details = None, []
        for name, values in ranges.items():
            lo, hi = float(values.min()), float(values.max())
            details.append(f"{name} in [{lo:.4g}, {hi:.4g}]")
            if culprit is None and (lo < low or hi > high):
                culprit = name
        cause = (f"{culprit} lies outside [{low:g}, {high:g}], the range the model was trained on: bring it into "
                 "that range" if culprit is not None else "the inputs lie in the trained range, so the model "
                 "itself produced them")
        raise NonFiniteOutputError(
            f"the chunk's {' and '.join(bad)} are not finite (NaN or infinity) and were not served; {cause} "
            f"({', '.join(details)}); the episode is as before the chunk", culprit)

    def rollback(self) -> None:
        """Undo the chunk: the episode, its noise generator and its StepCache state are as before it."""
        if not self._open:
            return
        self.context.restore(self._snapshot)
        (self.generator if self.generator is not None else torch.default_generator).set_state(self._generator_state)
        _state_restore(self.cache_state, self._state_snapshot)
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.context._release()


class DecisionGroup:
    """Chunks that take one StepCache decision per step together.

    One chunk (the default: every episode decides from its own velocity), or several for the batch-mean
    rule (upstream's one decision per batch: the history holds their velocities side by side, and the
    cosine is averaged over them). Without a cache state every step runs.
    """

    def __init__(self, jobs: Sequence[ChunkJob], cache_state: StepCacheState | None) -> None:
        if not jobs:
            raise ValueError("a decision group needs at least one chunk")
        steps = {job.steps for job in jobs}
        if len(steps) != 1:
            raise ValueError(f"chunks deciding together need the same step count, got {sorted(steps)}")
        self.jobs = list(jobs)
        self.cache_state = cache_state
        self.steps = steps.pop()
        self.step = 0
        self.history: list[tuple[torch.Tensor, ...]] = []
        self._decision: Any = None
        if cache_state is not None:
            # Every chunk is a new generation; the video's sigmas give each step's time and size.
            cache_state.reset(self.steps, timesteps=self.jobs[0].schedule.video_sigmas.tolist())
        for job in self.jobs:
            job.group = self

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def plan(self) -> bool:
        """Decide the next step (nothing recorded until :meth:`advance`)."""
        if self.cache_state is None:
            return True
        self._decision = self.cache_state.plan_step(self.history)
        return self._decision.run

    def advance(self, run: bool, outputs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
                batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Record the decision and return each chunk's velocities for this step: the forward's
        ``outputs`` (guided video, conditional action; fresh tensors) or the reused ones."""
        state = self.cache_state
        if state is not None:
            state.commit_step(self._decision)
        if run:
            assert outputs is not None
            velocities = list(outputs)
            for job in self.jobs:
                job.forward_batch_sizes.append(batch_size)
            if state is not None:
                state.push_computed(self.history, _join(velocities))
        else:
            velocities = _split(state.reused_prediction(self.history), [job.batch for job in self.jobs])
        self.step += 1
        return velocities


def _read_before_each_step(at_later_step: list[float | None]) -> list[float | None]:
    """Pair cosines stored at the later step of each pair -> per step ``i``, the cosine of the last two
    computed velocities before ``i`` (the similarity StepCache's rule reads at step ``i``)."""
    out: list[float | None] = []
    latest: float | None = None
    for value in at_later_step:
        out.append(latest)
        if value is not None:
            latest = value
    return out


def _successive_similarities(computed: list[torch.Tensor | None]) -> list[float | None]:
    """Per step: the cosine of its computed velocity and the previous computed one (as
    :func:`stepcache.velocity_similarity`: per sample in float32, summed in float64, batch mean), None
    for a reused step and the first computed one; all pairs in one batched computation."""
    velocities = [v for v in computed if v is not None]
    out: list[float | None] = [None] * len(computed)
    if len(velocities) < 2:
        return out
    latest = torch.stack(velocities[1:]).flatten(2).float()
    previous = torch.stack(velocities[:-1]).flatten(2).float()
    dot = (latest * previous).sum(-1, dtype=torch.float64)
    norms = ((latest * latest).sum(-1, dtype=torch.float64) * (previous * previous).sum(-1, dtype=torch.float64))
    cosine = (dot / norms.sqrt().clamp_min(1e-8)).mean(-1).clamp(-1.0, 1.0).tolist()
    steps = [i for i, v in enumerate(computed) if v is not None]
    for step, value in zip(steps[1:], cosine):
        out[step] = value
    return out


def _sharded_successive_similarities(computed: list[torch.Tensor | None],
                                     dit: ParallelWorldActionDiT) -> list[float | None]:
    """:func:`_successive_similarities` of velocities sharded over ``dit``'s sequence-parallel group: the
    per-sample sums of every pair, all-reduced in one collective (none when every rank holds the whole
    velocity)."""
    velocities = [v for v in computed if v is not None]
    out: list[float | None] = [None] * len(computed)
    if len(velocities) < 2:
        return out
    stats = torch.stack([velocity_statistics(latest, previous)
                         for latest, previous in zip(velocities[1:], velocities[:-1])])  # (pairs, B, 4)
    if dit.groups.sp_group is not None:
        stats = reduce_statistics(stats.flatten(0, 1), dit.groups.sp_group).view(stats.shape)
    steps = [i for i, v in enumerate(computed) if v is not None]
    for step, pair in zip(steps[1:], stats):
        out[step] = signals_from_statistics(pair).similarity
    return out


def _join(velocities: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(velocities) == 1:
        return velocities[0]
    return torch.cat([v for v, _ in velocities]), torch.cat([a for _, a in velocities])


def _split(prediction: Sequence[torch.Tensor], batches: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    video, action = prediction[0], prediction[1]
    if len(batches) == 1:
        return [(video, action)]
    return list(zip(video.split(batches), action.split(batches)))


# -- the pipeline ------------------------------------------------------------------------------------


class DreamZeroPipeline:
    """The bundled DreamZero-style world-action pipeline.

    ``pipe(observation, instruction, state)`` continues the pipeline's own episode by one chunk (a
    batch of observations allowed); :mod:`stepcache.serving` runs many episodes at once through
    :meth:`begin_chunk`, :meth:`prefill` and :meth:`denoise_step`.

    Args:
        transformer: the :class:`CausalWorldActionDiT`.
        config: sampling settings.
        parallel: the process groups of a model replica spread over several ranks
            (:class:`~stepcache.models.dreamzero.parallel.ParallelGroups`; every rank builds the pipeline
            with the same weights and config); None: one process.

    Example:
        >>> pipe = DreamZeroPipeline.from_pretrained("dreamzero-mini")      # doctest: +SKIP
        >>> out = pipe(frame, "reach the ring", state, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> out.actions.shape                                                # doctest: +SKIP
        (1, 8, 2)
    """

    def __init__(self, transformer: CausalWorldActionDiT, config: DreamZeroPipelineConfig | None = None, *,
                 parallel: ParallelGroups | None = None, world_config: Any = None) -> None:
        from stepcache.models.dreamzero.world import WorldConfig

        self.transformer = transformer.eval()
        self.config = config or DreamZeroPipelineConfig()
        # The world the model was trained on (from its config.json; the reaching world when none is named):
        # what the demo, the bench and the load benchmark drive. ``world_config.make_world()`` starts an episode.
        self.world_config = WorldConfig() if world_config is None else world_config
        if parallel is not None and not isinstance(parallel, ParallelGroups):
            raise ValueError(f"parallel must be a ParallelGroups (ParallelGroups.create(...)) or None, got "
                             f"{type(parallel).__name__}")
        if parallel is not None and parallel.agreement_group is None:
            raise ValueError(
                "parallel has no agreement_group, the gloo group on which the ranks agree on each chunk's outcome "
                "(ParallelGroups.create makes one): without it a rank that failed mid-chunk could pair its "
                "agreement with a peer's forward collective; pass agreement_group=dist.new_group(ranks, "
                "backend='gloo', timeout=...) with a timeout longer than the other groups'"
            )
        # Several ranks: the DiT runs through its parallel wrapper (None: one process, the plain model).
        self.dit = None if parallel is None else ParallelWorldActionDiT(
            self.transformer, parallel, guidance_scale=self.config.guidance_scale)
        # Templates: every chunk steps fresh copies (or replays them); these are never stepped.
        self.video_scheduler = _make_scheduler(self.config.flow_shift)
        self.action_scheduler = _make_scheduler(self.config.flow_shift)
        self.context = EpisodeContext()
        self._replays: dict[tuple[int, str, bool], SchedulerReplay | None] = {}
        self._schedules: dict[int, StepSchedule] = {}
        self._tables_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "dreamzero-mini", config: DreamZeroPipelineConfig | None = None, *,
        parallel: ParallelGroups | None = None,
    ) -> DreamZeroPipeline:
        """Load a bundled model by name, or a directory holding ``config.json`` + ``model.safetensors``."""
        from stepcache.models.dreamzero.weights import load_model, load_world_config

        return cls(load_model(model), config, parallel=parallel, world_config=load_world_config(model))

    @property
    def decision_group(self) -> Any:
        """The process group StepCache reduces its signals over (``backend.enable(pipeline,
        process_group=pipeline.decision_group)``); None for one process."""
        return None if self.dit is None else self.dit.decision_group

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # -- episode context (the pipeline's own episode) -------------------------------------------

    @property
    def kv_cache(self) -> KVCache:
        return self.context.kv_cache

    @property
    def chunks_in_context(self) -> int:
        return self.context.chunks_in_context

    @property
    def instruction(self) -> int | None:
        return self.context.instruction

    def reset_context(self) -> None:
        """Start a new episode: clear the KV cache and forget the instruction."""
        self.context.reset()

    def new_context(self, generator: torch.Generator | None = None) -> EpisodeContext:
        """A fresh episode context (for :meth:`begin_chunk`; the serving engine's sessions hold one each)."""
        return EpisodeContext(generator)

    def _prepare_context(self, context: EpisodeContext, instruction: int) -> bool:
        reset = False
        if context.instruction is not None and instruction != context.instruction:
            logger.debug("new instruction: context reset")
            reset = True
        elif context.chunks_in_context >= self.config.context_reset_chunks:
            reset = True
        if reset:
            context.kv_cache.reset()
            context.chunks_in_context = 0
        context.instruction = instruction
        return reset

    # -- schedules ------------------------------------------------------------------------------

    def _configured_scheduler(self, num_steps: int, video: bool) -> UniPCMultistepScheduler:
        scheduler = copy.deepcopy(self.video_scheduler if video else self.action_scheduler)
        scheduler.set_timesteps(num_steps)
        if video and self.config.decoupled_video_noise:
            # Compress the video's sigmas from [0, 1] into [video_final_sigma, 1]; the actions keep theirs.
            low = self.config.video_final_sigma
            sigmas = low + (1.0 - low) * scheduler.sigmas
            scheduler.sigmas = sigmas
            scheduler.timesteps = sigmas[:-1] * scheduler.config.num_train_timesteps
        return scheduler

    def _set_schedules(self, num_steps: int) -> None:
        """Set the template schedulers' timesteps (and the video's compressed sigmas when decoupled)."""
        self.video_scheduler = self._configured_scheduler(num_steps, video=True)
        self.action_scheduler = self._configured_scheduler(num_steps, video=False)

    def schedule(self, num_steps: int) -> StepSchedule:
        """The sigmas and timesteps of a generation of ``num_steps`` steps."""
        schedule = self._schedules.get(num_steps)
        if schedule is None:
            video = self._configured_scheduler(num_steps, video=True)
            action = self._configured_scheduler(num_steps, video=False)
            schedule = StepSchedule(video.sigmas.clone(), video.timesteps.float(), action.sigmas.clone(),
                                    action.timesteps.float())
            self._schedules[num_steps] = schedule
        return schedule

    def _replay(self, num_steps: int, stream: str, solver_aware: bool) -> SchedulerReplay | None:
        if stream == "action" and not self.config.decoupled_video_noise:
            stream = "video"  # the same sigmas: one table serves both
        key = (num_steps, stream, solver_aware)
        with self._tables_lock:
            if key not in self._replays:
                try:
                    self._replays[key] = SchedulerReplay(
                        lambda: self._configured_scheduler(num_steps, video=stream == "video"), solver_aware)
                except SchedulerNotLinearError as error:
                    logger.warning("scheduler replay off (%s): stepping the scheduler itself", error)
                    self._replays[key] = None
            return self._replays[key]

    def _assign_steppers(self, jobs: Sequence[ChunkJob]) -> None:
        """Give the chunks that start together their scheduler stepping: one :class:`ReplayCohort` per
        set of chunks with the same steps, shapes and stepping (one product per step for all of them),
        or a :class:`DirectStepper` each when the replay is off or unavailable."""
        cohorts: dict[tuple, list[ChunkJob]] = {}
        for job in jobs:
            solver_aware = job.cache_state is not None and job.cache_state.config.solver_aware
            key = (job.steps, solver_aware, tuple(job.video.shape), tuple(job.actions.shape), job.video.device,
                   job.video.dtype)
            cohorts.setdefault(key, []).append(job)
        for (steps, solver_aware, *_), members in cohorts.items():
            if self.config.replay_schedulers:
                video_replay = self._replay(steps, "video", solver_aware)
                action_replay = self._replay(steps, "action", solver_aware)
                if video_replay is not None and action_replay is not None:
                    videos, actions = _stack([job.video for job in members]), _stack([job.actions for job in members])
                    cohort = ReplayCohort(videos, actions, video_replay, action_replay)
                    for index, job in enumerate(members):
                        job.stepper, job.member = cohort, index
                    continue
            for job in members:
                job.stepper = DirectStepper(self._configured_scheduler(steps, video=True),
                                            self._configured_scheduler(steps, video=False), solver_aware)

    def _step_schedulers(self, steps: Sequence[tuple[ChunkJob, torch.Tensor, torch.Tensor, bool]]
                         ) -> dict[ChunkJob, Exception]:
        """Step every chunk's schedulers with its velocities ``(job, video, action, computed)``: one call
        per cohort (stacked velocities in, stacked samples out). Returns the chunks that failed."""
        by_stepper: dict[int, list[tuple[ChunkJob, torch.Tensor, torch.Tensor, bool]]] = {}
        for item in steps:
            by_stepper.setdefault(id(item[0].stepper), []).append(item)
        failures: dict[ChunkJob, Exception] = {}
        for items in by_stepper.values():
            jobs = [item[0] for item in items]
            first = jobs[0]
            computed = [item[3] for item in items]
            try:
                video_velocities = _stack([item[1] for item in items])
                action_velocities = _stack([item[2] for item in items])
                last = first.step == first.steps - 1
                direct = isinstance(first.stepper, DirectStepper)
                videos = _stack([job.video for job in jobs]) if direct or last else None
                actions = _stack([job.actions for job in jobs]) if direct else None
                if last:  # the video's x0 estimate at the last step (what decoupled noise serves)
                    video_x0 = videos - first.schedule.video_sigmas[first.step] * video_velocities
                new_videos, new_actions = first.stepper.step([job.member for job in jobs], videos, actions,
                                                             video_velocities, action_velocities, computed)
            except Exception as error:
                failures.update(dict.fromkeys(jobs, error))
                continue
            for index, (job, video_velocity, action_velocity, run) in enumerate(items):
                try:
                    if last:
                        job.video_x0 = video_x0[index]
                    job.record_step(new_videos[index], new_actions[index], video_velocity, action_velocity, run)
                except Exception as error:
                    failures[job] = error
        return failures

    # -- chunks ---------------------------------------------------------------------------------

    def begin_chunk(
        self,
        context: EpisodeContext,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        cache_state: StepCacheState | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> ChunkJob:
        """Check the inputs, claim ``context`` and prepare its episode for the next chunk (no forward).

        Args:
            context: the episode (refused while another of its chunks is in flight).
            observation: ``(S, S)`` or ``(B, S, S)`` grey frame(s) in [0, 1].
            instruction: text or index, shared by the batch.
            state: ``(2,)`` or ``(B, 2)`` robot state(s).
            generator: the chunk's noise (default: the context's, else torch's global one).
            num_inference_steps: default: the config's.
            cache_state: the StepCache state deciding this chunk's steps (None: every step runs).
            callback: called after every step with a dict (step, ran, velocities, latents; on several
                ranks, this rank's shard of the video ones).

        On several ranks, every rank calls this with the same arguments: one ``all_gather`` checks them
        (a rank whose inputs are refused, or that was given other inputs, fails every rank here, before
        any forward).
        """
        if self.dit is None:
            return self._begin_chunk(context, observation, instruction, state, generator, num_inference_steps,
                                     cache_state, callback)
        self.dit.groups.health.check()  # after a chunk that failed mid-way: refused on every rank, no collective
        job = error = None
        try:
            job = self._begin_chunk(context, observation, instruction, state, generator, num_inference_steps,
                                    cache_state, callback)
        except Exception as local_error:
            error = local_error
        try:
            ranks_agree(self._chunk_fingerprint(job), self.dit.decision_group, "the chunk's inputs",
                        ok=error is None)
        except BaseException:
            if job is not None:
                job.rollback()
            raise
        if error is not None:
            raise error
        return job

    def _chunk_fingerprint(self, job: ChunkJob | None) -> dict[str, int]:
        """What every rank must share to run one chunk together (zeros for a rank that failed)."""
        if job is None:
            return dict.fromkeys(("observation", "state", "instruction", "steps", "noise_generator", "context_frames",
                                  "chunk_index", "stepcache"), 0)
        generator = job.generator if job.generator is not None else torch.default_generator
        return {
            "observation": fingerprint(job.prefill_frames), "state": fingerprint(job.model_state),
            "instruction": job.instruction_id, "steps": job.steps,
            "noise_generator": fingerprint(generator.get_state()),
            "context_frames": job.context.kv_cache.num_frames, "chunk_index": job.context.chunk_index,
            "stepcache": -1 if job.cache_state is None else fingerprint(job.cache_state.config),
        }

    def _begin_chunk(
        self,
        context: EpisodeContext,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        generator: torch.Generator | None,
        num_inference_steps: int | None,
        cache_state: StepCacheState | None,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> ChunkJob:
        cfg = self.config
        model_cfg = self.transformer.config
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        steps = int(steps)
        if cache_state is not None:
            cache_state.config.check_num_steps(steps)
        frames = self._as_batch(observation, 3, "observation", (model_cfg.frame_size, model_cfg.frame_size))
        states = self._as_batch(state, 2, "state", (model_cfg.state_dim,))
        if frames.shape[0] != states.shape[0]:
            raise ValueError(f"observation batch {frames.shape[0]} != state batch {states.shape[0]}")
        batch = frames.shape[0]
        instruction_id = instruction_index(instruction)
        # The batch is [conditional; unconditional] with CFG: each branch has its own cache rows.
        branches = 2 if cfg.guidance_scale != 1.0 else 1
        rows = None
        if self.dit is not None:  # the parallel DiT builds its branch rows and returns the guided velocity
            self._check_parallel_cache_state(cache_state)
            branches, rows = 1, self.dit.branch_rows(batch)
        generator = generator if generator is not None else context.generator
        context._claim()
        job = ChunkJob(context, generator, cache_state, steps, batch, branches, rows, self.dit)
        try:
            job.callback = callback
            job.instruction_id = instruction_id
            job.context_reset = self._prepare_context(context, instruction_id)
            cached_rows = context.kv_cache.keys[0].shape[0] if context.kv_cache.num_frames else None
            if cached_rows is not None and cached_rows != job.rows:
                raise ValueError(
                    f"batch size changed within an episode (cache holds {cached_rows} rows, this chunk needs "
                    f"{job.rows}); start a new episode first (reset_context() / start_episode())"
                )
        except BaseException:
            job.rollback()
            raise
        device = self.device
        job.instructions = torch.tensor(
            [instruction_id] * batch + [model_cfg.null_instruction] * batch * (branches - 1), device=device)
        job.model_state = (states * 2.0 - 1.0).repeat(branches, 1).to(device)
        job.prefill_frames = (frames * 2.0 - 1.0).repeat(branches, 1, 1).to(device)
        job.schedule = self.schedule(steps)
        job.action_scale = model_cfg.action_scale
        return job

    def _check_parallel_cache_state(self, cache_state: StepCacheState | None) -> None:
        # Decisions on a sharded velocity without the group would differ between ranks: a hang.
        if cache_state is not None and self.dit.groups.sp_group is not None and cache_state.process_group is None:
            raise ValueError(
                "the StepCache state has no process_group, but this pipeline shards the video velocity over "
                "several ranks: enable it with backend.enable(pipeline, process_group=pipeline.decision_group) "
                "(or StepCacheState(config, process_group=pipeline.decision_group))"
            )

    @torch.no_grad()
    def prefill(self, jobs: Sequence[ChunkJob]) -> dict[ChunkJob, Exception]:
        """Prefill every chunk's observation into its episode's cache (one batched forward), then draw
        each chunk's noise and set up its stepping. Returns the chunks that failed, with their error
        (the batch is retried chunk by chunk to find them); their caches are as before."""
        failures: dict[ChunkJob, Exception] = {}
        for job in jobs:
            job._kv_before_prefill = job.context.kv_cache.snapshot()
        try:
            self.prefill_forward(jobs)
        except Exception as error:
            for job in jobs:
                job.context.kv_cache.restore(job._kv_before_prefill)
            if len(jobs) == 1:
                return {jobs[0]: error}
            for job in jobs:
                try:
                    self.prefill_forward([job])
                except Exception as single_error:
                    job.context.kv_cache.restore(job._kv_before_prefill)
                    failures[job] = single_error
        for job in jobs:
            if job in failures:
                continue
            try:
                self._start_denoising(job)
            except Exception as error:
                job.context.kv_cache.restore(job._kv_before_prefill)
                failures[job] = error
        self._assign_steppers([job for job in jobs if job not in failures])
        return failures

    def prefill_forward(self, jobs: Sequence[ChunkJob]) -> None:
        """The prefill forward: the chunks' clean observations into their caches (timestep 0)."""
        frames = _cat([job.prefill_frames for job in jobs])
        instructions = _cat([job.instructions for job in jobs])
        cache = KVCache.stack([job.context.kv_cache for job in jobs], [job.rows for job in jobs])
        if self.dit is not None:  # conditional rows in; each rank caches its branches' rows
            self.dit.prefill(frames, instructions, cache, batches=[job.batch for job in jobs])
            return
        self.transformer.prefill(frames, instructions, cache)

    def _start_denoising(self, job: ChunkJob) -> None:
        model_cfg = self.transformer.config
        job.context.chunks_in_context += 1
        video = torch.randn((job.batch, model_cfg.future_frames, model_cfg.frame_size, model_cfg.frame_size),
                            generator=job.generator)
        actions = torch.randn((job.batch, model_cfg.action_horizon, model_cfg.action_dim), generator=job.generator)
        if self.dit is not None:  # the whole noise drawn on every rank; this rank keeps its shard
            video = self.dit.shard_video(video)
        device = self.device
        job.video, job.actions = video.to(device), actions.to(device)

    @torch.no_grad()
    def denoise_step(self, groups: Sequence[DecisionGroup]) -> dict[DecisionGroup, Exception]:
        """One denoising step of every group: every group decides (the signals of all that need them in
        one reduction and one device-to-host copy), one DiT forward runs on the rows of the groups that
        compute (CFG combined for all of them in one operation), and every cohort of chunks steps its
        schedulers in one product. Returns the groups that failed, with their error (a failed batched
        forward is retried group by group to find them)."""
        failures: dict[DecisionGroup, Exception] = {}
        deciding = [group for group in groups if group.cache_state is not None]
        prefetch_signals([group.cache_state for group in deciding], [group.history for group in deciding])
        plans: list[tuple[DecisionGroup, bool]] = []
        for group in groups:
            try:
                plans.append((group, group.plan()))
            except Exception as error:
                failures[group] = error
        running = [group for group, run in plans if run]
        outputs: dict[DecisionGroup, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        batch_size = sum(len(group.jobs) for group in running)
        if running:
            try:
                outputs = self._forward_groups(running)
            except Exception as error:
                if len(running) == 1:
                    failures[running[0]] = error
                else:
                    for group in running:
                        try:
                            outputs.update(self._forward_groups([group]))
                        except Exception as single_error:
                            failures[group] = single_error
        steps: list[tuple[ChunkJob, torch.Tensor, torch.Tensor, bool]] = []
        for group, run in plans:
            if group in failures:
                continue
            try:
                velocities = group.advance(run, outputs.get(group), batch_size)
            except Exception as error:
                failures[group] = error
                continue
            steps.extend((job, video, action, run) for job, (video, action) in zip(group.jobs, velocities))
        for job, error in self._step_schedulers(steps).items():
            failures.setdefault(job.group, error)
        return failures

    def _forward_groups(
        self, groups: Sequence[DecisionGroup]
    ) -> dict[DecisionGroup, list[tuple[torch.Tensor, torch.Tensor]]]:
        jobs = [job for group in groups for job in group.jobs]
        per_job = iter(self.denoise_forward(jobs))
        return {group: [next(per_job) for _ in group.jobs] for group in groups}

    def denoise_forward(self, jobs: Sequence[ChunkJob]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The one place where the DiT denoises: one forward over the rows of ``jobs``, each at its own
        step; returns each job's guided video velocity and conditional action velocity (fresh tensors;
        on several ranks, this rank's shard of the video one), the CFG combination done once for all."""
        uniform = len({(job.batch, job.branches) for job in jobs}) == 1
        if self.dit is not None:
            batches = [job.batch for job in jobs]
            video = _cat([job.video for job in jobs])
            t_video, t_action = self._timestep_rows(jobs, [job.batch for job in jobs], video.device)
            cache = KVCache.stack([job.context.kv_cache for job in jobs], [job.rows for job in jobs])
            out = self.dit(video, _cat([job.actions for job in jobs]), _cat([job.model_state for job in jobs]),
                           t_video, t_action, _cat([job.instructions for job in jobs]), cache, batches=batches)
            return self._guided(jobs, out.video, out.action, uniform, branches_in_output=1)
        if uniform:  # every chunk's rows [cond; uncond] from one stack: (J, branches, B, ...)
            first = jobs[0]
            video = _stack([job.video for job in jobs]).unsqueeze(1)
            video = video.expand(-1, first.branches, *video.shape[2:]).reshape(-1, *video.shape[3:])
            actions = _stack([job.actions for job in jobs]).unsqueeze(1)
            actions = actions.expand(-1, first.branches, *actions.shape[2:]).reshape(-1, *actions.shape[3:])
        else:
            video = _cat([job.video.repeat(job.branches, 1, 1, 1) for job in jobs])
            actions = _cat([job.actions.repeat(job.branches, 1, 1) for job in jobs])
        state = _cat([job.model_state for job in jobs])
        t_video, t_action = self._timestep_rows(jobs, [job.rows for job in jobs], video.device)
        instructions = _cat([job.instructions for job in jobs])
        cache = KVCache.stack([job.context.kv_cache for job in jobs], [job.rows for job in jobs])
        out = self.transformer(video, actions, state, t_video, t_action, instructions, cache)
        return self._guided(jobs, out.video, out.action, uniform, branches_in_output=None)

    @staticmethod
    def _timestep_rows(jobs: Sequence[ChunkJob], rows: Sequence[int], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's video and action timestep (every chunk at its own step), built on the host."""
        video = [job.schedule.video_timestep_values[job.step] for job, count in zip(jobs, rows) for _ in range(count)]
        action = [job.schedule.action_timestep_values[job.step] for job, count in zip(jobs, rows)
                  for _ in range(count)]
        return (torch.tensor(video, dtype=torch.float32).to(device),
                torch.tensor(action, dtype=torch.float32).to(device))

    def _guided(self, jobs: Sequence[ChunkJob], video: torch.Tensor, action: torch.Tensor, uniform: bool,
                branches_in_output: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Split a forward's output per job: ``uncond + guidance_scale * (cond - uncond)`` for the video
        of jobs with two branches, the conditional rows for the action. Copies are made (a compiled
        model may reuse its output buffers, and the cache keeps velocities). When every job has the
        same layout, this is one operation for all jobs."""
        scale = self.config.guidance_scale
        if uniform:
            count, batch = len(jobs), jobs[0].batch
            branches = jobs[0].branches if branches_in_output is None else branches_in_output
            video = video.view(count, branches, batch, *video.shape[1:])
            action = action.view(count, branches, batch, *action.shape[1:])
            if branches == 2:
                cond, uncond = video[:, 0], video[:, 1]
                guided = uncond + scale * (cond - uncond)
            else:
                guided = video[:, 0].clone()
            return list(zip(guided.unbind(0), action[:, 0].clone().unbind(0)))
        out = []
        start = 0
        for job in jobs:
            rows = job.batch * (job.branches if branches_in_output is None else branches_in_output)
            raw_video, raw_action = video[start : start + rows], action[start : start + rows]
            start += rows
            if rows == 2 * job.batch:
                cond, uncond = raw_video[: job.batch], raw_video[job.batch :]
                guided = uncond + scale * (cond - uncond)
            else:
                guided = raw_video.clone()
            out.append((guided, raw_action[: job.batch].clone()))
        return out

    # -- one chunk of the pipeline's own episode ------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> ChunkOutput:
        """Denoise one chunk of the pipeline's own episode given the current observation ``(S, S)`` or
        ``(B, S, S)`` in [0, 1], an instruction (text or index, shared by the batch) and the state
        ``(2,)`` or ``(B, 2)``. A chunk that fails (or is interrupted) leaves the episode as it was."""
        cache_state = get_stepcache_state(self) if is_stepcache_active(self) else None
        job = self.begin_chunk(self.context, observation, instruction, state, generator=generator,
                               num_inference_steps=num_inference_steps, cache_state=cache_state, callback=callback)
        return self.run_chunk(job)

    def run_chunk(self, job: ChunkJob) -> ChunkOutput:
        """Run a chunk from :meth:`begin_chunk` to the end on its own (rolled back if anything fails).

        On several ranks, the ranks then agree on its outcome (see
        :func:`~stepcache.models.dreamzero.parallel.agree_on_outcome`): a chunk that failed on any rank
        fails on every rank, naming it, and is rolled back on every rank; if it failed while collectives
        were pending, the groups refuse every later chunk (restart the group).
        """
        if self.dit is not None:
            return self._run_parallel_chunk(job)
        try:
            return self._denoise_chunk(job, commit=True)
        except BaseException:
            job.rollback()
            raise

    def _denoise_chunk(self, job: ChunkJob, *, commit: bool) -> ChunkOutput:
        """Prefill, then every denoising step of one chunk on its own; a failure is raised."""
        failure = self.prefill([job]).get(job)
        if failure is not None:
            raise failure
        group = DecisionGroup([job], job.cache_state)
        while not group.done:
            failure = self.denoise_step([group]).get(group)
            if failure is not None:
                raise failure
        return job.finish(self.config.decoupled_video_noise, commit=commit)

    def _run_parallel_chunk(self, job: ChunkJob) -> ChunkOutput:
        output = error = None
        try:
            output = self._denoise_chunk(job, commit=False)
        except Exception as local_error:
            error = local_error
        except BaseException:  # interrupted: the peers are left in a collective this rank will not join
            job.rollback()
            self.dit.groups.health.broken = "a rank was interrupted in the middle of a chunk"
            raise
        if error is None:
            status = SUCCEEDED
        else:
            status = FAILED_AFTER_COLLECTIVES if job.collectives_done else FAILED_IN_COLLECTIVES
        try:
            agree_on_outcome(self.dit.groups, status, error)
        except BaseException:
            job.rollback()
            raise
        job.commit()
        return output

    def _as_batch(self, value: Any, batched_dim: int, name: str, tail: tuple[int, ...]) -> torch.Tensor:
        if value is None:
            raise ValueError(f"{name} is missing (None)")
        try:
            tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be an array of numbers of shape {tail} or (B, *{tail}): {error}") from None
        tensor = tensor.detach().float().cpu()
        if tensor.dim() == batched_dim - 1:
            tensor = tensor[None]
        if tensor.dim() != batched_dim or tuple(tensor.shape[1:]) != tail or tensor.shape[0] == 0:
            raise ValueError(f"{name} must have shape {tail} or (B, *{tail}) with B >= 1, got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} must be finite")
        return tensor


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
