"""Drive the real decision rule with scripted similarities."""

from __future__ import annotations

from collections.abc import Sequence
from unittest import mock

import torch

from stepcache import StepCacheConfig, StepCacheState
from stepcache.state import VelocitySignals


def drive_state(
    config: StepCacheConfig,
    similarities: Sequence[float],
    relative_changes: Sequence[float] | None = None,
    *,
    num_steps: int | None = None,
) -> tuple[list[bool], StepCacheState]:
    """Run the real ``should_run_step`` for ``len(similarities)`` steps; the signals the rule computes at
    step i are ``similarities[i]`` (and ``relative_changes[i]``, default 0). Returns the run decisions
    and the state."""
    state = StepCacheState(config)
    state.reset(num_steps)
    history: list[tuple[torch.Tensor]] = []
    step = 0

    def scripted(latest, previous, process_group=None):  # replaces the tensor signals
        change = 0.0 if relative_changes is None else relative_changes[step]
        return VelocitySignals(similarity=similarities[step], relative_change=change)

    runs = []
    with mock.patch("stepcache.state.velocity_signals", scripted):
        for step in range(len(similarities)):  # noqa: B007 - read by `scripted`
            ran = state.should_run_step(history)
            if ran:
                history.append((torch.zeros(1, 1),))
                state.trim_history(history)
                assert len(history) <= config.max_history
            runs.append(ran)
    return runs, state
