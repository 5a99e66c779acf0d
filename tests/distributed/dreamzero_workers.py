"""Rank workers for test_dreamzero_parallel.py: the bundled DiT under sequence and CFG parallelism."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from stepcache import StepCacheConfig, VelocityCache
from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig, KVCache
from stepcache.models.dreamzero.parallel import ParallelGroups, ParallelWorldActionDiT

# 16x16 frames of 4x4 patches: 4 rows of patches per frame, 8 per two-frame chunk (2 or 4 ranks).
TINY = DreamZeroMiniConfig(
    frame_size=16, patch_size=4, future_frames=2, action_horizon=4, hidden_size=32, num_layers=2, num_heads=2,
    pixel_channels=5, timestep_frequencies=16, coordinate_octaves=2,
)
GUIDANCE = 5.0
BATCH = 2
LAYOUTS = {2: {"sp2": (1, 2), "cfg2": (2, 1)}, 4: {"sp4": (1, 4), "cfg2xsp2": (2, 2)}}  # (cfg, sp)


def tiny_model() -> CausalWorldActionDiT:
    """A random model whose every weight (the zero-initialised heads too) is non-zero."""
    torch.manual_seed(0)
    model = CausalWorldActionDiT(TINY).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = TINY.frame_size
    return {
        "frame": torch.rand(BATCH, size, size, generator=generator) * 2 - 1,
        "video": torch.randn(BATCH, TINY.future_frames, size, size, generator=generator),
        "actions": torch.randn(BATCH, TINY.action_horizon, TINY.action_dim, generator=generator),
        "state": torch.rand(BATCH, TINY.state_dim, generator=generator) * 2 - 1,
        "instruction": torch.tensor([0, 2])[:BATCH],
    }


class SingleProcessDiT:
    """The reference: one forward over the batch [cond; uncond] and the guidance, as the pipeline does."""

    def __init__(self, model: CausalWorldActionDiT) -> None:
        self.model = model

    def _rows(self, instruction: torch.Tensor) -> torch.Tensor:
        return torch.cat([instruction, torch.full_like(instruction, TINY.null_instruction)])

    def prefill(self, frames, instruction, cache) -> None:
        self.model.prefill(frames.repeat(2, 1, 1), self._rows(instruction), cache)

    def shard_video(self, video):
        return video.clone()

    def __call__(self, video, actions, state, t_video, t_action, instruction, cache):
        out = self.model(video.repeat(2, 1, 1, 1), actions.repeat(2, 1, 1), state.repeat(2, 1), t_video.repeat(2),
                         t_action.repeat(2), self._rows(instruction), cache)
        cond, uncond = out.video[:BATCH], out.video[BATCH:]
        return uncond + GUIDANCE * (cond - uncond), out.action[:BATCH]


def euler_chunk(dit, kv_cache, cache: VelocityCache | None, data, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: prefill the observed frame, then ``steps`` Euler steps of the flow ODE from the noise
    (this rank's shard of the video, the whole actions)."""
    with torch.no_grad():
        dit.prefill(data["frame"], data["instruction"], kv_cache)
        video, actions = dit.shard_video(data["video"]), data["actions"].clone()
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        with cache.generation(steps) if cache is not None else contextlib.nullcontext():
            for i in range(steps):
                t = torch.full((BATCH,), 1000.0 * float(sigmas[i]))

                def forward(video=video, actions=actions, t=t):
                    out = dit(video, actions, data["state"], t, t, data["instruction"], kv_cache)
                    return tuple(out) if isinstance(out, tuple) else (out.video, out.action)

                video_velocity, action_velocity = cache.step(forward, timestep=float(sigmas[i])) if cache else forward()
                step = float(sigmas[i + 1] - sigmas[i])
                video, actions = video + step * video_velocity, actions + step * action_velocity
    return video, actions


def dreamzero_worker(rank: int, world: int) -> dict[str, Any]:
    model = tiny_model()
    reference = SingleProcessDiT(model)
    results: dict[str, Any] = {}
    for name, (cfg_parallel, sp) in LAYOUTS[world].items():
        groups = ParallelGroups.create(cfg_parallel=cfg_parallel, sequence_parallel=sp)
        dit = ParallelWorldActionDiT(model, groups, guidance_scale=GUIDANCE)
        result: dict[str, Any] = {"rows": dit.video_rows, "branch": dit.branch, "sp": dit.sp_size}

        # Two prefilled frames, then one forward: the rank's shard of the guided video velocity and the
        # conditional action velocity, against one process on the whole batch.
        data = inputs(seed=10)
        mine, whole = KVCache(), KVCache()
        t = torch.full((BATCH,), 700.0)
        with torch.no_grad():
            for cache, runner in ((mine, dit), (whole, reference)):
                runner.prefill(data["frame"], data["instruction"], cache)
                runner.prefill(data["frame"].flip(-1), data["instruction"], cache)
            out = dit(dit.shard_video(data["video"]), data["actions"], data["state"], t, t, data["instruction"], mine)
            video_ref, action_ref = reference(data["video"], data["actions"], data["state"], t, t,
                                              data["instruction"], whole)
        branch_rows = slice(None) if cfg_parallel == 1 else slice(dit.branch * BATCH, (dit.branch + 1) * BATCH)
        result["forward"] = {
            "video": out.video, "action": out.action, "video_ref": video_ref, "action_ref": action_ref,
            "keys": [k for k in mine.keys], "keys_ref": [k[branch_rows] for k in whole.keys],
            "whole_video": dit.gather_video(out.video) if sp > 1 else out.video,
        }

        # A denoising loop with StepCache over the (sharded) guided velocity, against one process. The
        # thresholds sit among the similarities this loop sees, so that it both skips and runs.
        steps = 10
        probe = VelocityCache(StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,)))
        euler_chunk(reference, KVCache(), probe, inputs(seed=11), steps)
        seen = sorted(s for s in probe.state.similarities if s is not None)
        # Midway across the widest gap between two similarities: far from any value seen, so float
        # rounding (the ranks add their partial sums in another order) cannot tip a decision.
        low, high = max(zip(seen[1:-2], seen[2:-1]), key=lambda pair: pair[1] - pair[0])
        config = StepCacheConfig(sim_thresholds=((low + high) / 2,), skip_countdowns=(2,))
        single = VelocityCache(config)
        video_ref, action_ref = euler_chunk(reference, KVCache(), single, inputs(seed=11), steps)
        cache = VelocityCache(config, process_group=dit.decision_group, check_consistency=True)
        video, actions = euler_chunk(dit, KVCache(), cache, inputs(seed=11), steps)
        result["loop"] = {
            "ran": [r.ran for r in cache.state.trace], "ran_ref": [r.ran for r in single.state.trace],
            "video": video, "video_ref": video_ref, "actions": actions, "actions_ref": action_ref,
        }
        results[name] = result

    # (100 consecutive chunks on these layouts: through the bundled pipeline, in pipeline_workers.py.)
    name = list(LAYOUTS[world])[-1]
    cfg_parallel, sp = LAYOUTS[world][name]
    dit = ParallelWorldActionDiT(model, ParallelGroups.create(cfg_parallel=cfg_parallel, sequence_parallel=sp),
                                 guidance_scale=GUIDANCE)

    # Layouts the model or the world cannot take are refused with the numbers, on every rank alike.
    errors = {}
    for label, make in (
        ("world", lambda: ParallelGroups.create(cfg_parallel=2, sequence_parallel=world)),
        ("rows", lambda: ParallelWorldActionDiT(
            CausalWorldActionDiT(DreamZeroMiniConfig(frame_size=8, patch_size=4, hidden_size=8, num_layers=1,
                                                     num_heads=1)),
            ParallelGroups.create(sequence_parallel=world) if world == 4 else ParallelGroups(None),
            guidance_scale=GUIDANCE)),
        ("guidance", lambda: ParallelWorldActionDiT(model, ParallelGroups.create(cfg_parallel=2,
                                                                                 sequence_parallel=world // 2),
                                                    guidance_scale=1.0)),
    ):
        try:
            make()
            errors[label] = None
        except ValueError as err:
            errors[label] = str(err)
    results["errors"] = errors

    # A forced disagreement in the model loop: rank 1's StepCache has another config. The check before
    # the first decision raises on every rank, before any forward's collectives.
    config = StepCacheConfig() if rank != 1 else StepCacheConfig(sim_thresholds=(0.5,), skip_countdowns=(1,))
    try:
        euler_chunk(dit, KVCache(), VelocityCache(config, process_group=dit.decision_group, check_consistency=True),
                    inputs(seed=5), steps=4)
        results["mismatch"] = None
    except RuntimeError as err:
        results["mismatch"] = str(err)
    return results
