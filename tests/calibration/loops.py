"""A hand-written Euler loop over a tiny deterministic velocity model: what calibrating one's own loop
looks like (``VelocityCache`` installed with the config calibration hands over)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from stepcache import StepCacheConfig, VelocityCache

STEPS = 12


def shifted_times(num_steps: int = STEPS, shift: float = 3.0) -> list[float]:
    """Flow-matching sigmas from 1 to 0 with a shift towards high noise (as Wan's schedulers use)."""
    sigmas = [1.0 - i / num_steps for i in range(num_steps + 1)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas]


class TinyVelocityModel(torch.nn.Module):
    """``v(x, t)``: a fixed random two-layer net of the sample and the time (batch first)."""

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.inner = torch.nn.Parameter(torch.randn(width + 1, 16, generator=generator) / 3.0, requires_grad=False)
        self.outer = torch.nn.Parameter(torch.randn(16, width, generator=generator) / 4.0, requires_grad=False)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        features = torch.cat([x, torch.full_like(x[:, :1], t)], dim=1)
        return torch.tanh(features @ self.inner) @ self.outer + x * (1.0 - t)


def euler_loop(velocity: Callable[[torch.Tensor, float, int], torch.Tensor], cache: VelocityCache | None,
               x: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Integrate from ``times[0]`` to ``times[-1]``; ``velocity(x, t, step)`` is the model call."""
    x = x.clone()
    steps = len(times) - 1
    if cache is None:
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            x = x + (t_next - t) * velocity(x, t, i)
        return x
    with cache.generation(steps):
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            v = cache.step(lambda x=x, t=t, i=i: velocity(x, t, i), timestep=t)
            x = x + (t_next - t) * v
    return x


def make_generate(model: torch.nn.Module | None = None, *, batch: int = 3, seed: int = 0,
                  times: list[float] | None = None, calls: list[object] | None = None):
    """``generate(config, input_seed=None)``: one generation of the hand-written loop with ``config``
    installed through ``VelocityCache``; ``calls`` (if given) collects every config it ran."""
    model = TinyVelocityModel() if model is None else model
    times = shifted_times() if times is None else times

    def generate(config, input_seed: int | None = None) -> torch.Tensor:
        if calls is not None:
            calls.append(config)
        generator = torch.Generator().manual_seed(seed if input_seed is None else input_seed)
        noise = torch.randn(batch, 8, generator=generator)
        cache = VelocityCache(StepCacheConfig.from_diffusion_cache_config(config))
        return euler_loop(lambda x, t, _i: model(x, t), cache, noise, times)

    return generate
