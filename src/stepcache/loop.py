"""StepCache for hand-written denoise loops, in two lines.

:class:`VelocityCache` owns the history of computed predictions and asks
:meth:`StepCacheState.should_run_step` once per step, so the decisions are exactly the rule's::

    cache = VelocityCache()                       # StepCacheConfig() defaults
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = cache.step(lambda: model(x, t))       # runs the model, or reuses the last velocity
        x = x + (t_next - t) * v                  # the sampler steps either way
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from stepcache.config import StepCacheConfig
from stepcache.state import StepCacheState

Prediction = TypeVar("Prediction")


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class VelocityCache:
    """Decides per step whether to call the model, and returns the cached prediction when not.

    A prediction is a velocity tensor, or a tuple/list whose element ``[0]`` is the velocity the
    decision compares (e.g. ``(video_velocity, action_velocity)``); on a skipped step the whole
    last computed prediction is returned.

    Args:
        config: the rule's settings (defaults: the seed's).
        clone_outputs: copy each computed prediction before caching it. Needed when the model
            returns buffers that its next call overwrites (compiled / CUDA-graph models).

    Example:
        >>> cache = VelocityCache()
        >>> v = cache.step(lambda: torch.ones(1, 4))
        >>> cache.ran_last_step, cache.state.computed_steps
        (True, 1)
    """

    def __init__(self, config: StepCacheConfig | None = None, *, clone_outputs: bool = False) -> None:
        self.state = StepCacheState(config)
        self.clone_outputs = clone_outputs
        self.history: list[tuple[Any, ...]] = []
        self._last_prediction: Any = None
        self.ran_last_step = False

    @property
    def config(self) -> StepCacheConfig:
        return self.state.config

    def reset(self) -> None:
        """Start a new generation: forget the history and the countdown."""
        self.state.reset()
        self.history.clear()
        self._last_prediction = None
        self.ran_last_step = False

    def step(self, compute: Callable[[], Prediction]) -> Prediction:
        """One scheduler step: ``compute()`` when the rule says run, else the cached prediction."""
        self.ran_last_step = self.state.should_run_step(self.history)
        if not self.ran_last_step:
            return self._last_prediction
        prediction = compute()
        if self.clone_outputs:
            prediction = _clone(prediction)
        entry = tuple(prediction) if isinstance(prediction, (tuple, list)) else (prediction,)
        self.history.append(entry)
        self.state.trim_history(self.history)
        self._last_prediction = prediction
        return prediction
