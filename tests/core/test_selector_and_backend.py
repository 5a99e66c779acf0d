"""The selector, the backend's enable/refresh contract, the accessors and the seed's aliases."""

from __future__ import annotations

import pytest

import stepcache
from stepcache import (
    CUSTOM_STEPCACHE_ENABLERS,
    STEP_CACHE_CONFIG_ATTR,
    STEP_CACHE_STATE_ATTR,
    CacheBackend,
    DiffusionCacheConfig,
    StepCacheBackend,
    StepCacheConfig,
    StepCacheState,
    get_cache_backend,
    get_stepcache_config,
    get_stepcache_state,
    is_stepcache_active,
)


class DreamZeroPipeline:  # matched by class name, like the real one
    pass


class TunedDreamZeroPipeline(DreamZeroPipeline):
    pass


class OtherPipeline:
    pass


@pytest.mark.parametrize("name", ["step_cache", "stepcache", "step_cache_dit", "STEP_CACHE", " StepCache "])
def test_selector_names(name):
    assert isinstance(get_cache_backend(name), StepCacheBackend)


@pytest.mark.parametrize("name", ["none", "None", "NONE", ""])
def test_selector_none(name):
    assert get_cache_backend(name) is None


def test_selector_unknown_lists_supported():
    with pytest.raises(ValueError) as err:
        get_cache_backend("tea_cache")
    for name in ("'tea_cache'", "step_cache", "stepcache", "step_cache_dit", "none"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="string or None"):
        get_cache_backend(3)


def test_selector_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DIFFUSION_CACHE_BACKEND", raising=False)
    assert get_cache_backend(None) is None
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "Step_Cache")
    assert isinstance(get_cache_backend(None), StepCacheBackend)
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "none")
    assert get_cache_backend() is None
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DIFFUSION_CACHE_BACKEND"):
        get_cache_backend()
    # an explicit name wins over the environment
    assert isinstance(get_cache_backend("step_cache"), StepCacheBackend)


@pytest.mark.parametrize(
    "cache_config",
    [
        None,
        {"velocity_sim_thresholds": [0.9], "velocity_skip_countdowns": [3]},
        '{"velocity_sim_thresholds": [0.9], "velocity_skip_countdowns": [3]}',
        DiffusionCacheConfig(velocity_sim_thresholds=[0.9], velocity_skip_countdowns=[3]),
    ],
)
def test_selector_config_forms(cache_config):
    backend = get_cache_backend("step_cache", cache_config)
    expected = DiffusionCacheConfig() if cache_config is None else DiffusionCacheConfig.from_dict(
        {"velocity_sim_thresholds": [0.9], "velocity_skip_countdowns": [3]}
    )
    assert backend.config == expected


def test_selector_validates_the_config_even_without_a_backend():
    with pytest.raises(ValueError, match="unknown cache config key"):
        get_cache_backend("none", {"sim_thresholds": [0.9]})


def test_backend_enable_and_refresh():
    pipeline = DreamZeroPipeline()
    backend = StepCacheBackend(DiffusionCacheConfig(velocity_sim_thresholds=[0.9], velocity_skip_countdowns=[3]))
    assert isinstance(backend, CacheBackend) and not backend.is_enabled()
    assert not is_stepcache_active(pipeline)
    backend.enable(pipeline)
    assert backend.is_enabled() and is_stepcache_active(pipeline)
    config = get_stepcache_config(pipeline)
    assert config == StepCacheConfig(sim_thresholds=(0.9,), skip_countdowns=(3,))
    state = get_stepcache_state(pipeline)
    assert isinstance(state, StepCacheState) and state.config is config
    assert getattr(pipeline, STEP_CACHE_CONFIG_ATTR) is config and getattr(pipeline, STEP_CACHE_STATE_ATTR) is state

    state.should_run_step([])
    state.skip_countdown = 2
    backend.refresh(pipeline, num_inference_steps=16)
    assert state.trace == [] and state.skip_countdown == 0
    assert get_stepcache_state(pipeline) is state


def test_backend_supports_subclasses_and_rejects_others():
    StepCacheBackend().enable(TunedDreamZeroPipeline())
    with pytest.raises(ValueError) as err:
        StepCacheBackend().enable(OtherPipeline())
    # vLLM-Omni's message first (code written against it matches on it), then what to do
    upstream = "step_cache backend does not support OtherPipeline. Supported: ['DreamZeroPipeline']"
    assert str(err.value).startswith(upstream)
    assert "CUSTOM_STEPCACHE_ENABLERS" in str(err.value) and "enable_step_cache" in str(err.value)


def test_selector_accepts_what_vllm_omni_accepts_and_enable_refuses_what_it_refuses():
    # vLLM-Omni's DiffusionCacheConfig checks no values: the length mismatch is reported at enable
    backend = get_cache_backend("step_cache", {"velocity_sim_thresholds": [0.9]})
    assert isinstance(backend, StepCacheBackend) and backend.config.velocity_sim_thresholds == [0.9]
    pipeline = DreamZeroPipeline()
    with pytest.raises(ValueError) as err:
        backend.enable(pipeline)
    assert str(err.value).startswith(
        "velocity_sim_thresholds and velocity_skip_countdowns must have the same length; got 1 and 2."
    )
    assert "[0.9]" in str(err.value) and "[4, 2]" in str(err.value)
    assert not backend.is_enabled() and not is_stepcache_active(pipeline)


def test_values_vllm_omni_does_not_check_are_checked_at_enable_too():
    backend = get_cache_backend("step_cache", {"velocity_sim_thresholds": [1.5], "velocity_skip_countdowns": [2]})
    with pytest.raises(ValueError, match=r"velocity_sim_thresholds\[0\] must be a cosine similarity in \(-1, 1\]"):
        backend.enable(DreamZeroPipeline())


def test_refresh_before_enable_is_a_clear_error():
    with pytest.raises(RuntimeError, match="enable"):
        StepCacheBackend().refresh(DreamZeroPipeline(), 16)


def test_disabled_config_is_not_active():
    pipeline = DreamZeroPipeline()
    StepCacheBackend({"step_cache_dit_enabled": False}).enable(pipeline)
    assert get_stepcache_config(pipeline) is not None and not is_stepcache_active(pipeline)


def test_accessors_return_none_for_wrong_types():
    pipeline = OtherPipeline()
    assert get_stepcache_config(pipeline) is None and get_stepcache_state(pipeline) is None
    setattr(pipeline, STEP_CACHE_CONFIG_ATTR, {"enabled": True})
    setattr(pipeline, STEP_CACHE_STATE_ATTR, "state")
    assert get_stepcache_config(pipeline) is None and get_stepcache_state(pipeline) is None
    assert not is_stepcache_active(pipeline)


def test_registry_and_constants_match_the_seed():
    assert CUSTOM_STEPCACHE_ENABLERS == {"DreamZeroPipeline": stepcache.enable_dreamzero_stepcache}
    assert STEP_CACHE_CONFIG_ATTR == "_stepcache_config" and STEP_CACHE_STATE_ATTR == "_stepcache_state"


@pytest.mark.parametrize(
    ("alias", "original"),
    [
        ("StepCacheDiTBackend", "StepCacheBackend"),
        ("StepCacheDiTConfig", "StepCacheConfig"),
        ("StepCacheDiTState", "StepCacheState"),
        ("CUSTOM_STEP_CACHE_DIT_ENABLERS", "CUSTOM_STEPCACHE_ENABLERS"),
        ("enable_dreamzero_step_cache_dit", "enable_dreamzero_stepcache"),
        ("STEP_CACHE_DIT_CONFIG_ATTR", "STEP_CACHE_CONFIG_ATTR"),
        ("STEP_CACHE_DIT_STATE_ATTR", "STEP_CACHE_STATE_ATTR"),
        ("is_step_cache_dit_active", "is_stepcache_active"),
        ("get_step_cache_dit_config", "get_stepcache_config"),
        ("get_step_cache_dit_state", "get_stepcache_state"),
    ],
)
def test_aliases_are_the_same_objects(alias, original):
    assert getattr(stepcache, alias) is getattr(stepcache, original)


def test_seed_modules_exist():
    from stepcache import backend, config, state

    assert config.StepCacheConfig is StepCacheConfig
    assert state.StepCacheState is StepCacheState
    assert backend.StepCacheBackend is StepCacheBackend


def test_refresh_checks_the_config_against_the_step_count():
    from stepcache import StepCacheBackend, get_stepcache_state

    class DreamZeroPipeline:  # matched by class name, like the real one
        pass

    pipeline = DreamZeroPipeline()
    backend = StepCacheBackend({"step_cache_dit_static_steps": [0, 50]})
    backend.enable(pipeline)
    with pytest.raises(ValueError, match=r"\[50\] past the end of a 16-step generation"):
        backend.refresh(pipeline, num_inference_steps=16)
    backend.refresh(pipeline, num_inference_steps=51)
    assert get_stepcache_state(pipeline).generation_steps == 51
