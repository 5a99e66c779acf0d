"""What ``enable_step_cache`` does with no config, and with config fields given as keywords."""

from __future__ import annotations

import pytest
import torch

from stepcache import DiffusionCacheConfig, StepCacheConfig
from stepcache.config import RECOMMENDED_PRESET
from stepcache.integrations.diffusers import disable_step_cache, enable_step_cache, get_step_cache_stats
from tests.integrations.tiny_pipelines import flux

STEPS = 16


def _psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (output.double() - reference.double()).pow(2).mean()
    return float(10 * torch.log10(reference.double().abs().max() ** 2 / mse))


@pytest.fixture(scope="module")
def tiny_flux():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        case = flux(true_cfg=False)
        yield case, case.generate(STEPS)
    finally:
        torch.set_num_threads(threads)


def test_the_default_beats_fewer_steps_at_its_forwards(tiny_flux) -> None:
    case, reference = tiny_flux
    enable_step_cache(case.pipe)
    try:
        cached = case.generate(STEPS)
        forwards = len(case.forwards)
        hooked_config = get_step_cache_stats(case.pipe)
    finally:
        disable_step_cache(case.pipe)
    assert forwards < STEPS
    fewer_steps = case.generate(forwards)
    assert len(case.forwards) == forwards
    assert _psnr(cached, reference) > _psnr(fewer_steps, reference) + 3.0
    assert hooked_config.num_steps == STEPS


def test_no_config_on_a_pipeline_is_the_recommended_preset(tiny_flux) -> None:
    case, _ = tiny_flux
    enable_step_cache(case.pipe)
    try:  # the same config again is a no-op; the seed's would be "another config"
        enable_step_cache(case.pipe, RECOMMENDED_PRESET)
        with pytest.raises(ValueError, match="another config"):
            enable_step_cache(case.pipe, "seed")
    finally:
        disable_step_cache(case.pipe)


def test_config_fields_as_keywords(tiny_flux) -> None:
    case, _ = tiny_flux
    enable_step_cache(case.pipe, policy="planned", step_cache_dit_forward_budget=5)
    try:
        case.generate(STEPS)
        assert len(case.forwards) == 5
    finally:
        disable_step_cache(case.pipe)
    # Keywords override a given config's fields.
    enable_step_cache(case.pipe, "balanced", forward_fraction=0.25)
    try:
        case.generate(STEPS)
        assert len(case.forwards) == 4
    finally:
        disable_step_cache(case.pipe)
    with pytest.raises(TypeError, match="unexpected keyword argument 'polcy'"):
        enable_step_cache(case.pipe, polcy="planned")
    with pytest.raises(TypeError, match="twice"):
        enable_step_cache(case.pipe, policy="planned", step_cache_dit_policy="planned")
    with pytest.raises(ValueError, match="step_cache_dit_forward_budget"):
        enable_step_cache(case.pipe, policy="planned", forward_budget=0)


def test_the_seed_api_keeps_the_seed_defaults() -> None:
    assert DiffusionCacheConfig().velocity_sim_thresholds == [0.95, 0.93]
    assert DiffusionCacheConfig().step_cache_dit_policy == "similarity"
    assert StepCacheConfig().policy == "similarity" and StepCacheConfig().skip_countdowns == (4, 2)
