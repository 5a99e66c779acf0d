"""The benchmark on ``dreamzero-mini`` and ``dreamzero-detour``: the DreamZero-style world-action
pipeline, chunk by chunk, in the world its model was trained on.

Inputs are fixed chunk contexts: ``episodes`` closed-loop episodes of the world are driven
once by the uncached pipeline, and every chunk's observation and robot state is recorded. Every method
then replays those episodes open loop (the KV context carried across chunks as in the episode, the
same noise per chunk), so its actions and predicted frames compare one to one with the full-step
run's:

- fidelity: PSNR and SSIM of the predicted frames, and the action MSE (model units, where the longest
  allowed move is 1) against the full-step output;
- quality (no reference): the closed-loop success rate, with its 95% Wilson interval, when the
  method drives the agent itself on ``closed_loop_episodes`` fresh episodes; the crash rate (worlds
  with an obstacle) and the mean final distance to the instructed target.

``nfe`` counts denoising DiT forwards per chunk (16 for ``full``). The timestep-0 prefill forward that
writes the observation into the KV cache runs once per chunk for every method and is not counted.

diffusers' caches do not apply: they hook diffusers ``ModelMixin`` transformers, and this DiT is a
plain torch module with its own KV-cached prefill.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stepcache.backend import disable_stepcache, enable_dreamzero_stepcache
from stepcache.tools.benchmark.cache_dit_peer import CACHE_DIT
from stepcache.tools.benchmark.closed_loop import wilson_interval
from stepcache.tools.benchmark.harness import BenchTarget, Method, PeerCache, Sample
from stepcache.tools.benchmark.metrics import psnr_db, ssim

logger = logging.getLogger(__name__)

# World seeds of a target with seed s: s * SEED_STRIDE + (0, 1, ...) replayed, + SEED_STRIDE // 2 + ... closed loop.
SEED_STRIDE = 1000
# 32x32 frames: a 7x7 SSIM window keeps a margin-free map of reasonable size.
SSIM_KERNEL = 7
NOT_APPLICABLE = (
    "a diffusers hook on ModelMixin transformers; dreamzero-mini's DiT is a plain torch module with a "
    "KV-cached prefill, so it has nothing to hook"
)
CACHE_DIT_NOT_APPLICABLE = (
    "cache-dit patches the transformer blocks of diffusers pipelines it has an adapter for; dreamzero-mini's "
    "pipeline is this project's own, with a plain torch DiT"
)
DIFFUSERS_CACHES = (
    "first_block_cache",
    "mag_cache",
    "taylorseer_cache",
    "pyramid_attention_broadcast",
    "faster_cache",
)


@dataclass(frozen=True)
class RecordedEpisode:
    """The uncached run's inputs, chunk by chunk: what every method replays."""

    seed: int
    instruction: str
    observations: tuple[np.ndarray, ...]
    states: tuple[np.ndarray, ...]


class DreamZeroTarget(BenchTarget):
    """Replays ``episodes`` recorded episodes (world seeds ``SEED_STRIDE * seed``, ``+ 1``, ...).

    Args:
        pipeline: a loaded :class:`~stepcache.models.dreamzero.pipeline.DreamZeroPipeline`.
        episodes: episodes whose chunks are replayed for fidelity and timing.
        closed_loop_episodes: fresh episodes (world seeds from ``SEED_STRIDE * seed + SEED_STRIDE // 2``) each
            method drives itself
            for the success rate; 0 turns the quality scores off.
        seed: the first world seed (also seeds the chunk noise).
    """

    name = "dreamzero-mini"

    def __init__(self, pipeline: Any, *, episodes: int = 8, closed_loop_episodes: int = 20, seed: int = 0,
                 name: str = "dreamzero-mini") -> None:
        if episodes < 1 or closed_loop_episodes < 0:
            raise ValueError(
                f"episodes must be >= 1 and closed_loop_episodes >= 0, got {episodes}, {closed_loop_episodes}"
            )
        self.pipe = pipeline
        self.num_steps = pipeline.config.num_inference_steps
        self.seed = seed
        self.name = name
        self.world_config = pipeline.world_config  # the world the model was trained on
        if episodes > SEED_STRIDE // 2 or closed_loop_episodes > SEED_STRIDE // 2:
            raise ValueError(
                f"at most {SEED_STRIDE // 2} episodes of each kind, got {episodes} and {closed_loop_episodes}"
            )
        # Targets of different seeds never share a world seed: a config calibrated on one is held out on another.
        first = SEED_STRIDE * seed
        self.closed_loop_seeds = [first + SEED_STRIDE // 2 + i for i in range(closed_loop_episodes)]
        self.recorded = [self._record(first + i) for i in range(episodes)]

    # -- episodes -------------------------------------------------------------------------------
    def episode_generator(self, episode_seed: int) -> torch.Generator:
        # One generator per episode, drawn in chunk order: every method sees the same noise per chunk.
        return torch.Generator().manual_seed(1_000_003 * (1 + self.seed) + episode_seed)

    def _closed_loop(self, episode_seed: int, num_steps: int) -> tuple[Any, RecordedEpisode]:
        world = self.world_config.make_world()
        frame, state = world.reset(episode_seed)
        self.pipe.reset_context()
        generator = self.episode_generator(episode_seed)
        observations, states = [], []
        while not world.done:
            observations.append(frame)
            states.append(state)
            out = self.pipe(frame, world.instruction, state, generator=generator, num_inference_steps=num_steps)
            frame, state = world.execute(out.actions[0])
        return world, RecordedEpisode(episode_seed, world.instruction, tuple(observations), tuple(states))

    def _record(self, episode_seed: int) -> RecordedEpisode:
        return self._closed_loop(episode_seed, self.num_steps)[1]

    def _replay(self, num_steps: int, measure: bool) -> Sample:
        actions, frames, forwards, schedules = [], [], [], []
        for episode in self.recorded:
            self.pipe.reset_context()
            generator = self.episode_generator(episode.seed)
            for observation, state in zip(episode.observations, episode.states):
                out = self.pipe(observation, episode.instruction, state, generator=generator,
                                num_inference_steps=num_steps)
                if measure:
                    actions.append(out.actions[0])
                    frames.append(out.frames[0])
                    forwards.append(out.dit_forwards)
                    schedules.append(tuple(i for i, ran in enumerate(out.ran) if ran))
        if not measure:
            return Sample({}, nfe=math.nan)
        scale = self.pipe.transformer.config.action_scale
        outputs = {
            "actions": torch.from_numpy(np.stack(actions) / scale),
            "frames": torch.from_numpy(np.stack(frames)),
        }
        # The most frequent schedule stands for the method where a fixed schedule is wanted (oracle candidates).
        common = Counter(schedules).most_common(1)[0][0]
        return Sample(outputs, nfe=float(np.mean(forwards)), run_steps=list(common),
                      extra={"schedules": schedules})

    # -- BenchTarget ----------------------------------------------------------------------------
    def sample(self, method: Method, *, measure: bool = True) -> Sample:
        if method.peer is not None:
            raise ValueError(f"{method.peer.name} does not apply to {self.name}: {NOT_APPLICABLE}")
        if method.step_cache is not None:
            enable_dreamzero_stepcache(self.pipe, method.step_cache.to_diffusion_cache_config())
        try:
            sample = self._replay(method.num_steps, measure)
        finally:
            disable_stepcache(self.pipe)
        if method.step_cache is None:
            sample.run_steps = None  # every step of the (possibly shorter) schedule ran
        sample.extra["method"] = method
        return sample

    def fidelity(self, sample: Sample, reference: Sample) -> dict[str, float | None]:
        frames, target = sample.outputs["frames"], reference.outputs["frames"]
        flat, flat_target = frames.flatten(0, 1)[:, None], target.flatten(0, 1)[:, None]
        action_error = float(torch.mean((sample.outputs["actions"] - reference.outputs["actions"]) ** 2))
        return {
            "psnr_db": psnr_db(flat, flat_target, data_range=1.0),
            "ssim": ssim(flat, flat_target, data_range=1.0, kernel_size=SSIM_KERNEL),
            "action_mse": action_error,
        }

    def quality(self, sample: Sample) -> dict[str, float | None]:
        if not self.closed_loop_seeds:
            return {}
        method: Method = sample.extra["method"]
        if method.step_cache is not None:
            enable_dreamzero_stepcache(self.pipe, method.step_cache.to_diffusion_cache_config())
        try:
            worlds = [self._closed_loop(seed, method.num_steps)[0] for seed in self.closed_loop_seeds]
        finally:
            disable_stepcache(self.pipe)
        wins = sum(w.success for w in worlds)
        low, high = wilson_interval(wins, len(worlds))
        return {
            "success_rate": wins / len(worlds),
            "success_low": low,  # the 95% Wilson interval
            "success_high": high,
            "crash_rate": float(np.mean([getattr(w, "crashed", False) for w in worlds])),
            "final_distance": float(np.mean([w.distance_to_goal for w in worlds])),
        }

    def peer_caches(self) -> tuple[list[PeerCache], dict[str, str]]:
        return [], {**{name: NOT_APPLICABLE for name in DIFFUSERS_CACHES}, CACHE_DIT: CACHE_DIT_NOT_APPLICABLE}
