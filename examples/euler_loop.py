"""StepCache on a plain flow-matching Euler loop, with an exact velocity model.

The "model" is the closed-form flow-matching velocity towards a small set of data points
(x_sigma = (1 - sigma) x0 + sigma noise, v = noise - x0), so the example needs no weights and the
cached run can be compared with the full one.

    python examples/euler_loop.py
"""

from __future__ import annotations

import torch

from stepcache import DiffusionCacheConfig, StepCacheConfig, VelocityCache

torch.manual_seed(0)
DATA = torch.randn(256, 8)  # the "training set": 256 points in 8 dimensions


def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact velocity E[noise - x0 | x_sigma] for data = DATA, noise ~ N(0, I)."""
    # log p(x_sigma | x0) for each data point, up to a constant
    logits = -((x[:, None, :] - (1 - sigma) * DATA[None]) ** 2).sum(-1) / (2 * sigma**2)
    x0 = torch.softmax(logits, dim=1) @ DATA
    return (x - x0) / sigma


def sample(cache: VelocityCache, steps: int = 16) -> torch.Tensor:
    # A shifted schedule, as flow-matching samplers use (shift 3: dense steps at high noise).
    s = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = (3 * s / (1 + 2 * s)).tolist()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with cache.generation(steps, timesteps=sigmas):  # one generation: its steps and their times
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = cache.step(lambda x=x, sigma=sigma: velocity(x, sigma), timestep=sigma)  # run or reuse
            x = x + (sigma_next - sigma) * v
    return x


if __name__ == "__main__":
    full = VelocityCache(StepCacheConfig(enabled=False))
    reference = sample(full)
    print(f"no cache : {full.state.computed_steps} forwards")
    for name, config in (
        ("seed defaults", StepCacheConfig()),  # thresholds (0.95, 0.93), countdowns (4, 2)
        ("preset balanced", StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig.preset("balanced"))),
    ):
        cache = VelocityCache(config)
        result = sample(cache)
        error = (result - reference).norm() / reference.norm()
        print(f"{name:15s}: {cache.state.summary()}; relative error {float(error):.2e}")
