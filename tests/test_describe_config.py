"""The short config line every command prints and every log uses: what acts, in the user-facing names."""

from __future__ import annotations

import json
import logging

import pytest

from stepcache import DiffusionCacheConfig, StepCacheConfig
from stepcache.config import as_step_cache_config, describe_config


def _json_part(text: str) -> dict:
    return json.loads(text[text.index("{"):])


@pytest.mark.parametrize("value", [
    "seed", "fast", "balanced", "quality",
    {"velocity_sim_thresholds": [0.9], "velocity_skip_countdowns": [3], "step_cache_dit_warmup_steps": 2},
    {"step_cache_dit_policy": "error_budget", "velocity_error_budget": 0.1},
    {"step_cache_dit_static_steps": [0, 3, 7]},
    {"step_cache_dit_policy": "planned", "step_cache_dit_forward_budget": 5, "velocity_reuse": "extrapolate",
     "velocity_extrapolation_damping": 0.5},
])
def test_the_line_is_a_config_that_acts_the_same(value) -> None:
    text = describe_config(value)
    assert as_step_cache_config(_json_part(text)) == as_step_cache_config(value)
    assert "sim_thresholds=" not in text and len(text) < 250


def test_ignored_fields_are_left_out_and_presets_are_named() -> None:
    text = describe_config("balanced")
    assert text.startswith("preset balanced: ")
    assert "velocity_sim_thresholds" not in text and "step_cache_dit_policy\": \"planned" in text
    assert "step_cache_dit_forward_fraction\": 0.375" in text and "step_cache_dit_solver_aware\": true" in text
    seed = describe_config(StepCacheConfig())
    assert seed.startswith("preset seed: ") and "velocity_sim_thresholds\": [0.95, 0.93]" in seed
    assert "forward" not in seed
    assert "off" in describe_config(DiffusionCacheConfig(step_cache_dit_enabled=False))


def test_the_hook_logs_user_facing_names(caplog) -> None:
    import torch

    from stepcache.integrations.diffusers import disable_step_cache, enable_step_cache

    class Denoiser(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return hidden_states

    module = Denoiser()
    with caplog.at_level(logging.DEBUG, logger="stepcache"):
        enable_step_cache(module, {"velocity_sim_thresholds": [0.9], "velocity_skip_countdowns": [3]})
    disable_step_cache(module)
    logged = "\n".join(record.getMessage() for record in caplog.records if "enabled" in record.getMessage())
    assert '"velocity_sim_thresholds": [0.9]' in logged and "sim_thresholds=" not in logged
