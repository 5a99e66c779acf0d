"""Rank worker for test_diffusers_ranks.py: the diffusers hook on a tiny random Wan transformer whose
output stays sharded across ranks, and with one CFG branch per rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models.cache_utils import CacheMixin

from stepcache import StepCacheConfig
from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats, remove_step_cache

STEPS = 12
GUIDANCE = 4.0
NEVER_SKIP = StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,))
SHAPE = (1, 4, 2, 8, 8)  # (B, C, F, H, W) latents: 2 frames of 8x8 -> 4x4 tokens each (patch 1x2x2)


def tiny_wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()


class ShardedOutput(torch.nn.Module, CacheMixin):
    """A transformer whose output stays sharded: each rank returns its rows (height) of the velocity, as
    a sequence-parallel model that never gathers its output would (``world=1``: the whole output)."""

    def __init__(self, transformer: torch.nn.Module, rank: int, world: int) -> None:
        super().__init__()
        self.transformer, self.rank, self.world = transformer, rank, world

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=False):
        out = self.transformer(hidden_states=hidden_states, timestep=timestep,
                               encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return (out.chunk(self.world, dim=3)[self.rank].contiguous(),)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(*SHAPE, generator=generator)
    cond, uncond = torch.randn(2, SHAPE[0], 4, 16, generator=generator)
    return latents, cond, uncond


def _sigmas() -> list[float]:
    return [1.0 - i / STEPS for i in range(STEPS + 1)]


def sharded_output_loop(model: ShardedOutput) -> torch.Tensor:
    """Wan-style CFG (two calls per step) over a sharded output: each rank steps its rows of the latents,
    then the rows are gathered for the next call."""
    latents, cond, uncond = _data()
    sigmas = _sigmas()
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        t = torch.full((SHAPE[0],), 1000.0 * sigma)
        with model.cache_context("cond"):
            v_cond = model(hidden_states=latents, timestep=t, encoder_hidden_states=cond)[0]
        with model.cache_context("uncond"):
            v_uncond = model(hidden_states=latents, timestep=t, encoder_hidden_states=uncond)[0]
        mine = latents.chunk(model.world, dim=3)[model.rank]
        mine = mine + (sigma_next - sigma) * (v_uncond + GUIDANCE * (v_cond - v_uncond))
        if model.world > 1:
            parts = [torch.empty_like(mine) for _ in range(model.world)]
            dist.all_gather(parts, mine.contiguous())
            latents = torch.cat(parts, dim=3)
        else:
            latents = mine
    return latents


def branch_per_rank_loop(model: torch.nn.Module, rank: int | None) -> torch.Tensor:
    """CFG parallel: rank 0 calls the conditional branch, rank 1 the unconditional one, and the two
    predictions are exchanged (``rank=None``: one process calls both)."""
    latents, cond, uncond = _data()
    sigmas = _sigmas()
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        t = torch.full((SHAPE[0],), 1000.0 * sigma)
        predictions = []
        for branch, (name, embeds) in enumerate((("cond", cond), ("uncond", uncond))):
            if rank is not None and branch != rank:
                continue
            with model.cache_context(name):
                predictions.append(model(hidden_states=latents, timestep=t, encoder_hidden_states=embeds)[0])
        if rank is not None:
            parts = [torch.empty_like(predictions[0]) for _ in range(2)]
            dist.all_gather(parts, predictions[0].contiguous())
            predictions = parts
        v_cond, v_uncond = predictions
        latents = latents + (sigma_next - sigma) * (v_uncond + GUIDANCE * (v_cond - v_uncond))
    return latents


def _threshold_between_seen_similarities(run) -> StepCacheConfig:
    """A threshold midway across the widest gap between the similarities a never-skipping run sees, so
    that the schedule both skips and runs and float rounding cannot tip a decision."""
    seen = sorted(s for s in run() if s is not None)
    low, high = max(zip(seen[1:-2], seen[2:-1]), key=lambda pair: pair[1] - pair[0])
    return StepCacheConfig(sim_thresholds=((low + high) / 2,), skip_countdowns=(2,))


def _trace(model) -> dict[str, Any]:
    stats = get_step_cache_stats(model)
    return {"ran": [r.ran for r in stats.trace], "reasons": [r.reason for r in stats.trace],
            "similarities": stats.similarities, "forwards": stats.forwards}


def diffusers_worker(rank: int, world: int) -> dict[str, Any]:
    group = dist.group.WORLD
    results: dict[str, Any] = {}
    transformer = tiny_wan()
    with torch.no_grad():
        # 1. The output stays sharded along the height: the hook reduces its signals over the group.
        single = ShardedOutput(transformer, 0, 1)

        def probe():
            apply_step_cache(single, NEVER_SKIP)
            sharded_output_loop(single)
            seen = get_step_cache_stats(single).similarities
            remove_step_cache(single)
            return seen

        config = _threshold_between_seen_similarities(probe)
        apply_step_cache(single, config)
        latents_ref = sharded_output_loop(single)
        reference = _trace(single)
        remove_step_cache(single)
        sharded = ShardedOutput(transformer, rank, world)
        apply_step_cache(sharded, config, process_group=group, check_consistency=True)
        latents = sharded_output_loop(sharded)
        results["sharded"] = {"trace": _trace(sharded), "reference": reference, "latents": latents,
                              "latents_ref": latents_ref}

        # 2. One CFG branch per rank: batch_part puts each rank's branch in its place of the batch.
        def probe_branches():
            apply_step_cache(transformer, NEVER_SKIP)
            branch_per_rank_loop(transformer, None)
            seen = get_step_cache_stats(transformer).similarities
            remove_step_cache(transformer)
            return seen

        config = _threshold_between_seen_similarities(probe_branches)
        apply_step_cache(transformer, config)
        latents_ref = branch_per_rank_loop(transformer, None)
        reference = _trace(transformer)
        remove_step_cache(transformer)
        apply_step_cache(transformer, config, process_group=group, check_consistency=True, batch_part=(rank, 2))
        latents = branch_per_rank_loop(transformer, rank)
        results["branches"] = {"trace": _trace(transformer), "reference": reference, "latents": latents,
                               "latents_ref": latents_ref}
        remove_step_cache(transformer)
    return results
