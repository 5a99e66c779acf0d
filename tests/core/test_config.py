"""Config defaults, translation and every validation error."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from stepcache import DiffusionCacheConfig, StepCacheConfig, as_diffusion_cache_config


def test_defaults_are_the_seeds():
    config = StepCacheConfig()
    assert (config.enabled, config.min_history_steps, config.max_history) == (True, 2, 2)
    assert config.sim_thresholds == (0.95, 0.93) and config.skip_countdowns == (4, 2)
    user = DiffusionCacheConfig()
    assert user.step_cache_dit_enabled is True
    assert user.velocity_sim_thresholds == [0.95, 0.93] and user.velocity_skip_countdowns == [4, 2]
    assert (user.step_cache_dit_min_history, user.step_cache_dit_max_history) == (2, 2)
    assert StepCacheConfig.from_diffusion_cache_config(user) == config


def test_runtime_config_is_frozen_and_normalised():
    config = StepCacheConfig(sim_thresholds=[0.9, 0.8], skip_countdowns=[3, 1])
    assert config.sim_thresholds == (0.9, 0.8) and config.skip_countdowns == (3, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enabled = False
    assert hash(config) == hash(StepCacheConfig(sim_thresholds=(0.9, 0.8), skip_countdowns=(3, 1)))


def test_translation_both_ways():
    user = DiffusionCacheConfig(
        step_cache_dit_enabled=False,
        velocity_sim_thresholds=[0.99],
        velocity_skip_countdowns=[3],
        step_cache_dit_min_history=3,
        step_cache_dit_max_history=5,
    )
    runtime = StepCacheConfig.from_diffusion_cache_config(user)
    assert runtime == StepCacheConfig(False, 3, 5, (0.99,), (3,))
    assert runtime.to_diffusion_cache_config() == user
    with pytest.raises(TypeError, match="DiffusionCacheConfig"):
        StepCacheConfig.from_diffusion_cache_config({"velocity_sim_thresholds": [0.9]})


def test_from_dict_accepts_dict_json_and_none():
    assert DiffusionCacheConfig.from_dict(None) == DiffusionCacheConfig()
    with pytest.raises(ValueError, match="empty string"):  # what "$(cat missing.json)" gives
        DiffusionCacheConfig.from_dict("")
    d = {"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [2]}
    assert DiffusionCacheConfig.from_dict(d) == DiffusionCacheConfig.from_dict(json.dumps(d))
    assert DiffusionCacheConfig.from_dict(d).velocity_sim_thresholds == [0.97]
    assert DiffusionCacheConfig.from_dict(DiffusionCacheConfig().to_dict()) == DiffusionCacheConfig()


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        DiffusionCacheConfig.from_dict({"velocity_sim_threshold": [0.9]})
    message = str(err.value)
    assert "velocity_sim_threshold'" in message
    for valid in DiffusionCacheConfig.field_names():
        assert valid in message


@pytest.mark.parametrize("bad", ["{not json", "[0.9]", 7])
def test_from_dict_rejects_what_is_not_a_mapping(bad):
    with pytest.raises(ValueError, match="cache config"):
        DiffusionCacheConfig.from_dict(bad)


def test_as_diffusion_cache_config_accepts_every_form():
    user = DiffusionCacheConfig(velocity_sim_thresholds=[0.9], velocity_skip_countdowns=[1])
    assert as_diffusion_cache_config(user) is user
    assert as_diffusion_cache_config(StepCacheConfig()) == DiffusionCacheConfig()
    assert as_diffusion_cache_config(None) == DiffusionCacheConfig()
    assert as_diffusion_cache_config('{"step_cache_dit_enabled": false}').step_cache_dit_enabled is False


# (kwargs for StepCacheConfig, the same for DiffusionCacheConfig, words the message must contain)
INVALID = [
    (
        {"sim_thresholds": (0.9, 0.8), "skip_countdowns": (2,)},
        {"velocity_sim_thresholds": [0.9, 0.8], "velocity_skip_countdowns": [2]},
        ["must have the same length; got 2 and 1.", "[0.9, 0.8]", "[2]"],
    ),
    ({"sim_thresholds": (math.nan,), "skip_countdowns": (2,)}, None, ["(-1, 1]", "nan"]),
    ({"sim_thresholds": (1.5,), "skip_countdowns": (2,)}, None, ["(-1, 1]", "1.5"]),
    ({"sim_thresholds": (-1.0,), "skip_countdowns": (2,)}, None, ["(-1, 1]", "-1.0"]),
    ({"sim_thresholds": ("0.9",), "skip_countdowns": (2,)}, None, ["number", "'0.9'"]),
    ({"sim_thresholds": (0.9, 0.95), "skip_countdowns": (2, 4)}, None, ["strictly descending", "[0.9, 0.95]"]),
    ({"sim_thresholds": (0.9, 0.9), "skip_countdowns": (2, 4)}, None, ["strictly descending"]),
    ({"sim_thresholds": (0.9,), "skip_countdowns": (0,)}, None, [">= 1", "got 0"]),
    ({"sim_thresholds": (0.9,), "skip_countdowns": (1.5,)}, None, [">= 1", "1.5"]),
    ({"sim_thresholds": (0.9,), "skip_countdowns": (True,)}, None, [">= 1", "True"]),
    ({"sim_thresholds": 0.9, "skip_countdowns": (1,)}, None, ["list or tuple", "0.9"]),
    ({"min_history_steps": 1}, {"step_cache_dit_min_history": 1}, [">= 2", "got 1"]),
    ({"min_history_steps": 3, "max_history": 2}, {"step_cache_dit_min_history": 3, "step_cache_dit_max_history": 2},
     [">=", "(3)", "got 2"]),
    ({"enabled": "yes"}, {"step_cache_dit_enabled": "yes"}, ["True or False", "'yes'"]),
]

RUNTIME_TO_USER = {
    "enabled": "step_cache_dit_enabled",
    "min_history_steps": "step_cache_dit_min_history",
    "max_history": "step_cache_dit_max_history",
    "sim_thresholds": "velocity_sim_thresholds",
    "skip_countdowns": "velocity_skip_countdowns",
}


@pytest.mark.parametrize(("kwargs", "user_kwargs", "words"), INVALID)
def test_invalid_configs_fail_naming_field_value_and_rule(kwargs, user_kwargs, words):
    with pytest.raises(ValueError) as err:
        StepCacheConfig(**kwargs)
    message = str(err.value)
    assert any(field in message for field in kwargs), message
    for word in words:
        assert word in message, (word, message)

    # the user-facing config holds the values unchecked, as vLLM-Omni's does, and fails the same way
    # where vLLM-Omni checks: when it is translated (at enable), in its own field names
    user_kwargs = user_kwargs or {RUNTIME_TO_USER[k]: v for k, v in kwargs.items()}
    user_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in user_kwargs.items()}
    user = DiffusionCacheConfig.from_dict(user_kwargs)
    assert user == DiffusionCacheConfig(**user_kwargs)
    with pytest.raises(ValueError) as err:
        StepCacheConfig.from_diffusion_cache_config(user)
    assert any(field in str(err.value) for field in user_kwargs), str(err.value)


def test_edge_values_that_are_allowed():
    StepCacheConfig(sim_thresholds=(1.0, -0.999), skip_countdowns=(1, 9))
    StepCacheConfig(sim_thresholds=(), skip_countdowns=())  # never skips
    StepCacheConfig(min_history_steps=5, max_history=5)
    assert StepCacheConfig(sim_thresholds=(), skip_countdowns=()).max_consecutive_skips == 0
    assert StepCacheConfig(enabled=False).max_consecutive_skips == 0


def test_static_run_steps_validation_and_translation():
    config = StepCacheConfig(static_run_steps=[6, 0, 1, 1])
    assert config.static_run_steps == (0, 1, 6)
    user = config.to_diffusion_cache_config()
    assert user.step_cache_dit_static_steps == [0, 1, 6]
    assert StepCacheConfig.from_diffusion_cache_config(user) == config
    assert DiffusionCacheConfig.from_dict({"step_cache_dit_static_steps": [0, 2]}).step_cache_dit_static_steps == [0, 2]
    with pytest.raises(ValueError, match=r"static_run_steps must include step 0.*\[1, 2\]"):
        StepCacheConfig(static_run_steps=(1, 2))
    with pytest.raises(ValueError, match=r"step_cache_dit_static_steps must hold step indices >= 0"):
        StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig(step_cache_dit_static_steps=[0, -1]))
    with pytest.raises(ValueError, match="static_run_steps must hold step indices"):
        StepCacheConfig(static_run_steps=(0, 1.5))


# --- config files and presets -----------------------------------------------------------------------


def test_a_saved_config_is_accepted_as_a_path_everywhere(tmp_path):
    config = DiffusionCacheConfig(velocity_sim_thresholds=[0.97], velocity_skip_countdowns=[3],
                                  step_cache_dit_final_steps=2)
    path = config.save(tmp_path / "cal.json")
    assert DiffusionCacheConfig.from_file(path) == config
    assert as_diffusion_cache_config(path) == config
    assert as_diffusion_cache_config(str(path)) == config


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "does not exist"), ("", "is empty"), ("  \n", "is empty"), ("{oops", "not valid JSON"),
     ('{"velocity_sim_thresholds": [2.0], "velocity_skip_countdowns": [1]}', "(-1, 1]"),
     ('{"bogus": 1}', "unknown cache config key")],
)
def test_bad_config_files_name_the_path(tmp_path, content, words):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    for value in (path, str(path)):
        with pytest.raises(ValueError) as err:
            as_diffusion_cache_config(value)
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)


def test_a_calibration_report_file_gives_its_chosen_config(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"config": {"step_cache_dit_static_steps": [0, 5, 9]}, "measured": {}}))
    assert DiffusionCacheConfig.from_file(path).step_cache_dit_static_steps == [0, 5, 9]


def test_presets_by_name_and_unknown_names():
    assert DiffusionCacheConfig.preset("seed") == DiffusionCacheConfig()
    assert as_diffusion_cache_config("seed") == DiffusionCacheConfig()
    with pytest.raises(ValueError, match="unknown cache config preset"):
        DiffusionCacheConfig.preset("fastest")


def test_a_json_array_string_is_not_taken_for_a_path():
    with pytest.raises(ValueError, match="JSON object"):
        as_diffusion_cache_config("[0.9]")
