"""A calibration result file is a config file: it round-trips through save/load and every entry point
takes it as it is (apply_step_cache, Omni, get_cache_backend, DiffusionCacheConfig.from_file, the core
state behind VelocityCache, ``stepcache demo --cache-config``); a missing or empty file is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stepcache
from stepcache import (
    DiffusionCacheConfig,
    StepCacheConfig,
    VelocityCache,
    as_diffusion_cache_config,
    disable_stepcache,
    enable_dreamzero_stepcache,
    get_cache_backend,
)
from stepcache.calibration import CalibrationResult
from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
from stepcache.models.dreamzero.world import ReachingWorld
from stepcache.omni import Omni
from stepcache.tools import cli, demo
from tests.calibration.loops import TinyVelocityModel, euler_loop, shifted_times
from tests.models.dreamzero.tiny import save_tiny_model
from tests.tools.tiny_models import single_thread, tiny_wan_digits

CHUNKS = 2
FORWARDS = 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny DreamZero pipeline calibrated through a generation function (its own replay of two chunks)."""
    folder = tmp_path_factory.mktemp("calibration")
    model_dir = save_tiny_model(folder / "tiny")
    pipe = DreamZeroPipeline.from_pretrained(model_dir)
    world = ReachingWorld()
    frame, state = world.reset(3)
    chunks = []
    for chunk in range(CHUNKS):  # the uncached closed loop fixes the observations every run replays
        chunks.append((frame, state))
        out = pipe(frame, world.instruction, state, generator=torch.Generator().manual_seed(100 + chunk))
        frame, state = world.execute(out.actions[0])

    def generate(config):
        enable_dreamzero_stepcache(pipe, config)
        try:
            pipe.reset_context()
            outs = [pipe(f, world.instruction, s, generator=torch.Generator().manual_seed(100 + i))
                    for i, (f, s) in enumerate(chunks)]
        finally:
            disable_stepcache(pipe)
        return torch.from_numpy(np.stack([o.frames for o in outs]))

    result = stepcache.calibrate(generate, target_forwards=FORWARDS)
    path = result.save(folder / "cal.json")
    return result, path, model_dir, chunks, world.instruction


def test_save_and_load_round_trip(calibrated):
    result, path, *_ = calibrated
    loaded = CalibrationResult.load(path)
    assert loaded.to_dict() == result.to_dict()
    assert loaded.config == result.config and loaded.chosen.label == result.chosen.label
    assert loaded.generations == result.generations == 3
    assert loaded.verified[0].fidelity_db == result.verified[0].fidelity_db
    assert [c.verified for c in loaded.candidates] == [c.verified for c in result.candidates]


def test_the_file_is_a_config_for_every_entry_point(calibrated, tmp_path):
    result, path, model_dir, chunks, instruction = calibrated
    config = result.config
    steps = tuple(config.step_cache_dit_static_steps)
    assert len(steps) == FORWARDS
    for value in (path, str(path)):
        assert DiffusionCacheConfig.from_file(value) == config
        assert as_diffusion_cache_config(value) == config
        assert get_cache_backend("step_cache", value).config == config

    # Omni runs the measured schedule on every chunk
    omni = Omni(model=model_dir, cache_backend="step_cache", cache_config=str(path))
    omni.start_episode()
    for i, (frame, state) in enumerate(chunks):
        out = omni.generate(frame, instruction, state, generator=torch.Generator().manual_seed(100 + i))
        assert out.stats.dit_forwards == FORWARDS
        assert tuple(i for i, ran in enumerate(out.stats.ran) if ran) == steps

    # a hand-written loop: the core state VelocityCache runs on
    cache = VelocityCache(StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig.from_file(path)))
    model = TinyVelocityModel()
    euler_loop(lambda x, t, _i: model(x, t), cache, torch.zeros(1, 8), shifted_times(16))
    assert tuple(cache.state.run_steps) == steps

    # a diffusers pipeline
    from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats, remove_step_cache

    digits = tiny_wan_digits(tmp_path / "tiny-wan")
    apply_step_cache(digits.pipe, str(path))
    try:
        digits.sample([2, 5], num_inference_steps=16, seed=0)
        assert tuple(get_step_cache_stats(digits.pipe).run_steps) == steps
    finally:
        remove_step_cache(digits.pipe)

    # stepcache demo --cache-config cal.json: the command line's validation path
    parser = cli._build_parser()
    demo.add_arguments(cli._subparser(parser, "demo"))
    args = parser.parse_args(["demo", "--cache-config", str(path), "--out", str(tmp_path / "demo")])
    demo.validate(args)
    assert args.cache_config == config


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_a_missing_or_empty_file_is_a_clear_error_everywhere(tmp_path, content, capsys):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    words = "does not exist" if content is None else "empty"
    from stepcache.integrations.diffusers import apply_step_cache

    checks = [
        lambda: DiffusionCacheConfig.from_file(path),
        lambda: as_diffusion_cache_config(str(path)),
        lambda: get_cache_backend("step_cache", str(path)),
        lambda: Omni(model="dreamzero-mini", cache_backend="step_cache", cache_config=str(path)),
        lambda: apply_step_cache(torch.nn.Linear(1, 1), str(path)),
        lambda: CalibrationResult.load(path),
    ]
    for check in checks:
        with pytest.raises(ValueError) as err:
            check()
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    code = cli.main(["demo", "--cache-config", str(path), "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err and words in err


def test_a_result_file_that_is_not_one_is_refused(tmp_path):
    plain = DiffusionCacheConfig(step_cache_dit_static_steps=[0, 4]).save(tmp_path / "plain.json")
    with pytest.raises(ValueError, match=r"DiffusionCacheConfig\.from_file"):
        CalibrationResult.load(plain)
    broken = Path(tmp_path / "broken.json")
    broken.write_text('{"format": "stepcache-calibration", "version": 1, "candidates": [{}]}')
    with pytest.raises(ValueError, match=r"broken\.json.*candidates\[0\]\.label is missing"):
        CalibrationResult.load(broken)
