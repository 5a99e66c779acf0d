"""Drive the real decision rule with scripted similarities."""

from __future__ import annotations

from collections.abc import Sequence
from unittest import mock

from stepcache import StepCacheConfig, StepCacheState


def drive_state(config: StepCacheConfig, similarities: Sequence[float]) -> tuple[list[bool], StepCacheState]:
    """Run the real ``should_run_step`` for ``len(similarities)`` steps; the similarity the rule
    computes at step i is ``similarities[i]``. Returns the run decisions and the state."""
    state = StepCacheState(config)
    history: list[tuple[object]] = []
    step = 0

    def scripted(current, previous):  # replaces the tensor cosine
        return similarities[step]

    runs = []
    with mock.patch("stepcache.state.velocity_similarity", scripted):
        for step in range(len(similarities)):  # noqa: B007 - read by `scripted`
            ran = state.should_run_step(history)
            if ran:
                history.append((object(),))
                state.trim_history(history)
                assert len(history) <= config.max_history
            runs.append(ran)
    return runs, state
