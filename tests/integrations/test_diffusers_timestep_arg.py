"""Denoisers whose timestep argument is not called `timestep`: the known names (`timesteps` as in HiDream,
`t` as in Z-Image) are found by themselves, any other is named with `apply_step_cache(..., timestep_arg=...)`.
The real HiDream and Z-Image pipelines are in test_diffusers_families.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats, remove_step_cache

SKIP_WHENEVER_ALLOWED = {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]}
SEED_RUNS = [0, 1, 6, 11]
STEPS = 16


class _Denoiser(ModelMixin, ConfigMixin):
    """velocity = x @ W + time / 1000; ``calls`` holds the time of every forward that really ran."""

    @register_to_config
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, generator=torch.Generator().manual_seed(0)))
        self.calls: list[float] = []

    def _velocity(self, hidden_states: torch.Tensor, time: torch.Tensor | None) -> tuple[torch.Tensor]:
        time = torch.zeros(1) if time is None else time
        self.calls.append(float(time.max()))
        return (hidden_states @ self.weight + time.reshape(-1, 1, 1) / 1000,)


class TimestepsDenoiser(_Denoiser):  # HiDream's name
    def forward(self, hidden_states, timesteps=None):
        return self._velocity(hidden_states, timesteps)


class TDenoiser(_Denoiser):  # Z-Image's name
    def forward(self, x, t, return_dict=False):
        return self._velocity(x, t)


class SigmaDenoiser(_Denoiser):  # a name StepCache does not know
    def forward(self, hidden_states, sigma):
        return self._velocity(hidden_states, sigma)


class KeywordOnlyTDenoiser(_Denoiser):
    def forward(self, hidden_states, *, t):
        return self._velocity(hidden_states, t)


class TimestepAndTDenoiser(_Denoiser):
    """Takes both names; the sampler's time is `t`, `timestep` is some other conditioning (None here)."""

    def forward(self, hidden_states, timestep=None, t=None):
        return self._velocity(hidden_states, t)


def _sample(model: torch.nn.Module, name: str, by_keyword: bool) -> torch.Tensor:
    """A 16-step Euler loop from t=1000 down, passing the time as `name` (by keyword or second position)."""
    model.calls.clear()
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    times = [1000.0 * (1 - i / STEPS) for i in range(STEPS)] + [0.0]
    for t, t_next in zip(times[:-1], times[1:]):
        time = torch.full((2,), t)
        velocity = (model(x, **{name: time}) if by_keyword else model(x, time))[0]
        x = x + (t_next - t) / 1000 * velocity
    return x


def _ran_at(model: _Denoiser) -> list[int]:
    """The steps whose forward really ran (the loop's times are 1000 * (1 - step / 16))."""
    return [round(STEPS * (1 - t / 1000)) for t in model.calls]


@pytest.mark.parametrize(
    ("model", "name", "by_keyword"),
    [
        (TimestepsDenoiser(), "timesteps", True),
        (TimestepsDenoiser(), "timesteps", False),
        (TDenoiser(), "t", True),
        (TDenoiser(), "t", False),
        (KeywordOnlyTDenoiser(), "t", True),
    ],
    ids=["timesteps-keyword", "timesteps-positional", "t-keyword", "t-positional", "t-keyword-only"],
)
def test_known_timestep_names_are_found(model: _Denoiser, name: str, by_keyword: bool) -> None:
    reference = _sample(model, name, by_keyword)
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    cached = _sample(model, name, by_keyword)
    assert _ran_at(model) == SEED_RUNS
    stats = get_step_cache_stats(model)
    assert len(stats.trace) == STEPS and stats.run_steps == SEED_RUNS
    remove_step_cache(model)
    assert torch.equal(_sample(model, name, by_keyword), reference)
    assert not torch.equal(cached, reference)


def test_another_name_is_refused_until_it_is_named() -> None:
    model = SigmaDenoiser()
    with pytest.raises(ValueError, match=r"has no `timestep` argument \(nor `timesteps` or `t`\).*timestep_arg="):
        apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED, timestep_arg="sigma")
    _sample(model, "sigma", by_keyword=False)
    assert _ran_at(model) == SEED_RUNS
    _sample(model, "sigma", by_keyword=True)
    assert _ran_at(model) == SEED_RUNS
    remove_step_cache(model)


def test_a_named_argument_wins_over_the_known_names() -> None:
    model = TimestepAndTDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)  # reads `timestep`, which this loop leaves None
    _sample(model, "t", by_keyword=True)
    assert len(model.calls) == STEPS  # calls without a usable timestep run untouched
    remove_step_cache(model)
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED, timestep_arg="t")
    _sample(model, "t", by_keyword=True)
    assert _ran_at(model) == SEED_RUNS
    remove_step_cache(model)


@pytest.mark.parametrize(
    ("timestep_arg", "match"),
    [
        ("sigmas", r"TDenoiser\) has no `sigmas` argument in its forward \(arguments: \['x', 't', 'return_dict'\]\)"),
        ("", "timestep_arg must be the name of an argument"),
        (3, "timestep_arg must be the name of an argument .* got 3"),
    ],
)
def test_a_bad_timestep_arg_is_refused(timestep_arg: object, match: str) -> None:
    model = TDenoiser()
    with pytest.raises(ValueError, match=match):
        apply_step_cache(model, SKIP_WHENEVER_ALLOWED, timestep_arg=timestep_arg)
    assert getattr(model, "_diffusers_hook", None) is None or not model._diffusers_hook.hooks
