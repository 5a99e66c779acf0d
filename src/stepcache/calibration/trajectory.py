"""A recorded full-step generation, reduced to what the offline schedule search needs.

Every error the search estimates is a linear combination of the recorded step velocities
``v_0 .. v_{N-1}`` (the reused, extrapolated or interpolated velocity of a skipped step is one, and so
is the true one), so per sample the search needs only their inner products: a :class:`Trajectory`
keeps each step's time and the per-sample Gram matrix ``G[b, i, j] = <v_i - m, v_j - m>`` of the
velocities centred on their mean ``m`` over steps (every error combination has coefficients that sum
to zero, so centring changes no error and keeps the float64 sums free of cancellation), plus each
step's norm ``||v_i||`` for the scale. That is ``N x N`` numbers per sample whatever the latent's size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stepcache.recording import RecordedGeneration, RecordedStep

logger = logging.getLogger(__name__)

# Columns processed per chunk while building a Gram matrix (bounds the float64 copies).
_GRAM_CHUNK = 1 << 18


@dataclass(frozen=True)
class Trajectory:
    """One recorded generation: step times and per-sample inner products of the step velocities.

    Attributes:
        times: ``(N + 1,)`` float64: the time of every step and the time the last step goes to (0
            unless the integration said otherwise), in the integration's units (sigma or timestep).
        gram: ``(B, N, N)`` float64: per sample, the inner products of the centred step velocities.
        norms: ``(B, N)`` float64: per sample, ``||v_i||``.
    """

    times: torch.Tensor
    gram: torch.Tensor
    norms: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.gram.shape[-1])

    @property
    def scale(self) -> torch.Tensor:
        """Per sample, the length of the whole path at the mean speed: ``mean_i ||v_i|| * |t_0 - t_N|``.
        Errors are reported relative to it (a fraction of how far the sample travels)."""
        span = abs(float(self.times[0] - self.times[-1])) or 1.0
        return (self.norms.mean(dim=1) * span).clamp_min(1e-12)

    @classmethod
    def from_velocities(cls, velocities: Sequence[torch.Tensor], times: Sequence[float]) -> Trajectory:
        """From every step's velocity (batch first, same shape each) and the ``N`` or ``N + 1`` times."""
        if not velocities:
            raise ValueError("a trajectory needs at least one step velocity")
        n = len(velocities)
        times = [float(t) for t in times]
        if len(times) == n:
            times.append(0.0)
        if len(times) != n + 1:
            raise ValueError(f"expected {n} or {n + 1} times for {n} steps, got {len(times)}")
        shape = tuple(velocities[0].shape)
        if any(tuple(v.shape) != shape for v in velocities):
            shapes = [tuple(v.shape) for v in velocities]
            raise ValueError(f"every step velocity must have the same shape; got {shapes}")
        if len(shape) < 1 or shape[0] == 0:
            raise ValueError(f"velocities need a non-empty leading batch dimension, got shape {shape}")
        for step, v in enumerate(velocities):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"the velocity of step {step} is not finite (NaN or infinite elements)")
        batch = shape[0]
        flat = [v.detach().reshape(batch, -1) for v in velocities]
        width = flat[0].shape[1]
        gram = torch.zeros(batch, n, n, dtype=torch.float64)
        norms_sq = torch.zeros(batch, n, dtype=torch.float64)
        for start in range(0, width, _GRAM_CHUNK):
            part = torch.stack([f[:, start : start + _GRAM_CHUNK] for f in flat], dim=1).double()  # (B, N, C)
            norms_sq += (part * part).sum(-1).cpu()
            part = part - part.mean(dim=1, keepdim=True)
            gram += torch.einsum("bic,bjc->bij", part, part).cpu()
        if not bool(torch.isfinite(gram).all() and torch.isfinite(norms_sq).all()):
            raise ValueError("the step velocities are too large: their inner products overflow float64")
        return cls(torch.tensor(times, dtype=torch.float64), gram, norms_sq.sqrt())

    @classmethod
    def from_generation(cls, generation: RecordedGeneration, *, guidance_scale: float | None = None) -> Trajectory:
        """From a full-step recorded generation (every step computed).

        The velocity of a step is its prediction's element ``[0]``; where the diffusers hook recorded
        the branches ``cond`` and ``uncond`` and ``guidance_scale`` is given, the guided velocity
        ``uncond + guidance_scale * (cond - uncond)`` that the scheduler integrates.
        """
        if not generation.steps:
            raise ValueError("the recorded generation has no steps")
        missing = [s.step for s in generation.steps if not s.ran or s.prediction is None]
        if missing:
            raise ValueError(
                f"the recorded generation skipped or did not record steps {missing}; calibration records with a "
                "config that never skips"
            )
        if generation.num_steps is not None and len(generation.steps) != generation.num_steps:
            raise ValueError(
                f"the recorded generation has {len(generation.steps)} of its {generation.num_steps} steps; "
                "it did not finish"
            )
        velocities = [_step_velocity(step, guidance_scale) for step in generation.steps]
        return cls.from_velocities(velocities, _step_times(generation))


def _step_velocity(step: RecordedStep, guidance_scale: float | None) -> torch.Tensor:
    branches = step.extras.get("branches")
    if (
        guidance_scale is not None
        and isinstance(branches, dict)
        and set(branches) == {"cond", "uncond"}
        and branches["cond"].shape == branches["uncond"].shape
    ):
        cond, uncond = branches["cond"].double(), branches["uncond"].double()
        return uncond + guidance_scale * (cond - uncond)
    velocity = step.prediction[0]
    if not isinstance(velocity, torch.Tensor):
        raise ValueError(f"step {step.step}: the recorded prediction's element [0] is not a tensor")
    return velocity


def _step_times(generation: RecordedGeneration) -> list[float]:
    """The times of the steps and of the end: the generation's schedule, else each step's recorded
    timestep followed by 0, else (no times at all) step indices counting down to 0."""
    n = len(generation.steps)
    if generation.schedule is not None and len(generation.schedule) == n + 1:
        return [float(t) for t in generation.schedule]
    times = generation.timesteps
    if all(t is not None and math.isfinite(t) for t in times):
        return [float(t) for t in times] + [0.0]
    logger.warning("the recorded generation carries no step times; every step is taken to be equally long")
    return [float(n - i) for i in range(n + 1)]


def recorded_generations(recording: Any) -> list[RecordedGeneration]:
    """The generations of a recording that decided at least one step (a state that was created but
    never stepped leaves an empty one behind)."""
    return [g for g in recording.generations if g.steps]
