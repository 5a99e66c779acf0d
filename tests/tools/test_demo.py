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
    args = _parse(["--episodes", "1", "--seed", "3", "--out", str(tmp_path / "out"), "--json", str(json_path),
                   "--model", str(model_dir), "--no-progress"])
    assert demo.run(args) == 0
    printed = capsys.readouterr().out
    assert "| run" in printed and "step_cache" in printed and "speedup" in printed
    config_line = next(line for line in printed.splitlines() if "cache config" in line)
    assert "preset seed: {" in config_line and '"velocity_sim_thresholds": [0.95, 0.93]' in config_line
    assert "step_cache_dit_forward_fraction" not in config_line and len(config_line) < 250  # only what acts
    assert (tmp_path / "out" / "episode.png").stat().st_size > 0
    assert (tmp_path / "out" / "similarity.png").stat().st_size > 0
    data = json.loads(json_path.read_text())
    assert len(data["runs"]["step_cache"]["cache_config"]) == 16  # the whole config in the JSON output
    assert data["model"] == str(model_dir) and data["episodes"] == 1
    run_keys = {"stepcache", "torch", "diffusers", "python", "device", "torch_threads", "command", "date"}
    assert run_keys <= set(data["run"])
    assert set(data["runs"]) == {"none", "step_cache"}
    for run in data["runs"].values():
        assert {"success_rate", "dit_forwards_per_chunk", "latency_per_chunk_s"} <= set(run)
        assert 0.0 <= run["success_rate"] <= 1.0 and run["latency_per_chunk_s"] > 0
    assert data["runs"]["none"]["dit_forwards_per_chunk"] == 16
    cached = data["runs"]["step_cache"]
    assert cached["dit_forwards_per_chunk"] <= 16
    assert cached["action_mse_vs_none"] >= 0 and "video_psnr_vs_none" in cached


def test_demo_with_piped_stderr_prints_progress_lines(tmp_path, capsys):
    from stepcache.tools import cli

    model_dir = save_tiny_model(tmp_path / "tiny")
    assert cli.main(["demo", "--episodes", "2", "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    lines = [line for line in err.splitlines() if line.startswith("demo: ")]
    assert lines[0].startswith("demo: 0/2 episodes, 0s elapsed")  # the start, before the first episode
    assert lines[1].startswith("demo: 1/2 episodes, ") and "elapsed, about " in lines[1] and " left (" in lines[1]
    assert lines[-1].startswith("demo: 2/2 episodes, ") and "elapsed, done" in lines[-1]
    assert cli.main(["demo", "--episodes", "2", "--model", str(model_dir), "--out", str(tmp_path / "out2"),
                     "--no-progress"]) == 0
    assert "demo: " not in capsys.readouterr().err


def test_never_firing_cache_matches_the_uncached_run_exactly(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    json_path = tmp_path / "demo.json"
    never = json.dumps({"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1]})
    args = _parse(["--episodes", "1", "--out", str(tmp_path / "out"), "--json", str(json_path), "--model",
                   str(model_dir), "--cache-config", never, "--no-progress"])
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
