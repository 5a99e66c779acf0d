from __future__ import annotations

import numpy as np
import torch

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig
from stepcache.models.dreamzero.training import (
    TrainingConfig,
    flow_matching_loss,
    make_batch,
    train,
    train_bundled,
)
from stepcache.models.dreamzero.weights import load_model
from stepcache.models.dreamzero.world import WorldConfig, generate_expert_episodes

SMALL = DreamZeroMiniConfig(hidden_size=32, num_layers=2, num_heads=2, timestep_frequencies=16)


def test_batches_hold_the_context_since_the_last_reset():
    world = WorldConfig()
    episodes = generate_expert_episodes(16, np.random.default_rng(0), world)
    rng = np.random.default_rng(1)
    lengths = set()
    for _ in range(20):
        batch = make_batch(episodes, rng, 8, world, SMALL, 4, (0.25, 0.25, 0.25, 0.25))
        lengths.add(batch.context.shape[1])
        assert batch.video.shape == (8, 2, 32, 32) and batch.actions.shape == (8, 8, 2)
        assert batch.context.min() >= -1 and batch.context.max() <= 1
        assert batch.actions.abs().max() <= 1 + 1e-6  # actions in units of the largest move
        # the future frames continue the last observation: its targets are still there (or under the agent)
        targets_then = (batch.context[:, -1] > -1) & (batch.context[:, -1] < 1)
        drawn_next = batch.video[:, 0] > -1
        assert not (targets_then & ~drawn_next).any()
        # the grounding targets: every sample's goal shows in some patch, and those patches hold its grey level
        assert (batch.goal_patches.sum(1) >= 1).all()
        level = torch.tensor([0.45, 0.65, 0.85])[batch.instruction] * 2 - 1
        patches = CausalWorldActionDiT(SMALL).patchify(batch.context[:, :1])
        shows_goal = (patches - level[:, None, None]).abs().lt(1e-4).any(-1)
        shows_agent = patches.eq(1.0).any(-1)  # the agent is drawn over the target once it arrives
        assert (shows_goal | shows_agent | (batch.goal_patches == 0)).all()
        assert not (shows_goal & (batch.goal_patches == 0)).any()  # grey levels are unique per kind
        assert batch.goal_position.abs().max() <= 1
    assert lengths == {1, 2, 3, 4}


def _fixed_loss(model, batch, config) -> float:
    with torch.no_grad():
        return flow_matching_loss(model, batch, config, torch.Generator().manual_seed(123))[0].item()


def test_a_short_training_run_lowers_the_loss():
    world = WorldConfig()
    config = TrainingConfig(steps=40, batch_size=8, warmup_steps=5, ema_decay=0.9, seed=0)
    batch = make_batch(generate_expert_episodes(16, np.random.default_rng(5), world), np.random.default_rng(6), 16,
                       world, SMALL, 4, (1.0, 0.0, 0.0, 0.0))
    from stepcache.models.dreamzero.model import CausalWorldActionDiT

    torch.manual_seed(config.seed)
    before = _fixed_loss(CausalWorldActionDiT(SMALL).eval(), batch, config)
    model, history = train(SMALL, config, world)
    after = _fixed_loss(model, batch, config)
    assert len(history) == 40
    assert after < 0.8 * before, (before, after)


def test_train_bundled_writes_loadable_weights(tmp_path, monkeypatch):
    import stepcache.models.dreamzero.training as training

    monkeypatch.setattr(training, "DreamZeroMiniConfig", lambda: SMALL)
    out = train_bundled(tmp_path / "w", seed=1, steps=2, progress=False)
    model = load_model(out)
    assert model.config == SMALL
