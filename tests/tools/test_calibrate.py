"""`calibrate` picks by measurement and its JSON goes into every entry point."""

from __future__ import annotations

import json
import math

import pytest

from stepcache import DiffusionCacheConfig, StepCacheConfig, StepCacheState, get_cache_backend
from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats, remove_step_cache
from stepcache.tools.benchmark.wan_digits_target import WanDigitsTarget
from stepcache.tools.calibrate import Trial, calibrate, choose, write_calibration
from tests.tools.tiny_models import tiny_wan_digits

CONFIGS = [
    StepCacheConfig(sim_thresholds=(0.5,), skip_countdowns=(3,)),
    StepCacheConfig(sim_thresholds=(0.9,), skip_countdowns=(2,)),
    StepCacheConfig(sim_thresholds=(0.999,), skip_countdowns=(1,)),
    StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,)),  # never skips: exact
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return tiny_wan_digits(tmp_path_factory.mktemp("tiny-wan"))


def _trial(nfe, psnr):
    return Trial(StepCacheConfig(), nfe, psnr, 0.9)


def test_choose_respects_the_goal():
    trials = [_trial(4, 20.0), _trial(6, 30.0), _trial(8, 30.0), _trial(16, math.inf)]
    assert choose(trials, target_forwards=7, min_psnr=None).nfe == 6
    assert choose(trials, target_forwards=3, min_psnr=None) is None
    assert choose(trials, target_forwards=None, min_psnr=25).nfe == 6  # fewest forwards at >= 25 dB
    assert choose(trials, target_forwards=None, min_psnr=100).nfe == 16  # exact counts as infinite PSNR


def test_calibrate_rejects_bad_goals(digits):
    target = WanDigitsTarget(digits, samples_per_class=1, scores=False)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(target, target_forwards=4, min_psnr=20, configs=CONFIGS)
    with pytest.raises(ValueError, match="target_forwards must be in"):
        calibrate(target, target_forwards=40, configs=CONFIGS)


def test_calibrated_json_round_trips_into_every_entry_point(digits, tmp_path):
    target = WanDigitsTarget(digits, samples_per_class=1, scores=False)
    chosen, trials = calibrate(target, target_forwards=12, configs=CONFIGS)
    assert len(trials) == len(CONFIGS) and chosen is not None and chosen.nfe <= 12
    assert chosen.psnr_db == max(t.psnr_db for t in trials if t.nfe <= 12)

    path = tmp_path / "calibrated.json"
    report_path = write_calibration(path, chosen, trials, {"model": "tiny"})
    text = path.read_text()
    report = json.loads(report_path.read_text())
    assert report["measured"]["nfe"] == pytest.approx(chosen.nfe, abs=1e-3) and len(report["trials"]) == 4

    # 1. the user-facing config, from the file's dict and from its JSON text
    user = DiffusionCacheConfig.from_dict(json.loads(text))
    assert DiffusionCacheConfig.from_dict(text) == user
    assert StepCacheConfig.from_diffusion_cache_config(user) == chosen.config
    # 2. the backend selector (what Omni uses)
    assert get_cache_backend("step_cache", text).config == user
    # 3. the diffusers integration reproduces the measured forwards
    apply_step_cache(digits.pipe, json.loads(text))
    try:
        digits.sample(target.labels, num_inference_steps=16, seed=target.seed)
        stats = get_step_cache_stats(digits.pipe)
    finally:
        remove_step_cache(digits.pipe)
    assert stats.computed_steps == round(chosen.nfe)
    # 4. the core state
    assert StepCacheState(StepCacheConfig.from_diffusion_cache_config(user)).config == chosen.config
