from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import pytest

from stepcache.models.dreamzero.training import torch_threads
from stepcache.tools import demo
from tests.models.dreamzero.tiny import save_tiny_model


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    with torch_threads(1):  # the demo sets the thread count itself; put it back afterwards
        yield


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse and validate as ``stepcache demo`` does."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(argv)
    demo.validate(args)
    return args


def test_demo_writes_table_pngs_and_the_json_shape(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny")
    json_path = tmp_path / "demo.json"
    args = _parse(["--episodes", "2", "--seed", "3", "--out", str(tmp_path / "out"), "--json", str(json_path),
                   "--model", str(model_dir), "--no-progress", "--sessions", "2", "--timed-episodes", "1",
                   "--rows", "step_cache,fast,static_mask,fewer_steps"])
    assert demo.run(args) == 0
    printed = capsys.readouterr().out
    assert "| run" in printed and "success [95% CI]" in printed and "speedup" in printed
    config_line = next(line for line in printed.splitlines() if "cache config" in line)
    assert "preset seed: {" in config_line and '"velocity_sim_thresholds": [0.95, 0.93]' in config_line
    assert "step_cache_dit_forward_fraction" not in config_line and len(config_line) < 300  # only what acts
    for name in (demo.SUCCESS_PNG, demo.EPISODE_PNG, demo.SIMILARITY_PNG):
        assert (tmp_path / "out" / name).stat().st_size > 0
    data = json.loads(json_path.read_text())
    assert len(data["runs"]["step_cache"]["cache_config"]) == 16  # the whole config in the JSON output
    assert data["model"] == str(model_dir) and data["episodes"] == 2 and data["task"] == "reaching"
    assert data["world_seeds"] == [3500, 3501] and data["calibration_seed"] == 4
    run_keys = {"stepcache", "torch", "diffusers", "python", "device", "torch_threads", "command", "date"}
    assert run_keys <= set(data["run"])
    assert list(data["runs"])[:3] == ["none", "step_cache", "fast"]
    fewer = [name for name in data["runs"] if name.startswith("fewer_steps ")]
    assert fewer and all(data["runs"][name]["family"] == "fewer_steps" for name in fewer)
    for name, run in data["runs"].items():
        assert {"success_rate", "success_interval", "crash_rate", "mean_chunks_to_success", "dit_forwards_per_chunk",
                "latency_per_chunk_s", "speedup", "episodes"} <= set(run)
        low, high = run["success_interval"]
        assert 0.0 <= low <= run["success_rate"] <= high <= 1.0 and run["latency_per_chunk_s"] > 0
        assert run["episodes"] == 2
        if name != "none":
            assert run["action_mse_vs_none"] >= 0 and "video_psnr_vs_none" in run
    assert data["runs"]["none"]["dit_forwards_per_chunk"] == 16
    assert data["runs"]["fast"]["dit_forwards_per_chunk"] == 4
    assert data["runs"]["static_mask"]["dit_forwards_per_chunk"] == 8  # DreamZero's 8 of 16
    assert data["runs"]["static_mask"]["family"] == "static_mask"
    assert data["runs"]["fewer_steps 4"]["num_inference_steps"] == 4


def test_the_calibrated_row_is_tuned_on_other_episodes_than_it_is_judged_on(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    json_path = tmp_path / "demo.json"
    args = _parse(["--episodes", "1", "--out", str(tmp_path / "out"), "--json", str(json_path), "--model",
                   str(model_dir), "--no-progress", "--rows", "calibrated", "--timed-episodes", "0"])
    demo.run(args)
    data = json.loads(json_path.read_text())
    calibrated = data["runs"]["calibrated"]
    assert calibrated["dit_forwards_per_chunk"] <= demo.CALIBRATED_FORWARDS + 1e-9
    assert calibrated["family"] == "calibrated" and "cache_config" in calibrated
    assert "latency_per_chunk_s" not in calibrated  # --timed-episodes 0: nothing timed, nothing claimed


def test_evaluated_episodes_never_share_a_world_seed_with_calibration_or_training():
    from stepcache.models.dreamzero.training import TrainingConfig
    from stepcache.tools.benchmark.dreamzero_target import SEED_STRIDE
    from stepcache.tools.calibrate import DREAMZERO_EPISODES

    for seed, calibration_seed in ((0, 1), (1, 0), (5, 2)):
        evaluated = set(demo.episode_seeds(seed, demo.MAX_EPISODES))
        calibrated = {SEED_STRIDE * calibration_seed + i for i in range(DREAMZERO_EPISODES)}  # calibrate_bundled's
        assert not evaluated & calibrated
        assert TrainingConfig().seed not in evaluated  # training draws from its seed's own stream


def test_overlapping_or_too_many_episodes_are_usage_errors(tmp_path, capsys):
    from stepcache.tools.common import UsageError

    with pytest.raises(UsageError, match="--calibration-seed: 2 is the evaluated --seed"):
        _parse(["--seed", "2", "--calibration-seed", "2", "--out", str(tmp_path / "a")])
    with pytest.raises(UsageError, match=f"--episodes: 501 is not allowed; allowed: 1..{demo.MAX_EPISODES}"):
        _parse(["--episodes", "501", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        _parse(["--rows", "none,fastest", "--out", str(tmp_path / "c")])
    assert "'fastest' is not a row" in capsys.readouterr().err


def test_demo_with_piped_stderr_prints_progress_lines(tmp_path, capsys):
    from stepcache.tools import cli

    model_dir = save_tiny_model(tmp_path / "tiny")
    base = ["demo", "--episodes", "2", "--model", str(model_dir), "--rows", "step_cache", "--sessions", "1",
            "--timed-episodes", "1"]
    assert cli.main([*base, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    lines = [line for line in err.splitlines() if line.startswith("demo: ")]
    assert lines[0].startswith("demo: 0/4 episodes, 0s elapsed")  # the start, before the first episode
    assert lines[1].startswith("demo: 1/4 episodes, ") and "elapsed, about " in lines[1] and " left (" in lines[1]
    assert lines[-1].startswith("demo: 4/4 episodes, ") and "elapsed, done" in lines[-1]
    assert cli.main([*base, "--out", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert "demo: " not in capsys.readouterr().err


def test_never_firing_cache_matches_the_uncached_run_exactly(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    json_path = tmp_path / "demo.json"
    never = json.dumps({"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1]})
    args = _parse(["--episodes", "1", "--out", str(tmp_path / "out"), "--json", str(json_path), "--model",
                   str(model_dir), "--cache-config", never, "--no-progress", "--rows", "step_cache",
                   "--timed-episodes", "0"])
    demo.run(args)
    cached = json.loads(json_path.read_text())["runs"]["step_cache"]
    assert cached["action_mse_vs_none"] == 0.0 and cached["identical_chunks"] == cached["chunks"]
    assert cached["dit_forwards_per_chunk"] == 16


def test_bad_episode_count_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--episodes", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--episodes" in capsys.readouterr().err


def test_each_run_has_its_bench_family_colour():
    from stepcache import DREAMZERO_STATIC_RUN_STEPS, DiffusionCacheConfig, as_diffusion_cache_config
    from stepcache.tools.benchmark.report import FAMILY_COLOURS

    def cached_colour(config):
        return demo.run_colours(as_diffusion_cache_config(config))["step_cache"]

    assert demo.run_colours(DiffusionCacheConfig())["none"] == FAMILY_COLOURS["full"]
    assert cached_colour({}) == FAMILY_COLOURS["step_cache"]
    assert cached_colour("balanced") == FAMILY_COLOURS["planned"]
    assert cached_colour({"step_cache_dit_static_steps": list(DREAMZERO_STATIC_RUN_STEPS)}) == FAMILY_COLOURS[
        "static_mask"]
    assert cached_colour({"step_cache_dit_static_steps": [0, 3, 9]}) == FAMILY_COLOURS["calibrated"]
    assert cached_colour({"step_cache_dit_policy": "error_budget"}) == FAMILY_COLOURS["error_budget"]


def test_threshold_lines_are_the_configs_own_and_labelled_with_user_names():
    from stepcache import DiffusionCacheConfig

    lines = demo.threshold_lines(DiffusionCacheConfig(velocity_sim_thresholds=[0.97], velocity_skip_countdowns=[3]))
    assert lines == [(0.97, "velocity_sim_thresholds[0] = 0.97: above it, skip 3 steps")]
    assert [t for t, _ in demo.threshold_lines(DiffusionCacheConfig())] == [0.95, 0.93]
    assert demo.threshold_lines(DiffusionCacheConfig.preset("balanced")) == []  # a planned policy has none


def test_the_similarity_plotted_is_the_one_the_rule_read(tmp_path):
    """Omni's per-step velocity_similarity is the trace's similarity wherever the rule computed one."""
    from stepcache.models.dreamzero import ReachingWorld
    from stepcache.omni import Omni

    model_dir = save_tiny_model(tmp_path / "tiny")
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    for config in ({"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]},
                   {"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1]}):
        with contextlib.closing(Omni(model_dir, cache_backend="step_cache", cache_config=config)) as omni:
            omni.start_episode(seed=0)
            stats = omni.generate(frame, world.instruction, state).stats
        read = [r["similarity"] for r in stats.trace]
        assert sum(s is not None for s in read) >= 3
        for step, (by_rule, plotted) in enumerate(zip(read, stats.velocity_similarity)):
            assert plotted is not None or step < 2
            if by_rule is not None:
                assert plotted == pytest.approx(by_rule, abs=1e-6)  # the same cosine, to float32 rounding
