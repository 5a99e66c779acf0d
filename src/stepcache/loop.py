"""StepCache for hand-written denoise loops, in two lines.

:class:`VelocityCache` owns the history of computed predictions and asks the core's
:class:`~stepcache.StepCacheState` once per step, so the decisions are exactly the rule's::

    cache = VelocityCache()                                  # StepCacheConfig() defaults
    with cache.generation(num_steps=len(ts) - 1):            # one generation: its steps, then closed
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = cache.step(lambda: model(x, t), timestep=t)  # runs the model, or reuses a velocity
            x = x + (t_next - t) * v                         # the sampler steps either way

Generation boundaries are explicit: ``generation()`` (or ``reset()``) starts one, and a step that
cannot belong to the open generation is an error rather than a silent reuse of another generation's
velocities (past its known step count, after the ``with`` block, a timestep that does not continue
the generation's direction, or a fixed schedule whose step count is unknown). A model that returns its
output in the storage of a cached prediction (one reused buffer) is an error that asks for
``clone_outputs=True``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from stepcache.config import REUSE_CACHED, StepCacheConfig, shown
from stepcache.state import StepCacheState, _as_time

logger = logging.getLogger(__name__)

Prediction = TypeVar("Prediction")

# Where the cache stands between generations.
_FRESH = "fresh"  # constructed, no step yet: the first step opens a generation implicitly
_OPEN = "open"
_CLOSED = "closed"  # a `with generation()` block ended: the next generation must be opened explicitly


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _as_entry(prediction: Any) -> tuple[Any, ...]:
    """The history entry of a computed prediction; a model output the rule cannot read is an error now,
    not an AttributeError one step later."""
    entry = tuple(prediction) if isinstance(prediction, (tuple, list)) else (prediction,)
    if not entry or not isinstance(entry[0], torch.Tensor):
        got = type(entry[0]).__name__ if entry else "an empty sequence"
        raise TypeError(
            f"the model callable returned {type(prediction).__name__} (first element: {got}); VelocityCache needs "
            "a torch.Tensor velocity, or a tuple/list whose first element is one"
        )
    if entry[0].dim() < 2 or entry[0].shape[0] == 0:
        raise ValueError(
            f"the velocity must have a non-empty leading batch dimension and at least one more, got shape "
            f"{tuple(entry[0].shape)}"
        )
    return entry


def _rebuild(prediction: Any, entry: tuple[Any, ...]) -> Any:
    """``entry`` in the structure the model returned (a tensor, a tuple or a list)."""
    if isinstance(prediction, torch.Tensor):
        return entry[0]
    return list(entry) if isinstance(prediction, list) else entry


class VelocityCache:
    """Decides per step whether to call the model, and returns the reused prediction when not.

    A prediction is a velocity tensor, or a tuple/list whose element ``[0]`` is the velocity the
    decision compares (e.g. ``(video_velocity, action_velocity)``); on a skipped step the whole last
    computed prediction (or its extrapolation, with ``reuse="extrapolate"``) is returned.

    Args:
        config: the rule's settings: a ``StepCacheConfig``, or anything
            :func:`~stepcache.as_diffusion_cache_config` accepts (a ``DiffusionCacheConfig``, a dict or
            JSON string of its fields, a saved config's path, a preset name); None: the seed's.
        clone_outputs: copy each computed prediction before caching it. Needed when the model
            returns buffers that its next call overwrites (compiled / CUDA-graph models).
        process_group: a ``torch.distributed`` group across which the velocity is sharded (see
            :class:`~stepcache.StepCacheState`); None: single process.
        check_consistency: with a group, check every decision across ranks (tests, debugging).

    Example:
        >>> cache = VelocityCache()
        >>> with cache.generation(num_steps=1):
        ...     v = cache.step(lambda: torch.ones(1, 4))
        >>> cache.ran_last_step, cache.state.computed_steps
        (True, 1)
    """

    def __init__(
        self,
        config: Any = None,
        *,
        clone_outputs: bool = False,
        process_group: Any = None,
        check_consistency: bool = False,
    ) -> None:
        self.state = StepCacheState(config, process_group=process_group, check_consistency=check_consistency)
        self.clone_outputs = clone_outputs
        self.history: list[tuple[Any, ...]] = []
        self._last_prediction: Any = None
        self.ran_last_step = False
        self._phase = _FRESH
        self._direction = 0.0  # sign of the timestep's change within the generation; 0 before it moved
        self._warned_unbounded = False

    @property
    def config(self) -> StepCacheConfig:
        return self.state.config

    def reset(self, num_steps: int | None = None, *, timesteps: Any = None) -> None:
        """Start a new generation (of ``num_steps`` steps, when known): forget the history and the
        countdown. With ``num_steps``, a step past the end is an error, so a missing ``reset()`` before
        the next generation cannot go unnoticed. ``timesteps``: every step's time (``num_steps`` values,
        or ``num_steps + 1`` with the end), which the ``planned`` policy needs and the ``error_budget``
        policy uses (see :meth:`StepCacheState.reset`)."""
        self.state.reset(num_steps, timesteps=None if timesteps is None else list(timesteps))
        self.history.clear()
        self._last_prediction = None
        self.ran_last_step = False
        self._direction = 0.0
        self._phase = _OPEN

    @contextlib.contextmanager
    def generation(self, num_steps: int | None = None, *, timesteps: Any = None) -> Iterator[VelocityCache]:
        """``with cache.generation(num_steps):`` one generation (see :meth:`reset` for the arguments);
        steps after the block are an error until the next one starts. The cached tensors are dropped
        when the block ends, also when it ends with an exception."""
        self.reset(num_steps, timesteps=timesteps)
        try:
            yield self
        finally:
            self.history.clear()
            self._last_prediction = None
            self._phase = _CLOSED

    def step(self, compute: Callable[[], Prediction], *, timestep: Any = None) -> Prediction:
        """One scheduler step: ``compute()`` when the rule says run, else the reused prediction.

        Args:
            compute: runs the model; called at most once. If it raises, the cache is left exactly as
                before the call (nothing counted, nothing recorded), so the step can be retried.
            timestep: the step's time (sigma or timestep, any unit affine in sigma). Optional: the
                ``error_budget`` policy and extrapolation use it (step indices stand in otherwise), and
                a timestep that does not continue the generation's direction is refused.
        """
        self._enter_step(_as_time(timestep))
        decision = self.state.plan_step(self.history, timestep=timestep)
        if not decision.run:
            self.state.commit_step(decision)
            self.ran_last_step = False
            if self.config.reuse == REUSE_CACHED:
                return self._last_prediction
            return _rebuild(self._last_prediction, self.state.reused_prediction(self.history))
        prediction = compute()
        entry = _as_entry(prediction)
        if self.clone_outputs:
            entry = _clone(entry)
            prediction = _rebuild(prediction, entry)
        elif not self.config.never_skips:  # a config that never reuses is not hurt by a reused buffer
            self._check_fresh_storage(entry)
        self.state.commit_step(decision)
        self.state.push_computed(self.history, entry)
        self._last_prediction = prediction
        self.ran_last_step = True
        return prediction

    def _check_fresh_storage(self, entry: tuple[Any, ...]) -> None:
        """A model that writes every output into one buffer (compiled / CUDA-graph models) would make
        the cached velocity the new one: every similarity 1.0, every skip reusing the latest output.
        Comparing storage addresses with the history costs nothing and catches it before it is cached."""
        cached = {
            t.untyped_storage().data_ptr()
            for old in self.history for t in old
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != 0
        }
        for i, tensor in enumerate(entry):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in cached:
                raise RuntimeError(
                    f"step {self.state.step_index}: the model returned element [{i}] in the same storage as an "
                    "earlier step's cached prediction (it reuses its output buffer); the cache would compare and "
                    "reuse overwritten values. Pass VelocityCache(..., clone_outputs=True), or return a new "
                    "tensor each call"
                )

    def _enter_step(self, t: float | None) -> None:
        """Check that this step can belong to the open generation (see the module docstring)."""
        if self._phase == _CLOSED:
            raise RuntimeError(
                "VelocityCache.step() called after its `with cache.generation(...)` block ended; open the next "
                "generation with `with cache.generation(num_steps):` (or cache.reset(num_steps))"
            )
        if self._phase == _FRESH:
            self._phase = _OPEN
        if self.state.finished:
            raise RuntimeError(
                f"the generation of {self.state.generation_steps} steps is complete; start the next one with "
                "cache.reset(num_steps) or `with cache.generation(num_steps):` (without it, the next generation "
                "would reuse this one's velocities)"
            )
        previous = self.state.trace[-1].timestep if self.state.trace else None
        if t is not None and previous is not None:
            moved = t - previous
            if moved == 0 or (self._direction and (moved > 0) != (self._direction > 0)):
                raise RuntimeError(
                    f"step {self.state.step_index} has timestep {t:g} after {previous:g}, which does not continue "
                    "this generation; a new generation? call cache.reset(num_steps) (or use "
                    "`with cache.generation(num_steps):`) first"
                )
            self._direction = moved
        if t is None and self.state.generation_steps is None and self.config.enabled and (
            self.config.static_run_steps is not None
        ):
            # A fixed schedule past its last run step skips every step: a second generation driven on
            # without reset() would compute nothing and return the first one's velocities.
            raise RuntimeError(
                f"a fixed schedule (static_run_steps {shown(list(self.config.static_run_steps))}) needs the "
                "generation's step count: use `with cache.generation(num_steps):` or cache.reset(num_steps), or "
                "pass timestep= to every step()"
            )
        if (
            t is None
            and self.state.generation_steps is None
            and not self.state.trace
            and not self._warned_unbounded
        ):
            self._warned_unbounded = True
            logger.warning(
                "VelocityCache does not know where this generation ends: pass num_steps to "
                "cache.generation()/reset(), or timestep= to step(), so that a missing reset() is an error "
                "instead of a silent reuse of the previous generation's velocities"
            )
