"""Record what StepCache saw during generations: every step's decision and computed prediction.

Calibration records one full-step generation per calibration input, then searches schedules offline
(:mod:`stepcache.calibration`). Recording works through every entry point (``VelocityCache``, the
bundled ``DreamZeroPipeline``, the diffusers hook) without touching them: while a
:func:`record_generations` block is open in a thread, every :class:`~stepcache.StepCacheState` that
starts a generation in that thread records it::

    with record_generations() as recording:
        pipe(**call_kwargs)                       # any pipeline with StepCache applied
    generation = recording.generations[0]
    generation.timesteps, generation.predictions  # per computed step: its time and its prediction

Predictions are kept as detached copies on their own device; a recording of a 16-step generation holds
16 predictions (plus whatever extras the integration adds, e.g. the diffusers hook's per-branch outputs).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RecordedStep:
    """One step of a recorded generation.

    Attributes:
        step: the step index.
        ran: whether the forward was computed.
        reason: why (a :class:`~stepcache.StepRecord` reason).
        timestep: the step's time as the integration passed it (None when it passed none).
        prediction: the computed prediction (a tuple whose ``[0]`` is the velocity the rule compares),
            None for a skipped step.
        extras: what an integration adds (the diffusers hook: ``{"branches": {name: output}}``).
    """

    step: int
    ran: bool
    reason: str
    timestep: float | None
    prediction: tuple[torch.Tensor, ...] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecordedGeneration:
    """The steps of one generation, in order, and the schedule it was started with (when known)."""

    num_steps: int | None
    schedule: tuple[float, ...] | None
    steps: list[RecordedStep] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every step decided and every computed step's prediction recorded."""
        done = self.num_steps is None or len(self.steps) == self.num_steps
        return done and all(s.prediction is not None for s in self.steps if s.ran)

    @property
    def timesteps(self) -> list[float | None]:
        return [s.timestep for s in self.steps]

    @property
    def velocities(self) -> list[torch.Tensor | None]:
        """Per step: the computed velocity (``prediction[0]``), None where the step was skipped."""
        return [None if s.prediction is None else s.prediction[0] for s in self.steps]


@dataclass
class Recording:
    """The generations recorded in one :func:`record_generations` block, in the order they started."""

    generations: list[RecordedGeneration] = field(default_factory=list)

    def start(self, num_steps: int | None, schedule: tuple[float, ...] | None) -> RecordedGeneration:
        generation = RecordedGeneration(num_steps, schedule)
        self.generations.append(generation)
        return generation


_active = threading.local()


def active_recording() -> Recording | None:
    """The recording open in this thread, if any."""
    return getattr(_active, "recording", None)


@contextlib.contextmanager
def record_generations() -> Iterator[Recording]:
    """Record every generation that starts in this thread inside the block (blocks may not nest)."""
    if active_recording() is not None:
        raise RuntimeError("a record_generations() block is already open in this thread")
    recording = Recording()
    _active.recording = recording
    try:
        yield recording
    finally:
        _active.recording = None


def detached_copy(prediction: tuple[Any, ...]) -> tuple[Any, ...]:
    """A copy of a prediction tuple that later in-place edits or buffer reuse cannot change."""
    return tuple(v.detach().clone() if isinstance(v, torch.Tensor) else v for v in prediction)
