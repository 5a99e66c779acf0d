"""Training dreamzero-detour: reproducible from its seed, a fine-tune of the given weights, and the
world it was trained on recorded next to the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import stepcache.models.dreamzero_detour.training as detour_training
from stepcache.models.dreamzero.training import TrainingConfig, train
from stepcache.models.dreamzero.weights import load_model, load_world_config
from stepcache.models.dreamzero.world import WorldConfig
from stepcache.models.dreamzero_detour.world import DetourConfig
from tests.models.dreamzero.tiny import TINY, make_tiny_model, save_tiny_model

TINY_RUN = TrainingConfig(steps=3, batch_size=4, episodes_per_pool=8, pool_reuse_steps=2, warmup_steps=1, seed=3)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_a_tiny_run_is_reproducible_from_its_seed_and_starts_from_init():
    init = make_tiny_model(seed=5)
    first, _ = train(TINY, TINY_RUN, DetourConfig(), init=init)
    again, _ = train(TINY, TINY_RUN, DetourConfig(), init=init)
    other, _ = train(TINY, TrainingConfig(**{**TINY_RUN.__dict__, "seed": 4}), DetourConfig(), init=init)
    a, b, c = _weights(first), _weights(again), _weights(other)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], c[name]) for name in a)
    # Three small steps from init: the weights moved, but stay near init rather than a fresh initialisation.
    start = init.state_dict()
    moved = sum(float((a[name] - start[name]).abs().sum()) for name in a)
    assert moved > 0
    fresh, _ = train(TINY, TINY_RUN, DetourConfig())
    from_fresh = sum(float((_weights(fresh)[name] - start[name]).abs().sum()) for name in a)
    assert moved < from_fresh


def test_train_bundled_fine_tunes_the_init_model_and_records_its_world(tmp_path, monkeypatch):
    init_dir = save_tiny_model(tmp_path / "init")
    monkeypatch.setattr(detour_training, "INIT", str(init_dir))
    out = detour_training.train_bundled(tmp_path / "w", seed=1, steps=2, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["world"]["task"] == "detour" and config["training"]["init"] == str(init_dir)
    assert load_model(out).config == TINY
    world = load_world_config(out)
    assert isinstance(world, DetourConfig) and world == DetourConfig()


def test_the_bundled_models_name_their_worlds():
    assert type(load_world_config("dreamzero-mini")) is WorldConfig  # no world section: the reaching world
    world = load_world_config("dreamzero-detour")
    assert isinstance(world, DetourConfig)
    frame, state = world.make_world().reset(seed=3)
    assert frame.shape == (32, 32) and state.shape == (2,)


def test_a_world_section_naming_no_known_task_is_refused_with_the_file(tmp_path):
    out = save_tiny_model(tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["world"] = {"task": "maze"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: 'world' must name a task.*'maze'"):
        load_world_config(out)
    config["world"] = {"task": "detour", "obstacle_radius": 2.0}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: invalid 'world' section: .*obstacle_radius"):
        load_world_config(out)


def test_expert_data_come_from_the_training_seeds_stream_only():
    # Episodes for training are drawn from np.random.default_rng(training seed) as one stream; evaluation
    # world seeds (the demo's 500.., the bench's) each start their own stream: layouts never coincide.
    from stepcache.tools.demo import episode_seeds

    config = DetourConfig()
    pool = config.expert_episodes(64, np.random.default_rng(TrainingConfig().seed))
    for seed in episode_seeds(0, 20):
        world = config.make_world()
        world.reset(seed)
        assert not (np.abs(pool.targets - world.targets).max(axis=(1, 2)) < 1e-12).any()
