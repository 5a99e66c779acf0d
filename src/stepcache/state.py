"""Mutable state for step-level DiT velocity caching: the decision rule, its signals and its trace.

The seed's rule (DreamZero's ``should_run_model``, as vLLM-Omni's ``step_cache`` ports it), evaluated
once per scheduler step, in this order:

1. disabled -> run;
2. fewer than ``min_history_steps`` computed velocities -> run;
3. a skip countdown above 1 -> decrement it, skip;
4. a countdown of exactly 1 -> clear it, run (every skip window ends with a forced refresh);
5. otherwise ``s`` = cosine of the last two computed velocities (per sample over ``flatten(1)``,
   float32, averaged over the batch); at the first ``s > sim_thresholds[i]`` set the countdown to
   ``skip_countdowns[i]`` and skip this step; no match -> run.

A countdown of ``c`` therefore gives ``c`` consecutive skips, then one run. A non-finite ``s``
fails every comparison, so the step runs. The opt-in options of :class:`~stepcache.StepCacheConfig`
wrap it: a fixed schedule (``static_run_steps``) replaces steps 2-5; ``warmup_steps``,
``final_steps`` and ``max_skip_steps`` force runs before step 3; ``policy="error_budget"`` replaces
steps 3-5 by an accumulated error estimate. With the defaults, every decision is the seed's.

Everything here is tensors and numbers. With a ``process_group`` (velocities split across ranks), one
collective reduces the per-sample sums the signals are made of, so every rank decides alike, and the
optional check adds two small all_gathers per step; without one, no collective is called (see
docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import reprlib
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stepcache.config import (
    ERROR_BUDGET_POLICY,
    PLANNED_POLICY,
    REUSE_EXTRAPOLATE,
    DiffusionCacheConfig,
    StepCacheConfig,
    as_step_cache_config,
    shown,
)
from stepcache.policies import plan_schedule, planned_forwards
from stepcache.recording import RecordedStep, active_recording, detached_copy

logger = logging.getLogger(__name__)

# Why a step ran or was skipped (StepRecord.reason).
DISABLED = "disabled"
WARMUP = "warmup"  # not enough computed velocities yet, or inside warmup_steps
FINAL = "final"  # inside final_steps: always runs
MAX_SKIPS = "max_skips"  # max_skip_steps consecutive skips reached: forced run
COUNTDOWN = "countdown"  # skipped inside a skip window
REFRESH = "refresh"  # forced run that ends a skip window
SIMILAR = "similar"  # similarity above a threshold: skip window starts
DISSIMILAR = "dissimilar"  # similarity at or below every threshold
WITHIN_BUDGET = "within_budget"  # error_budget policy: the accumulated estimate still fits: skip
OVER_BUDGET = "over_budget"  # error_budget policy: the estimate would pass the budget: run
NON_FINITE = "non_finite"  # similarity or error estimate NaN or infinite: run
STATIC = "static"  # decided by the config's fixed schedule (static_run_steps)
PLANNED = "planned"  # decided by the plan made at generation start (policy "planned")
REASONS = (
    DISABLED, WARMUP, FINAL, MAX_SKIPS, COUNTDOWN, REFRESH, SIMILAR, DISSIMILAR, WITHIN_BUDGET, OVER_BUDGET,
    NON_FINITE, STATIC, PLANNED,
)

# Per-sample sums a decision is made of (columns of velocity_statistics).
_DOT, _LATEST_SQ, _PREVIOUS_SQ, _DIFFERENCE_SQ = range(4)
# velocity_statistics works through the velocities in chunks of columns, sized so that its float32
# buffers (the chunk's copies when the dtype is not float32, and one product) never hold more than this
# share of one velocity's bytes; but never chunks smaller than _MIN_CHUNK columns (per-op overhead).
_TRANSIENT_SHARE = 0.75
_MIN_CHUNK = 1 << 12


@dataclass(frozen=True)
class StepRecord:
    """One scheduler step's decision.

    ``similarity`` is the cosine of the last two computed velocities *before* this step, where the
    rule computed it (None where it needed none). ``timestep`` is the step's time as the caller gave
    it (None when not given). ``estimated_error`` is the ``error_budget`` policy's accumulated
    estimate at this step (None for the other rules).
    """

    step: int
    ran: bool
    reason: str
    similarity: float | None = None
    timestep: float | None = None
    estimated_error: float | None = None


@dataclass(frozen=True)
class StepDecision:
    """The outcome of :func:`decide`: whether to run, why, and the decision state left afterwards."""

    run: bool
    reason: str
    skip_countdown: int
    similarity: float | None = None
    consecutive_skips: int = 0
    accumulated_error: float = 0.0
    estimated_error: float | None = None
    step: int | None = None  # filled in by StepCacheState.plan_step
    timestep: float | None = None


@dataclass(frozen=True)
class VelocitySignals:
    """What the adaptive rules read from the last two computed velocities.

    Attributes:
        similarity: batch-mean cosine similarity (the seed's signal), clamped to [-1, 1].
        relative_change: the largest per-sample ``||latest - previous|| / ||latest||``.
    """

    similarity: float
    relative_change: float


def velocity_statistics(latest: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-sample sums ``(B, 4)`` in float64: ``<a, b>``, ``<a, a>``, ``<b, b>``, ``<a - b, a - b>`` of
    the two velocities flattened per sample, products and chunk sums in float32.

    Sums add up across shards of the same samples, which is what makes decisions on sharded velocities
    exact: all-reduce them, then derive the signals. Chunked, so the transient float32 copies stay
    below the size of one velocity.
    """
    if latest.shape != previous.shape:
        raise ValueError(
            f"cannot compare velocities of different shapes {tuple(latest.shape)} and {tuple(previous.shape)}"
        )
    if latest.dim() < 2:
        raise ValueError(
            f"velocities need a leading batch dimension and at least one more, got shape {tuple(latest.shape)}"
        )
    a, b = latest.detach().flatten(1), previous.detach().flatten(1)
    stats = torch.zeros(a.shape[0], 4, dtype=torch.float64, device=a.device)
    width = a.shape[1]
    buffers_per_element = 4 * (1 + (2 if a.dtype != torch.float32 else 0))  # product (+ both copies), bytes
    chunk = max(_MIN_CHUNK, int(_TRANSIENT_SHARE * a.element_size() * width / buffers_per_element))
    for start in range(0, width, chunk):
        a_part = a[:, start : start + chunk].float()  # a view, for a float32 velocity
        b_part = b[:, start : start + chunk].float()
        # Each chunk is summed in float32 (a float64 sum would first copy the product to float64 on CUDA)
        # and the chunks' sums are added in float64.
        stats[:, _DOT] += (a_part * b_part).sum(1)
        stats[:, _LATEST_SQ] += (a_part * a_part).sum(1)
        stats[:, _PREVIOUS_SQ] += (b_part * b_part).sum(1)
    # |a - b|^2 from the same sums (float64; no difference buffer): exact enough for relative changes
    # down to ~1e-4, far below what any budget reads.
    stats[:, _DIFFERENCE_SQ] = (stats[:, _LATEST_SQ] + stats[:, _PREVIOUS_SQ] - 2 * stats[:, _DOT]).clamp_min(0)
    return stats


def signals_from_statistics(stats: torch.Tensor) -> VelocitySignals:
    """Derive the decision signals from (reduced) :func:`velocity_statistics`.

    The cosine follows ``torch.nn.functional.cosine_similarity`` (norm product clamped at 1e-8). A
    non-finite sum gives a non-finite signal, so the step runs.
    """
    stats = stats.detach().double().cpu()
    if stats.shape[0] == 0:
        raise ValueError("cannot decide on an empty batch: the velocities have batch size 0")
    norms = (stats[:, _LATEST_SQ] * stats[:, _PREVIOUS_SQ]).sqrt().clamp_min(1e-8)
    cosine = (stats[:, _DOT] / norms).mean()
    similarity = float(cosine.clamp(-1.0, 1.0)) if torch.isfinite(cosine) else float(cosine)
    change = stats[:, _DIFFERENCE_SQ].sqrt() / stats[:, _LATEST_SQ].sqrt().clamp_min(1e-12)
    finite = bool(torch.isfinite(stats).all())
    relative_change = float(change.max()) if finite else math.nan
    return VelocitySignals(similarity=similarity, relative_change=relative_change)


def velocity_signals(
    latest: torch.Tensor,
    previous: torch.Tensor,
    process_group: Any = None,
    *,
    batch_part: tuple[int, int] | None = None,
) -> VelocitySignals:
    """The signals of two velocities; with ``process_group``, of the velocities whose parts the ranks
    of the group hold (one ``all_reduce``, see :func:`reduce_statistics`)."""
    stats = velocity_statistics(latest, previous)
    if process_group is not None:
        stats = reduce_statistics(stats, process_group, batch_part=batch_part)
    return signals_from_statistics(stats)


def reduce_statistics(
    stats: torch.Tensor, process_group: Any, *, batch_part: tuple[int, int] | None = None
) -> torch.Tensor:
    """The :func:`velocity_statistics` of the whole velocity from each rank's part: one ``all_reduce``
    (sum) over ``process_group``, after which every rank holds the same tensor.

    Ranks that hold shards of the same samples (sequence parallelism) add up their partial sums. With
    ``batch_part=(index, count)``, this rank's samples are part ``index`` of ``count`` equal parts of
    the batch (e.g. one CFG branch per rank): its rows are placed at that part of a ``(count * B, 4)``
    tensor of zeros, so the same sum concatenates the parts (and adds up the shards within a part).
    A non-finite sum on any rank is non-finite on every rank, so every rank runs that step.
    """
    import torch.distributed as dist

    if batch_part is not None:
        index, count = batch_part
        rows = stats.shape[0]
        placed = stats.new_zeros(count * rows, stats.shape[1])
        placed[index * rows : (index + 1) * rows] = stats
        stats = placed
    stats = stats.to(_collective_device(process_group, stats.device))
    dist.all_reduce(stats, group=process_group)
    return stats


def _collective_device(process_group: Any, preferred: torch.device) -> torch.device:
    """A device the group's backend runs collectives on: NCCL only CUDA tensors, gloo CPU ones (CUDA
    only for some collectives); other backends get the tensor's own device."""
    import torch.distributed as dist

    backend = str(dist.get_backend(process_group)).lower()
    if backend == "nccl":
        return preferred if preferred.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return preferred


def velocity_similarity(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Batch-mean cosine similarity of two velocities, each flattened per sample, in float32.

    The result is clamped to [-1, 1] (rounding can push a cosine just past 1, which would let a
    threshold of 1.0 fire); NaN stays NaN.
    """
    return signals_from_statistics(velocity_statistics(current, previous)).similarity


def reuse_error_estimate(relative_change: float, t: float, t1: float, t2: float) -> float:
    """Estimated relative error of reusing the velocity computed at ``t1`` at time ``t``, when the one
    computed before it (at ``t2``) differed by ``relative_change``: a linear model of the velocity in
    time, ``relative_change * |t - t1| / |t1 - t2|``. Infinite when ``t1 == t2``."""
    gap = abs(t1 - t2)
    if gap == 0.0:
        return math.inf
    return relative_change * abs(t - t1) / gap


def extrapolation_coefficient(t: float, t1: float, t2: float, damping: float) -> float:
    """``c`` in ``v(t) = v1 + c (v1 - v2)``: the first-order extrapolation from ``(t2, v2)`` and
    ``(t1, v1)`` to ``t``, scaled by ``damping`` (0 when ``t1 == t2``).

    The linear guess is trusted at most one measured gap ahead (``|t - t1| <= |t1 - t2|``): beyond
    that, a difference measured over a short gap would be stretched over a long one (two close warm-up
    steps extrapolated across a long skip window diverge), so ``c`` is capped at ``damping``.
    """
    if t1 == t2:
        return 0.0
    ratio = (t - t1) / (t1 - t2)
    return damping * max(-1.0, min(1.0, ratio))


def extrapolate_prediction(latest: Sequence[Any], previous: Sequence[Any], coefficient: float) -> tuple[Any, ...]:
    """``latest + coefficient * (latest - previous)`` for every tensor element of two prediction tuples
    of the same structure; other elements (and tensors whose shapes differ) are taken from ``latest``."""
    out = []
    for new, old in zip(latest, previous):
        if (
            coefficient != 0.0
            and isinstance(new, torch.Tensor)
            and isinstance(old, torch.Tensor)
            and new.shape == old.shape
            and new.is_floating_point()
        ):
            out.append(torch.lerp(new, old, -coefficient))  # new + c * (new - old), one pass
        else:
            out.append(new)
    return tuple(out) + tuple(latest[len(out) :])


def decide(
    config: StepCacheConfig,
    skip_countdown: int,
    history_length: int,
    similarity: Callable[[], float],
    step: int = 0,
    *,
    num_steps: int | None = None,
    consecutive_skips: int = 0,
    accumulated_error: float = 0.0,
    reuse_error: Callable[[], float] | None = None,
    plan: frozenset[int] | None = None,
) -> StepDecision:
    """Apply the rule to step ``step`` (the module docstring gives the order).

    ``similarity`` and ``reuse_error`` (the ``error_budget`` policy's estimate for this step) are
    called only where the rule needs them. ``num_steps`` is needed only by ``final_steps``; ``plan``
    (the steps to compute) only by the ``planned`` policy.
    """
    if not config.enabled:
        return StepDecision(True, DISABLED, skip_countdown)
    if config.static_run_steps is not None:
        run = step in config.static_run_steps
        return StepDecision(run, STATIC, 0, consecutive_skips=0 if run else consecutive_skips + 1)
    if step < config.warmup_steps:
        return StepDecision(True, WARMUP, 0)
    if config.final_steps:
        if num_steps is None:
            raise RuntimeError(
                "step_cache_dit_final_steps needs the generation's step count: pass num_steps when the "
                "generation starts (StepCacheState.reset(num_steps), VelocityCache.generation(num_steps), "
                "or the backend's refresh(pipeline, num_inference_steps))"
            )
        if step >= num_steps - config.final_steps:
            return StepDecision(True, FINAL, 0)
    if history_length < config.min_history_steps and config.policy != PLANNED_POLICY:  # a plan reads no signal
        return StepDecision(True, WARMUP, 0)
    if config.max_skip_steps is not None and consecutive_skips >= config.max_skip_steps:
        return StepDecision(True, MAX_SKIPS, 0)
    skipped = consecutive_skips + 1
    if config.policy == PLANNED_POLICY:
        if plan is None:
            raise RuntimeError(
                "the planned policy needs the generation's step count and timesteps to plan its forwards: pass "
                "them when the generation starts (StepCacheState.reset(num_steps, timesteps=...), "
                "VelocityCache.generation(num_steps, timesteps=...)); the bundled pipeline and the diffusers "
                "hook pass them"
            )
        if step in plan:
            return StepDecision(True, PLANNED, 0)
        return StepDecision(False, PLANNED, 0, consecutive_skips=skipped)
    if config.policy == ERROR_BUDGET_POLICY:
        if reuse_error is None:
            raise ValueError("the error_budget policy needs reuse_error")
        sim = similarity()
        total = accumulated_error + reuse_error()
        if math.isfinite(total) and total <= config.error_budget:
            return StepDecision(False, WITHIN_BUDGET, 0, sim, skipped, total, total)
        return StepDecision(True, OVER_BUDGET if math.isfinite(total) else NON_FINITE, 0, sim, estimated_error=total)
    if skip_countdown > 1:
        return StepDecision(False, COUNTDOWN, skip_countdown - 1, consecutive_skips=skipped)
    if skip_countdown == 1:
        return StepDecision(True, REFRESH, 0)
    sim = similarity()
    for threshold, countdown in zip(config.sim_thresholds, config.skip_countdowns):
        if sim > threshold:
            return StepDecision(False, SIMILAR, countdown, sim, consecutive_skips=skipped)
    return StepDecision(True, DISSIMILAR if math.isfinite(sim) else NON_FINITE, 0, sim)


def simulate_schedule(
    config: StepCacheConfig,
    similarities: Sequence[float],
    *,
    reuse_errors: Sequence[float] | None = None,
) -> list[bool]:
    """Run decisions for ``len(similarities)`` steps where the signals seen at step ``i`` are
    ``similarities[i]`` (and ``reuse_errors[i]`` for the ``error_budget`` policy), used only where the
    rule asks for them. True = the step runs.

    Reproduces :meth:`StepCacheState.should_run_step` without tensors: history grows by one per run,
    capped at ``max_history``; the generation has ``len(similarities)`` steps.
    """
    runs: list[bool] = []
    countdown, history_length, skips, error = 0, 0, 0, 0.0
    num_steps = len(similarities)
    for step, sim in enumerate(similarities):
        decision = decide(
            config, countdown, history_length, lambda s=sim: s, step,
            num_steps=num_steps, consecutive_skips=skips, accumulated_error=error,
            reuse_error=None if reuse_errors is None else (lambda e=reuse_errors[step]: e),
        )
        countdown, skips, error = decision.skip_countdown, decision.consecutive_skips, decision.accumulated_error
        if decision.run:
            history_length = min(history_length + 1, config.max_history)
        runs.append(decision.run)
    return runs


def schedule_string(runs: Sequence[bool]) -> str:
    """``RR....R....R....`` style rendering: R = computed, . = reused."""
    return "".join("R" if ran else "." for ran in runs)


class TraceSummary:
    """Read-only views of a per-step decision ``trace`` (a sequence of :class:`StepRecord`)."""

    trace: Sequence[StepRecord]

    @property
    def num_steps(self) -> int:
        """Steps decided so far (every step of a finished generation)."""
        return len(self.trace)

    @property
    def computed_steps(self) -> int:
        return sum(record.ran for record in self.trace)

    @property
    def skipped_steps(self) -> int:
        return len(self.trace) - self.computed_steps

    @property
    def run_steps(self) -> list[int]:
        """Indices of the steps whose forward ran."""
        return [record.step for record in self.trace if record.ran]

    @property
    def similarities(self) -> list[float | None]:
        """Per step: the similarity the rule computed there, or None where it needed none."""
        return [record.similarity for record in self.trace]

    @property
    def schedule(self) -> str:
        """``RR....R....R....``: R = computed step, . = reused."""
        return schedule_string([record.ran for record in self.trace])

    def summary(self) -> str:
        """One line: computed/total steps, the schedule, and the similarity range seen."""
        seen = [s for s in self.similarities if s is not None and math.isfinite(s)]
        sims = f", similarity {min(seen):.4f}..{max(seen):.4f}" if seen else ""
        return (
            f"stepcache: {self.computed_steps}/{len(self.trace)} steps computed, {self.skipped_steps} skipped "
            f"[{self.schedule}]{sims}"
        )


def _check_history(prev_predictions: Sequence[Any]) -> None:
    if type(prev_predictions) is list and all(type(entry) is tuple and entry for entry in prev_predictions[-2:]):
        return  # the common case, without the abstract-class checks below (a decision's hot path)
    if isinstance(prev_predictions, torch.Tensor) or not isinstance(prev_predictions, Sequence):
        raise TypeError(
            f"the history must be a list of computed predictions (tuples whose [0] is the velocity), "
            f"got {type(prev_predictions).__name__}"
        )
    for entry in prev_predictions[-2:]:
        if isinstance(entry, torch.Tensor) or not isinstance(entry, (tuple, list)) or not entry:
            advice = " (wrap the velocity as (velocity,))" if isinstance(entry, torch.Tensor) else ""
            raise TypeError(
                f"history entries must be non-empty tuples whose [0] is the velocity, got {type(entry).__name__}"
                f"{advice}"
            )


def _velocity_of_entry(entry: Sequence[Any], which: str) -> torch.Tensor:
    velocity = entry[0]
    if not isinstance(velocity, torch.Tensor):
        raise TypeError(f"the {which} history entry's [0] must be the velocity tensor, got {type(velocity).__name__}")
    return velocity


def _as_time(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep is an empty tensor")
        return float(timestep.detach().max())
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    raise TypeError(f"timestep must be a number, a tensor or None, got {type(timestep).__name__}")


def config_fingerprint(config: StepCacheConfig) -> int:
    """A number that is equal on every process for equal configs (Python's ``hash`` of a string is
    salted per process, so it cannot be compared across ranks)."""
    return zlib.crc32(repr(config).encode())


# What the cross-rank check compares (StepCacheState(check_consistency=True)), in the order gathered.
_BEFORE = "state before the decision"
_DECISION = "decision"
_STATE_FIELDS = ("step", "history", "skip_countdown", "consecutive_skips", "config_crc32", "num_steps",
                 "accumulated_error_bits", "batch", "batch_parts")
_DECISION_FIELDS = ("run", "reason", "skip_countdown", "consecutive_skips")
# What every rank gathers at the start of each generation, with a process group (the first, whether the
# rank refused its own arguments, is reported apart).
_GENERATION_FIELDS = ("refused", "config", "step count", "timesteps", "check_consistency", "batch parts")


def _float_bits(value: float) -> int:
    """The IEEE-754 bits of a float as an int64: exact comparison across ranks."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _checked_batch_part(batch_part: Any, process_group: Any) -> tuple[int, int]:
    if process_group is None:
        raise ValueError("batch_part needs a process_group")
    try:
        index, count = (int(v) for v in batch_part)
    except (TypeError, ValueError):
        raise ValueError(f"batch_part must be (index, count), got {shown(batch_part)}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"batch_part must be (index, count) with 0 <= index < count, got {shown(batch_part)}")
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    if count > world:
        raise ValueError(f"batch_part {shown(batch_part)} has more parts than the group has ranks ({world})")
    return index, count


class StepCacheState(TraceSummary):
    """Per-generation mutable state: the decision state (countdown, skips, accumulated error) and a
    trace of every decision.

    Call :meth:`reset` before each generation (the backends' ``refresh`` does), then once per scheduler
    step either :meth:`should_run_step` (the seed's API: decide and record) or :meth:`plan_step` +
    :meth:`commit_step` (decide; record only once the forward succeeded, so a failed call leaves the
    state as it was).

    Args:
        config: the rule's settings (default: the seed's).
        process_group: a ``torch.distributed`` group whose ranks each hold a shard of the same
            velocities (sequence parallelism): the signals are reduced across it, so every rank takes
            the same decision. None (default): no collective, nothing imported.
        check_consistency: with a group, also all-gather each rank's decision state before and its
            decision after every step, and raise naming the step and the ranks that disagree (two
            small ``all_gather`` calls per step; meant for tests and debugging). Every rank of the
            group must pass the same value.
        batch_part: with a group whose ranks hold different samples, ``(index, count)``: this rank's
            velocity is part ``index`` of ``count`` equal parts of the batch (one CFG branch per rank:
            ``(branch, 2)``); ranks with the same index hold shards of the same samples. None (default):
            every rank holds a shard of every sample. See :func:`reduce_statistics`.

    Example:
        >>> state = StepCacheState(StepCacheConfig())
        >>> history = []
        >>> state.should_run_step(history)
        True
    """

    def __init__(
        self,
        config: StepCacheConfig | None = None,
        *,
        process_group: Any = None,
        check_consistency: bool = False,
        batch_part: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(config, (StepCacheConfig, DiffusionCacheConfig, Mapping, str, os.PathLike, type(None))):
            raise TypeError(
                f"StepCacheState needs a config (a StepCacheConfig, a DiffusionCacheConfig, a dict or JSON string "
                f"of its fields, a path to a saved config, a preset name, or None), got {type(config).__name__}"
            )
        config = as_step_cache_config(config)
        if check_consistency and process_group is None:
            raise ValueError("check_consistency needs a process_group")
        if batch_part is not None:
            batch_part = _checked_batch_part(batch_part, process_group)
        self.config = config
        self.process_group = process_group
        self.check_consistency = check_consistency
        self.batch_part = batch_part
        self.reset(_record=False)  # a state that never starts a generation records none

    # -- generation boundaries ---------------------------------------------------------------------

    def reset(
        self, num_steps: int | None = None, *, timesteps: Sequence[Any] | None = None, _record: bool = True
    ) -> None:
        """Start a new generation (of ``num_steps`` steps, when known): no countdown, empty trace.

        Args:
            num_steps: the generation's step count (needed by ``final_steps``; checked against a fixed
                schedule; a step past it is refused).
            timesteps: optional, the time of every step (sigma or timestep, any unit affine in sigma),
                ``num_steps`` values, or ``num_steps + 1`` with the time the last step goes to (0 when
                not given). Steps planned without a ``timestep`` take theirs from here; the
                ``error_budget`` policy reads each step's size from it.

        Raises:
            ValueError: the config cannot apply to ``num_steps`` steps (a fixed schedule past the end),
                or ``timesteps`` does not match ``num_steps``.
        """
        error: Exception | None = None
        schedule = None
        try:
            if num_steps is not None:
                self.config.check_num_steps(num_steps)
            if timesteps is not None:
                schedule = tuple(_as_time(t) for t in timesteps)
                if num_steps is None or len(schedule) not in (num_steps, num_steps + 1):
                    raise ValueError(
                        f"timesteps must hold num_steps ({num_steps}) or num_steps + 1 values, got {len(schedule)}"
                    )
                if len(schedule) == num_steps:
                    schedule = (*schedule, 0.0)
        except (TypeError, ValueError) as local_error:
            error = local_error
        if self.process_group is not None and _record:
            # Every generation start, always: a rank with another config or step count would otherwise
            # take other decisions, or wait in a collective its peers never join. Before the local
            # error is raised, so that the peers of a rank that refuses its arguments stop here too.
            self._check_generation_agrees(num_steps, schedule, failed=error is not None)
        if error is not None:
            raise error
        self._schedule = schedule
        self.generation_steps = num_steps
        self._plan = None
        if self.config.enabled and self.config.policy == PLANNED_POLICY and schedule is not None:
            forwards = planned_forwards(num_steps, self.config.forward_budget, self.config.forward_fraction)
            self._plan = frozenset(plan_schedule(schedule, forwards))
        self.skip_countdown = 0
        self.consecutive_skips = 0
        self.accumulated_error = 0.0
        self.trace: list[StepRecord] = []
        self._run_times: list[tuple[int, float | None]] = []  # (step, timestep) of each computed step
        self._signals_key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._signals: VelocitySignals | None = None
        self._warned_non_finite = False
        recording = active_recording() if _record else None
        self._recorded = None if recording is None else recording.start(num_steps, schedule)

    @property
    def step_index(self) -> int:
        """The index of the next step to decide."""
        return len(self.trace)

    @property
    def plan(self) -> tuple[int, ...] | None:
        """The ``planned`` policy's steps to compute in this generation (None for the other rules)."""
        return None if self._plan is None else tuple(sorted(self._plan))

    @property
    def finished(self) -> bool:
        """True once every step of a generation of known length has been decided."""
        return self.generation_steps is not None and len(self.trace) >= self.generation_steps

    # -- deciding ----------------------------------------------------------------------------------

    def plan_step(self, prev_predictions: Sequence[Sequence[Any]], *, timestep: Any = None) -> StepDecision:
        """Decide the next step without recording anything (see :meth:`commit_step`).

        Args:
            prev_predictions: the computed predictions so far (at least the last two), oldest first;
                element ``[0]`` of each is the (post-CFG, video) velocity, batch first.
            timestep: the step's time (sigma, or a timestep in any unit affine in sigma), used by the
                ``error_budget`` policy and extrapolation; without it, step indices stand in.
        """
        _check_history(prev_predictions)
        step = len(self.trace)
        if self.check_consistency:
            # First, before any collective whose presence depends on the config or the state, and before
            # a local error that would leave the other ranks waiting in their next collective.
            self._check_ranks_agree(step, _BEFORE, self._decision_state(prev_predictions),
                                    prev_predictions)
        if self.generation_steps is not None and step >= self.generation_steps:
            raise RuntimeError(
                f"this generation had {self.generation_steps} steps and all of them have been decided; call reset() "
                "(or open the next `with cache.generation(...)`) before the next generation"
            )
        t = self._time_of(step, timestep)
        d = self._decide(step, t, len(prev_predictions), lambda: self._signals_of(prev_predictions))
        decision = StepDecision(d.run, d.reason, d.skip_countdown, d.similarity, d.consecutive_skips,
                                d.accumulated_error, d.estimated_error, step, t)  # dataclasses.replace: 10x slower
        if self.check_consistency:
            self._check_ranks_agree(
                step, _DECISION,
                [int(decision.run), REASONS.index(decision.reason), decision.skip_countdown,
                 decision.consecutive_skips],
                prev_predictions,
            )
        return decision

    def _time_of(self, step: int, timestep: Any) -> float | None:
        t = _as_time(timestep)
        if t is None and self._schedule is not None:
            t = self._schedule[step]
        return t

    def _decide(self, step: int, t: float | None, history_length: int,
                signals: Callable[[], VelocitySignals]) -> StepDecision:
        """The rule at ``step`` with this state's counters; ``signals`` is called only where it reads them."""
        return decide(
            self.config,
            self.skip_countdown,
            history_length,
            lambda: signals().similarity,
            step,
            num_steps=self.generation_steps,
            consecutive_skips=self.consecutive_skips,
            accumulated_error=self.accumulated_error,
            reuse_error=lambda: reuse_error_estimate(signals().relative_change, *self._times(step, t))
            * self._step_share(step, t),
            plan=self._plan,
        )

    def _pending_pair(self, prev_predictions: Sequence[Sequence[Any]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The velocity pair whose signals the next decision reads and this state has not computed yet,
        or None (it reads none, already has them, or the history or config is for :meth:`plan_step` to
        refuse). Decides nothing and records nothing."""
        if self.process_group is not None or self.check_consistency or len(prev_predictions) < 2:
            return None
        key = self._signals_key
        if (self._signals is not None and key is not None and key[0] is prev_predictions[-1][0]
                and key[1] is prev_predictions[-2][0]):
            return None
        try:
            _check_history(prev_predictions)
            step = len(self.trace)
            if self.generation_steps is not None and step >= self.generation_steps:
                return None
            t = self._time_of(step, None)

            def needed() -> VelocitySignals:
                raise _SignalsNeeded

            self._decide(step, t, len(prev_predictions), needed)
        except _SignalsNeeded:
            latest = _velocity_of_entry(prev_predictions[-1], "latest")
            previous = _velocity_of_entry(prev_predictions[-2], "previous")
            key = self._signals_key
            if self._signals is not None and key is not None and key[0] is latest and key[1] is previous:
                return None
            if latest.shape != previous.shape or latest.dim() < 2:
                return None
            return latest, previous
        except Exception:  # plan_step raises it, with its own message
            return None
        return None

    def commit_step(self, decision: StepDecision) -> None:
        """Record a decision from :meth:`plan_step` (once its forward, if any, has succeeded)."""
        if decision.step != len(self.trace):
            raise RuntimeError(
                f"this decision was planned for step {decision.step}, but the state is at step {len(self.trace)}; "
                "plan again"
            )
        self.skip_countdown = decision.skip_countdown
        self.consecutive_skips = decision.consecutive_skips
        self.accumulated_error = decision.accumulated_error
        if decision.run:
            self._run_times.append((decision.step, decision.timestep))
            del self._run_times[: -self.config.max_history]
        self.trace.append(
            StepRecord(
                decision.step, decision.run, decision.reason, decision.similarity, decision.timestep,
                decision.estimated_error,
            )
        )
        if self._recorded is not None:
            self._recorded.steps.append(RecordedStep(decision.step, decision.run, decision.reason, decision.timestep))
        if decision.reason == NON_FINITE and not self._warned_non_finite:
            self._warned_non_finite = True
            logger.warning(
                "step %d: non-finite velocity signals (similarity %s, error estimate %s: NaN or infinite "
                "velocities); running every such step",
                decision.step,
                decision.similarity,
                decision.estimated_error,
            )

    def should_run_step(self, prev_predictions: Sequence[Sequence[Any]], *, timestep: Any = None) -> bool:
        """Return True when the DiT forward should execute at this scheduler step (decide and record).

        Args:
            prev_predictions: the computed predictions so far (at least the last two), oldest first;
                element ``[0]`` of each is the (post-CFG, video) velocity, batch first.
            timestep: optional, see :meth:`plan_step`.
        """
        decision = self.plan_step(prev_predictions, timestep=timestep)
        self.commit_step(decision)
        return decision.run

    def trim_history(self, prev_predictions: list[Any]) -> None:
        """Drop all but the last ``max_history`` computed predictions, in place."""
        excess = len(prev_predictions) - self.config.max_history
        if excess > 0:
            del prev_predictions[:excess]

    def push_computed(self, prev_predictions: list[Any], prediction: Sequence[Any], **extras: Any) -> None:
        """Append the prediction of the step just computed to the history and trim it (the seed's two
        calls), recording it when a :func:`~stepcache.recording.record_generations` block is open."""
        prev_predictions.append(tuple(prediction))
        self.trim_history(prev_predictions)
        if self._recorded is not None and self._recorded.steps and self._recorded.steps[-1].ran:
            record = self._recorded.steps[-1]
            record.prediction = detached_copy(tuple(prediction))
            record.extras.update(extras)

    def reuse_coefficient(self) -> float:
        """For the step just decided as skipped: ``c`` such that it answers with
        ``latest + c * (latest - previous)`` of the last two computed predictions; 0 means plain reuse
        (``reuse="cache"``, or fewer than two computed steps)."""
        if self.config.reuse != REUSE_EXTRAPOLATE or len(self._run_times) < 2 or not self.trace:
            return 0.0
        record = self.trace[-1]
        t, t1, t2 = self._times(record.step, record.timestep)
        return extrapolation_coefficient(t, t1, t2, self.config.extrapolation_damping)

    def reused_prediction(self, prev_predictions: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        """What the step just decided as skipped answers with: the last computed prediction, or (with
        ``reuse="extrapolate"`` and two computed predictions) its extrapolation to the step's time."""
        if not prev_predictions:
            raise RuntimeError("no computed prediction to reuse: the first step must run")
        latest = tuple(prev_predictions[-1])
        coefficient = self.reuse_coefficient() if len(prev_predictions) >= 2 else 0.0
        if coefficient == 0.0:
            return latest
        return extrapolate_prediction(latest, tuple(prev_predictions[-2]), coefficient)

    # -- signals -----------------------------------------------------------------------------------

    def _signals_of(self, prev_predictions: Sequence[Sequence[Any]]) -> VelocitySignals:
        """The last two computed velocities' signals; computed (and reduced) once per pair."""
        latest = _velocity_of_entry(prev_predictions[-1], "latest")
        previous = _velocity_of_entry(prev_predictions[-2], "previous")
        key = self._signals_key
        if self._signals is None or key is None or key[0] is not latest or key[1] is not previous:
            if self.batch_part is None:
                self._signals = velocity_signals(latest, previous, self.process_group)
            else:
                self._signals = velocity_signals(latest, previous, self.process_group, batch_part=self.batch_part)
            self._signals_key = (latest, previous)
        return self._signals

    def _times(self, step: int, timestep: float | None) -> tuple[float, float, float]:
        """``(t, t1, t2)``: the time of ``step`` and of the last two computed steps, in the caller's
        timesteps when all three are known, else in step indices. A history this state did not see
        being built is taken to come from the two steps before ``step``."""
        if len(self._run_times) < 2:
            return float(step), float(step - 1), float(step - 2)
        (s1, t1), (s2, t2) = self._run_times[-1], self._run_times[-2]
        if None in (timestep, t1, t2):
            return float(step), float(s1), float(s2)
        return timestep, t1, t2

    def _step_share(self, step: int, timestep: float | None) -> float:
        """The share of the whole path that step ``step`` integrates: its size over the span from the
        first step's time to the end (0). From the schedule when :meth:`reset` got one; else the
        previous step's size stands in for this one's (the last step's is its own time); without times,
        ``1 / num_steps``."""
        if self._schedule is not None:
            return abs(self._schedule[step] - self._schedule[step + 1]) / max(abs(self._schedule[0]), 1e-12)
        first = self.trace[0].timestep if self.trace else None
        previous = self.trace[step - 1].timestep if 0 < step <= len(self.trace) else None
        if None in (timestep, first, previous) or first == 0:
            return 1.0 / (self.generation_steps or 16)
        if self.generation_steps is not None and step == self.generation_steps - 1:
            return abs(timestep) / abs(first)
        return abs(previous - timestep) / abs(first)

    # -- ranks ---------------------------------------------------------------------------------------

    def _decision_state(self, prev_predictions: Sequence[Sequence[Any]]) -> list[int]:
        """What every rank must share before a decision (fixed length: all ranks gather the same size)."""
        latest = prev_predictions[-1][0] if prev_predictions else None
        batch = int(latest.shape[0]) if isinstance(latest, torch.Tensor) and latest.dim() > 0 else -1
        return [
            len(self.trace), len(prev_predictions), self.skip_countdown, self.consecutive_skips,
            config_fingerprint(self.config), -1 if self.generation_steps is None else self.generation_steps,
            _float_bits(self.accumulated_error), batch, 1 if self.batch_part is None else self.batch_part[1],
        ]

    def _check_generation_agrees(self, num_steps: int | None, schedule: tuple[float, ...] | None, *,
                                 failed: bool) -> None:
        """One ``all_gather`` of :data:`_GENERATION_FIELDS` (6 int64) at the start of a generation; raise
        on every rank, naming what differs and the ranks, when the ranks' values are not all equal."""
        import torch.distributed as dist

        mine = [
            int(failed), config_fingerprint(self.config), -1 if num_steps is None else int(num_steps),
            -1 if schedule is None else zlib.crc32(struct.pack(f"<{len(schedule)}d", *schedule)),
            int(self.check_consistency), 1 if self.batch_part is None else self.batch_part[1],
        ]
        device = _collective_device(self.process_group, torch.device("cpu"))
        tensor = torch.tensor(mine, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self.process_group))]
        dist.all_gather(gathered, tensor, group=self.process_group)
        rows = [tuple(int(v) for v in g.cpu()) for g in gathered]
        ranks = dist.get_process_group_ranks(self.process_group)  # global ranks, in group order
        refused = [rank for rank, row in zip(ranks, rows) if row[0]]
        if refused:
            if failed:
                return  # this rank raises its own error
            raise RuntimeError(
                f"StepCache: rank(s) {refused} refused the arguments of this generation (the error is raised "
                "there); every rank stops at the generation's start rather than wait for them in a collective"
            )
        if len(set(rows)) == 1:
            return
        differing = [
            f"{name} (" + ", ".join(f"rank {rank}: {row[i]}" for rank, row in zip(ranks, rows)) + ")"
            for i, name in enumerate(_GENERATION_FIELDS)
            if i and len({row[i] for row in rows}) > 1
        ]
        if len({row[1] for row in rows}) > 1:  # name the config fields (every rank is here: safe to gather)
            configs: list[Any] = [None] * len(ranks)
            dist.all_gather_object(configs, dataclasses.asdict(self.config), group=self.process_group)
            fields = [
                f"{key}: " + ", ".join(f"rank {rank}: {reprlib.repr(config[key])}" for rank, config in
                                       zip(ranks, configs))
                for key in configs[0] if len({repr(config[key]) for config in configs}) > 1
            ]
            differing.append("config fields " + "; ".join(fields))
        agreeing: dict[tuple[int, ...], list[int]] = {}
        for rank, row in zip(ranks, rows):
            agreeing.setdefault(row, []).append(rank)
        groups = " | ".join(str(group) for group in agreeing.values())
        raise RuntimeError(
            f"StepCache ranks disagree at the start of a generation; ranks that agree: {groups}; differing: "
            f"{'; '.join(differing)}. Every rank of the group must use the same config and start the same "
            "generations (the same step count and timesteps)"
        )

    def _check_ranks_agree(
        self, step: int, what: str, values: list[int], prev_predictions: Sequence[Sequence[Any]]
    ) -> None:
        import torch.distributed as dist

        latest = prev_predictions[-1][0] if prev_predictions else None
        hint = latest.device if isinstance(latest, torch.Tensor) else torch.device("cpu")
        mine = torch.tensor(values, dtype=torch.int64, device=_collective_device(self.process_group, hint))
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.process_group))]
        dist.all_gather(gathered, mine, group=self.process_group)
        rows = [tuple(int(v) for v in g.cpu()) for g in gathered]
        if len(set(rows)) > 1:
            ranks = dist.get_process_group_ranks(self.process_group)  # global ranks, in group order
            agreeing: dict[tuple[int, ...], list[int]] = {}
            for rank, row in zip(ranks, rows):
                agreeing.setdefault(row, []).append(rank)
            fields = _DECISION_FIELDS if what == _DECISION else _STATE_FIELDS
            differing = [
                f"{name} " + ", ".join(f"rank {rank}: {row[i]}" for rank, row in zip(ranks, rows))
                for i, name in enumerate(fields)
                if len({row[i] for row in rows}) > 1
            ]
            groups = " | ".join(str(group) for group in agreeing.values())
            raise RuntimeError(
                f"StepCache ranks disagree at step {step} ({what}); ranks that agree: {groups}; differing: "
                f"{'; '.join(differing)}. Every rank of the group must use the same config, start the same "
                "generations and decide the same steps"
            )

    def __repr__(self) -> str:
        return f"StepCacheState(skip_countdown={self.skip_countdown}, steps={len(self.trace)}, config={self.config})"


class _SignalsNeeded(Exception):
    """Raised by the probe of :meth:`StepCacheState._pending_pair` where the rule reads the signals."""


def prefetch_signals(states: Sequence[StepCacheState], histories: Sequence[Sequence[Sequence[Any]]]) -> int:
    """Compute, in one reduction and one device-to-host copy, the velocity signals that the next
    :meth:`~StepCacheState.plan_step` of each state will read, and leave them where it finds them.

    Decisions are unchanged: each state's ``plan_step(history)`` still decides one by one, with the
    same rule and the same signals (the per-sample sums of :func:`velocity_statistics`, taken over the
    velocities of all states side by side, are those of each pair alone). States that read no signal
    at their next step, already hold them, use a process group (their sums are reduced across ranks),
    or whose history :meth:`~StepCacheState.plan_step` will refuse, are left alone. Returns the number
    of states whose signals were computed.

    Example:
        >>> states = [StepCacheState(), StepCacheState()]
        >>> histories = [[], []]
        >>> prefetch_signals(states, histories)
        0
    """
    if len(states) != len(histories):
        raise ValueError(f"prefetch_signals needs one history per state, got {len(states)} states and "
                         f"{len(histories)} histories")
    pending: dict[tuple, list[tuple[StepCacheState, torch.Tensor, torch.Tensor]]] = {}
    for state, history in zip(states, histories):
        pair = state._pending_pair(history)
        if pair is not None:
            latest, previous = pair
            key = (latest[0].numel(), latest.dtype, latest.device)
            pending.setdefault(key, []).append((state, latest, previous))
    if not pending:
        return 0
    sums = []
    for members in pending.values():  # one reduction per layout (in serving: one)
        latest = torch.cat([velocity.detach().flatten(1) for _, velocity, _ in members])
        previous = torch.cat([velocity.detach().flatten(1) for _, _, velocity in members])
        sums.append(velocity_statistics(latest, previous))
    if len({part.device for part in sums}) == 1:  # the one device-to-host copy of the step
        host = torch.cat(sums).cpu().split([part.shape[0] for part in sums])
    else:
        host = [part.cpu() for part in sums]
    count = 0
    for members, stats in zip(pending.values(), host):
        start = 0
        for state, latest, previous in members:
            rows = latest.shape[0]
            state._signals = signals_from_statistics(stats[start : start + rows])
            state._signals_key = (latest, previous)
            start += rows
            count += 1
    return count


def plan_steps(states: Sequence[StepCacheState], histories: Sequence[Sequence[Sequence[Any]]]) -> list[StepDecision]:
    """``[state.plan_step(history) for ...]`` for several generations at once: their signals in one
    reduction (:func:`prefetch_signals`), the same decisions as one by one. Nothing is recorded (see
    :meth:`StepCacheState.commit_step`); the first state whose ``plan_step`` raises stops the call."""
    prefetch_signals(states, histories)
    return [state.plan_step(history) for state, history in zip(states, histories)]
