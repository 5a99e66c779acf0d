"""Train the bundled DreamZero-mini world-action model on fresh scripted-expert episodes.

Each sample is one chunk of an expert episode: the clean observed frames since the last context
reset (as the pipeline's KV cache would hold them), the robot state and instruction at the chunk's
start, and the targets to denoise: the chunk's ``future_frames`` frames and its ``action_horizon``
actions. The loss is flow matching on both streams at independent noise levels
(``x_sigma = (1 - sigma) * x0 + sigma * noise``, target velocity ``noise - x0``); the instruction is
dropped to the null instruction at random so the model also learns the unconditional branch (CFG).
Data is generated on the fly, so no episode is seen twice.

Two auxiliary "grounding" losses speed training up (the sampler never uses their heads): each
context patch predicts whether it shows the instructed target, and the state token predicts that
target's position. Without them the model settles for a long time on heading to the middle of the
arena, ignoring the instruction, which the ~20-minute CPU budget cannot afford to wait out.

``stepcache train dreamzero-mini`` calls :func:`train_bundled`, which recreates the shipped weights in a
folder of the caller's choice (never inside the package).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig, KVCache
from stepcache.models.dreamzero.world import (
    ExpertEpisodes,
    WorldConfig,
    goal_sprite_mask,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings; the defaults produce the shipped weights."""

    steps: int = 2500
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05  # cosine decay ends at this fraction of the peak rate
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the saved weights are the exponential moving average
    instruction_dropout: float = 0.2  # share of samples trained with the null instruction
    video_loss_weight: float = 3.0  # the predicted frames feed the CFG velocity StepCache decides on
    action_loss_weight: float = 5.0
    coupled_noise_fraction: float = 0.5  # share of samples whose actions get the video's sigma
    sigma_shift: float = 5.0  # half the sigmas are drawn shifted towards high noise, like sampling
    # Share of action sigmas drawn from [0.8, 1]: only at high noise must the model read the target from
    # the instruction and the frames (lower, the noisy actions and video already hint at it).
    action_high_noise_fraction: float = 0.3
    grounding_loss_weight: float = 1.0  # auxiliary goal-patch and goal-position losses (see flow_matching_loss)
    goal_patch_pos_weight: float = 10.0  # few patches show the goal: weigh them up in the BCE
    goal_position_weight: float = 5.0  # the goal-position read-out must be precise to a pixel or two
    context_reset_chunks: int = 4  # must match the pipeline's
    # P(1..4 context frames): mostly one (cheapest; the targets never move), some longer for the KV cache.
    context_length_weights: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    episodes_per_pool: int = 1024  # fresh expert episodes generated at a time
    pool_reuse_steps: int = 16  # optimiser steps drawn from one pool before it is replaced
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "episodes_per_pool", "pool_reuse_steps", "context_reset_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingConfig.{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainingConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainingConfig.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainingBatch:
    """Model-unit tensors for one optimiser step."""

    context: torch.Tensor  # (B, L, S, S) clean observed frames, oldest first (latent units)
    video: torch.Tensor  # (B, F, S, S) clean future frames (latent units)
    actions: torch.Tensor  # (B, H, A) expert actions (model units)
    state: torch.Tensor  # (B, state_dim) model units
    instruction: torch.Tensor  # (B,) long
    goal_patches: torch.Tensor  # (B, P) 1 where a patch shows part of the instructed target
    goal_position: torch.Tensor  # (B, 2) the instructed target's position (model units)


def make_batch(
    episodes: ExpertEpisodes,
    rng: np.random.Generator,
    batch_size: int,
    world: WorldConfig,
    model_config: DreamZeroMiniConfig,
    context_reset_chunks: int,
    context_weights: tuple[float, ...],
) -> TrainingBatch:
    """Draw chunk samples from expert episodes; one context length per batch (no padding needed).

    Context length ``L`` fixes which chunks qualify: those ``k`` with ``k % reset == L - 1`` (the
    pipeline clears its context every ``reset`` chunks), and the context is chunks ``k - L + 1 .. k``.
    """
    weights = np.asarray(context_weights[: min(context_reset_chunks, model_config.max_context_frames)], float)
    length = int(rng.choice(len(weights), p=weights / weights.sum())) + 1
    chunks = np.arange(length - 1, world.max_chunks, context_reset_chunks)
    if chunks.size == 0:
        raise ValueError(f"no chunk of a {world.max_chunks}-chunk episode has a {length}-frame context")
    index = rng.integers(0, episodes.frames.shape[0], size=batch_size)
    chunk = rng.choice(chunks, size=batch_size)
    per_chunk = world.frames_per_chunk  # frames recorded per chunk (frame 0 = chunk start)
    horizon = world.action_horizon
    context_frames = (chunk[:, None] + np.arange(-length + 1, 1)[None]) * per_chunk
    future_frames = chunk[:, None] * per_chunk + np.arange(1, per_chunk + 1)[None]
    action_steps = chunk[:, None] * horizon + np.arange(horizon)[None]
    context = episodes.frames[index[:, None], context_frames]
    video = episodes.frames[index[:, None], future_frames]
    actions = episodes.actions[index[:, None], action_steps] / model_config.action_scale
    state = episodes.positions[index, chunk * horizon]
    goal = episodes.goal[index]
    goal_position = episodes.targets[index, goal]
    mask = goal_sprite_mask(episodes.targets[index], goal, world.frame_size)
    p = model_config.patch_size
    grid = world.frame_size // p
    goal_patches = mask.reshape(batch_size, grid, p, grid, p).any(axis=(2, 4)).reshape(batch_size, grid * grid)
    return TrainingBatch(
        context=torch.from_numpy(context * 2.0 - 1.0).float(),
        video=torch.from_numpy(video * 2.0 - 1.0).float(),
        actions=torch.from_numpy(actions).float(),
        state=torch.from_numpy(state * 2.0 - 1.0).float(),
        instruction=torch.from_numpy(goal).long(),
        goal_patches=torch.from_numpy(goal_patches).float(),
        goal_position=torch.from_numpy(goal_position * 2.0 - 1.0).float(),
    )


def sample_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Noise levels in (0, 1): half uniform, half shifted ``shift * u / (1 + (shift - 1) * u)``."""
    u = torch.rand(batch, generator=generator)
    shifted = shift * u / (1 + (shift - 1) * u)
    use_shift = torch.rand(batch, generator=generator) < 0.5
    return torch.where(use_shift, shifted, u).clamp(1e-3, 1.0)


def flow_matching_loss(
    model: CausalWorldActionDiT, batch: TrainingBatch, config: TrainingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """Velocity MSE on the video and action streams, each at its own noise level."""
    size = batch.video.shape[0]
    sigma_video = sample_sigmas(size, config.sigma_shift, generator)
    sigma_action = sample_sigmas(size, config.sigma_shift, generator)
    coupled = torch.rand(size, generator=generator) < config.coupled_noise_fraction
    sigma_action = torch.where(coupled, sigma_video, sigma_action)
    high = torch.rand(size, generator=generator) < config.action_high_noise_fraction
    sigma_action = torch.where(high, 0.8 + 0.2 * torch.rand(size, generator=generator), sigma_action)
    noise_video = torch.randn(batch.video.shape, generator=generator)
    noise_action = torch.randn(batch.actions.shape, generator=generator)
    sv, sa = sigma_video[:, None, None, None], sigma_action[:, None, None]
    noisy_video = (1 - sv) * batch.video + sv * noise_video
    noisy_actions = (1 - sa) * batch.actions + sa * noise_action
    instruction = batch.instruction.clone()
    dropped = torch.rand(size, generator=generator) < config.instruction_dropout
    instruction[dropped] = model.config.null_instruction

    cache = KVCache()
    goal_logits = []
    for j in range(batch.context.shape[1]):  # the same causal prefill the pipeline runs, one frame at a time
        goal_logits.append(model.prefill(batch.context[:, j], instruction, cache, return_goal_logits=True))
    out = model(noisy_video, noisy_actions, batch.state, 1000 * sigma_video, 1000 * sigma_action, instruction, cache)
    video_loss = F.mse_loss(out.video, noise_video - batch.video)
    action_loss = F.mse_loss(out.action, noise_action - batch.actions)

    # Grounding aids (training only): every context patch says whether it shows the instructed target,
    # and the state token says where that target is. Without them the model sits for a long time on
    # "head for the middle of the arena" before it learns to look the instruction up in the frames.
    named = ~dropped
    if named.any():
        logits = torch.stack(goal_logits, dim=1)[named]  # (n, L, P)
        targets = batch.goal_patches[named][:, None].expand_as(logits)
        patch_loss = F.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=torch.tensor(config.goal_patch_pos_weight)
        )
        position_loss = F.mse_loss(out.goal_position[named], batch.goal_position[named])
    else:
        patch_loss = position_loss = torch.zeros(())
    grounding_loss = patch_loss + config.goal_position_weight * position_loss
    loss = (
        config.video_loss_weight * video_loss
        + config.action_loss_weight * action_loss
        + config.grounding_loss_weight * grounding_loss
    )
    return loss, {"loss": loss.item(), "video": video_loss.item(), "action": action_loss.item(),
                  "grounding": grounding_loss.item()}


def _learning_rate(step: int, config: TrainingConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.final_lr_fraction
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    model_config: DreamZeroMiniConfig | None = None,
    config: TrainingConfig | None = None,
    world: WorldConfig | None = None,
    *,
    progress: bool | Callable[..., Any] = False,
    log_every: int = 100,
    callback: Callable[[int, CausalWorldActionDiT], None] | None = None,
    init: CausalWorldActionDiT | None = None,
    name: str = "dreamzero-mini",
) -> tuple[CausalWorldActionDiT, list[dict[str, float]]]:
    """Train from scratch, or from ``init``'s weights; returns the EMA model (eval mode) and the per-step
    loss history. ``world`` is any world config with ``expert_episodes(batch, rng)`` (the reaching
    world's :class:`WorldConfig` by default).

    ``callback(step, ema_model)`` runs after every optimiser step (e.g. to checkpoint). ``progress``:
    True for a tqdm bar, or ``progress(total=, desc=, unit=)`` returning a tqdm-like bar.
    """
    model_config = model_config or DreamZeroMiniConfig()
    config = config or TrainingConfig()
    world = world or WorldConfig()
    if world.frames_per_chunk != model_config.future_frames or world.action_horizon != model_config.action_horizon:
        raise ValueError(
            f"world (frames_per_chunk={world.frames_per_chunk}, action_horizon={world.action_horizon}) does not "
            f"match the model (future_frames={model_config.future_frames}, "
            f"action_horizon={model_config.action_horizon})"
        )
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = CausalWorldActionDiT(model_config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    ema = CausalWorldActionDiT(model_config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    decay_params = [p for p in model.parameters() if p.dim() >= 2]
    other_params = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": config.weight_decay}, {"params": other_params, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.99),
    )
    bar = None
    if callable(progress):  # the caller's bar (stepcache train: a bar on a terminal, lines off one)
        bar = progress(total=config.steps, desc=f"train {name}", unit="steps")
    elif progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"train {name}", unit="step")
    history: list[dict[str, float]] = []
    episodes = None
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        if step % config.pool_reuse_steps == 0:
            episodes = world.expert_episodes(config.episodes_per_pool, rng)
        batch = make_batch(episodes, rng, config.batch_size, world, model_config, config.context_reset_chunks,
                           config.context_length_weights)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        loss, parts = flow_matching_loss(model, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        # EMA with a warm-up so that early weights do not linger.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), model.parameters()):
                ema_param.lerp_(param, 1 - decay)
        history.append(parts)
        if callback is not None:
            callback(step + 1, ema)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", action=f"{parts['action']:.4f}")
        if log_every and (step + 1) % log_every == 0:
            recent = history[-log_every:]
            logger.info(
                "step %d/%d: loss %.4f (video %.4f, action %.4f, grounding %.4f), %.0f s",
                step + 1, config.steps,
                *(np.mean([h[key] for h in recent]) for key in ("loss", "video", "action", "grounding")),
                time.perf_counter() - start,
            )
    if bar is not None:
        bar.close()
    return ema.eval(), history


def train_bundled(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: bool | Callable[..., Any] = True,
    num_threads: int | None = 1,
) -> Path:
    """Train dreamzero-mini from scratch and write ``config.json`` + ``model.safetensors`` into ``out_dir``.

    ``out_dir`` is required: the shipped weights inside the package are never overwritten by default.

    ``num_threads`` (default 1): torch intra-op threads while training. The tensors are small, and on
    shared 2-core machines a second thread costs more in synchronisation than it gains.
    """
    from stepcache.models.dreamzero.weights import save_model

    out = Path(out_dir)
    config = TrainingConfig(seed=seed) if steps is None else TrainingConfig(seed=seed, steps=int(steps))
    start = time.perf_counter()
    with torch_threads(num_threads):
        model, history = train(DreamZeroMiniConfig(), config, WorldConfig(), progress=progress)
    elapsed = time.perf_counter() - start
    final = float(np.mean([h["loss"] for h in history[-50:]]))
    save_model(model, out, extra={"training": {**asdict(config), "seconds": round(elapsed, 1),
                                               "final_loss": round(final, 5)}})
    logger.info("trained dreamzero-mini in %.0f s (final loss %.4f); wrote %s", elapsed, final, out)
    return out
