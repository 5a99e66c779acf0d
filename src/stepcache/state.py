"""Mutable state for step-level DiT velocity caching: the decision rule and its per-step trace.

The rule (DreamZero's ``should_run_model``, as vLLM-Omni's ``step_cache`` ports it), evaluated once
per scheduler step, in this order:

1. disabled -> run;
2. fewer than ``min_history_steps`` computed velocities -> run;
3. a skip countdown above 1 -> decrement it, skip;
4. a countdown of exactly 1 -> clear it, run (every skip window ends with a forced refresh);
5. otherwise ``s`` = cosine of the last two computed velocities (per sample over ``flatten(1)``,
   float32, averaged over the batch); at the first ``s > sim_thresholds[i]`` set the countdown to
   ``skip_countdowns[i]`` and skip this step; no match -> run.

A countdown of ``c`` therefore gives ``c`` consecutive skips, then one run. A non-finite ``s``
fails every comparison, so the step runs. A config with ``static_run_steps`` replaces steps 2-5 with
a fixed schedule (run exactly at those step indices).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stepcache.config import StepCacheConfig

logger = logging.getLogger(__name__)

# Why a step ran or was skipped (StepRecord.reason).
DISABLED = "disabled"
WARMUP = "warmup"  # not enough computed velocities yet
COUNTDOWN = "countdown"  # skipped inside a skip window
REFRESH = "refresh"  # forced run that ends a skip window
SIMILAR = "similar"  # similarity above a threshold: skip window starts
DISSIMILAR = "dissimilar"  # similarity at or below every threshold
NON_FINITE = "non_finite"  # similarity NaN or infinite: run
STATIC = "static"  # decided by the config's fixed schedule (static_run_steps)


@dataclass(frozen=True)
class StepRecord:
    """One scheduler step's decision. ``similarity`` is None where the rule did not compute it."""

    step: int
    ran: bool
    reason: str
    similarity: float | None = None


@dataclass(frozen=True)
class StepDecision:
    """The outcome of :func:`decide`: whether to run, why, and the countdown left afterwards."""

    run: bool
    reason: str
    skip_countdown: int
    similarity: float | None = None


def velocity_similarity(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Batch-mean cosine similarity of two velocities, each flattened per sample, in float32.

    The result is clamped to [-1, 1] (rounding can push a cosine just past 1, which would let a
    threshold of 1.0 fire); NaN stays NaN.
    """
    if current.shape != previous.shape:
        raise ValueError(
            f"cannot compare velocities of different shapes {tuple(current.shape)} and {tuple(previous.shape)}"
        )
    if current.dim() < 2:
        raise ValueError(
            f"velocities need a leading batch dimension and at least one more, got shape {tuple(current.shape)}"
        )
    cosine = F.cosine_similarity(current.flatten(1).float(), previous.flatten(1).float(), dim=1)
    return float(cosine.mean().clamp(-1.0, 1.0))


def decide(
    config: StepCacheConfig,
    skip_countdown: int,
    history_length: int,
    similarity: Callable[[], float],
    step: int = 0,
) -> StepDecision:
    """Apply the rule to step ``step``. ``similarity`` is called only where the rule needs it."""
    if not config.enabled:
        return StepDecision(True, DISABLED, skip_countdown)
    if config.static_run_steps is not None:
        return StepDecision(step in config.static_run_steps, STATIC, 0)
    if history_length < config.min_history_steps:
        return StepDecision(True, WARMUP, skip_countdown)
    if skip_countdown > 1:
        return StepDecision(False, COUNTDOWN, skip_countdown - 1)
    if skip_countdown == 1:
        return StepDecision(True, REFRESH, 0)
    sim = similarity()
    for threshold, countdown in zip(config.sim_thresholds, config.skip_countdowns):
        if sim > threshold:
            return StepDecision(False, SIMILAR, countdown, sim)
    return StepDecision(True, DISSIMILAR if math.isfinite(sim) else NON_FINITE, 0, sim)


def simulate_schedule(config: StepCacheConfig, similarities: Sequence[float]) -> list[bool]:
    """Run decisions for ``len(similarities)`` steps where the similarity seen at step ``i`` is
    ``similarities[i]`` (used only where the rule asks for it). True = the step runs.

    Reproduces :meth:`StepCacheState.should_run_step` without tensors: history grows by one per run,
    capped at ``max_history``.
    """
    runs: list[bool] = []
    countdown, history_length = 0, 0
    for step, sim in enumerate(similarities):
        decision = decide(config, countdown, history_length, lambda s=sim: s, step)
        countdown = decision.skip_countdown
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
            f"stepcache: {self.computed_steps}/{self.num_steps} steps computed, {self.skipped_steps} skipped "
            f"[{self.schedule}]{sims}"
        )


class StepCacheState(TraceSummary):
    """Per-generation mutable state: the skip countdown and a trace of every decision.

    Call :meth:`reset` before each generation (the backends' ``refresh`` does), then
    :meth:`should_run_step` once per scheduler step with the history of computed predictions.

    Example:
        >>> state = StepCacheState(StepCacheConfig())
        >>> history = []
        >>> state.should_run_step(history)
        True
    """

    def __init__(self, config: StepCacheConfig | None = None) -> None:
        if config is None:
            config = StepCacheConfig()
        if not isinstance(config, StepCacheConfig):
            raise TypeError(
                f"StepCacheState needs a StepCacheConfig, got {type(config).__name__}; "
                "use StepCacheConfig.from_diffusion_cache_config() for a DiffusionCacheConfig"
            )
        self.config = config
        self.skip_countdown = 0
        self.trace: list[StepRecord] = []
        self._warned_non_finite = False

    def reset(self) -> None:
        """Start a new generation: no countdown, empty trace."""
        self.skip_countdown = 0
        self.trace = []
        self._warned_non_finite = False

    def should_run_step(self, prev_predictions: Sequence[Sequence[Any]]) -> bool:
        """Return True when the DiT forward should execute at this scheduler step.

        Args:
            prev_predictions: the computed predictions so far (at least the last two), oldest
                first; element ``[0]`` of each is the (post-CFG, video) velocity, batch first.
        """

        def similarity() -> float:
            return velocity_similarity(prev_predictions[-1][0], prev_predictions[-2][0])

        step = len(self.trace)
        decision = decide(self.config, self.skip_countdown, len(prev_predictions), similarity, step)
        self.skip_countdown = decision.skip_countdown
        self.trace.append(StepRecord(step, decision.run, decision.reason, decision.similarity))
        if decision.reason == NON_FINITE and not self._warned_non_finite:
            self._warned_non_finite = True
            logger.warning(
                "step %d: velocity similarity is %s (non-finite velocities?); running every such step",
                step,
                decision.similarity,
            )
        return decision.run

    def trim_history(self, prev_predictions: list[Any]) -> None:
        """Drop all but the last ``max_history`` computed predictions, in place."""
        excess = len(prev_predictions) - self.config.max_history
        if excess > 0:
            del prev_predictions[:excess]

    def __repr__(self) -> str:
        return f"StepCacheState(skip_countdown={self.skip_countdown}, steps={len(self.trace)}, config={self.config})"
