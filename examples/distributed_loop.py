"""StepCache on the bundled world-action DiT split across ranks (torch.distributed, gloo on CPU).

    torchrun --nproc-per-node 2 examples/distributed_loop.py                   # sequence parallel, 2 ranks
    torchrun --nproc-per-node 2 examples/distributed_loop.py --cfg-parallel 2  # one CFG branch per rank
    torchrun --nproc-per-node 4 examples/distributed_loop.py --cfg-parallel 2  # both: 2 CFG x 2 SP

Every rank plays the same closed-loop episode of the reaching world with the bundled DreamZero-mini
model: per chunk, the observed frame is prefilled into the KV cache, then the video latents and the
actions are denoised with two UniPC schedulers, as the bundled pipeline does. Under sequence
parallelism each rank holds, steps and caches only its rows of the video; StepCache decides on the
guided video velocity with its signals reduced over the ranks (``process_group``), so every rank skips
the same steps. ``--check`` also compares every decision across the ranks (two small all_gathers per
step). Rank 0 prints one line per chunk. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from diffusers import UniPCMultistepScheduler

from stepcache import StepCacheConfig, VelocityCache
from stepcache.models.dreamzero import ReachingWorld, load_model
from stepcache.models.dreamzero.model import KVCache
from stepcache.models.dreamzero.parallel import ParallelGroups, ParallelWorldActionDiT
from stepcache.models.dreamzero.world import instruction_index


def denoise_chunk(
    dit: ParallelWorldActionDiT,
    kv_cache: KVCache,
    cache: VelocityCache | None,
    frame: torch.Tensor,
    instruction: torch.Tensor,
    state: torch.Tensor,
    generator: torch.Generator,
    steps: int = 16,
    flow_shift: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk on this rank: prefill ``frame`` ``(B, S, S)`` (latent units), then ``steps`` UniPC
    steps of the video (this rank's shard) and the actions (whole). Returns both, in model units."""
    model = dit.model.config
    dit.prefill(frame, instruction, kv_cache)
    schedulers = [UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=flow_shift) for _ in range(2)]
    for scheduler in schedulers:
        scheduler.set_timesteps(steps)
    batch = frame.shape[0]
    # The same noise on every rank (same generator state), each rank keeping its rows.
    video = dit.shard_video(torch.randn(batch, model.future_frames, model.frame_size, model.frame_size,
                                        generator=generator))
    actions = torch.randn(batch, model.action_horizon, model.action_dim, generator=generator)
    sigmas = schedulers[0].sigmas.tolist()
    with cache.generation(steps) if cache is not None else contextlib.nullcontext():
        for i, t in enumerate(schedulers[0].timesteps):
            timestep = t.float().expand(batch)

            def forward(video=video, actions=actions, timestep=timestep):
                out = dit(video, actions, state, timestep, timestep, instruction, kv_cache)
                return out.video, out.action

            video_velocity, action_velocity = cache.step(forward, timestep=sigmas[i]) if cache else forward()
            video = schedulers[0].step(video_velocity, t, video).prev_sample
            actions = schedulers[1].step(action_velocity, t, actions).prev_sample
    return video, actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-parallel", type=int, default=1, choices=(1, 2), help="ranks per CFG pair")
    parser.add_argument("--chunks", type=int, default=6, help="chunks of the episode")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per chunk")
    parser.add_argument("--no-cache", action="store_true", help="run every step (the reference)")
    parser.add_argument("--check", action="store_true", help="compare every decision across the ranks")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun's environment gives the rank, world size and rendezvous
    torch.set_num_threads(1)  # a rank per core; more threads would only compete for the same cores
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.WARNING)
    try:
        if world % args.cfg_parallel:
            raise SystemExit(f"--cfg-parallel {args.cfg_parallel} does not divide the {world} ranks")
        groups = ParallelGroups.create(cfg_parallel=args.cfg_parallel, sequence_parallel=world // args.cfg_parallel)
        model = load_model("dreamzero-mini")
        dit = ParallelWorldActionDiT(model, groups, guidance_scale=5.0)
        cache = None if args.no_cache else VelocityCache(
            StepCacheConfig(), process_group=dit.decision_group, check_consistency=args.check
        )
        world_env = ReachingWorld()
        frame, state = world_env.reset(seed=args.seed)
        instruction = torch.tensor([instruction_index(world_env.instruction)])
        kv_cache = KVCache()
        generator = torch.Generator().manual_seed(args.seed)
        reached = None
        if rank == 0:
            print(f"{world} ranks: cfg_parallel={args.cfg_parallel}, sequence_parallel={dit.sp_size}; "
                  f"instruction {world_env.instruction!r}; StepCache {'off' if cache is None else 'on'}")
        with torch.no_grad():
            for chunk in range(args.chunks):
                if chunk % 4 == 0:
                    kv_cache.reset()  # DreamZero clears the context every 4 chunks
                started = time.perf_counter()
                latent = torch.as_tensor(frame, dtype=torch.float32)[None] * 2.0 - 1.0
                model_state = torch.as_tensor(state, dtype=torch.float32)[None] * 2.0 - 1.0
                _, actions = denoise_chunk(dit, kv_cache, cache, latent, instruction, model_state, generator,
                                           steps=args.steps)
                elapsed = time.perf_counter() - started
                moves = (actions[0] * model.config.action_scale).numpy().astype(np.float64)
                # Every rank executes the actions; they must be the same bits everywhere.
                gathered = [torch.empty_like(actions) for _ in range(world)]
                dist.all_gather(gathered, actions)
                agree = all(torch.equal(g, actions) for g in gathered)
                frame, state = world_env.execute(moves)
                if rank == 0:
                    schedule = cache.state.schedule if cache is not None else "R" * args.steps
                    print(f"chunk {chunk}: {schedule} {1000 * elapsed:6.1f} ms, distance to goal "
                          f"{world_env.distance_to_goal:.3f}, ranks agree: {agree}")
                if world_env.success and reached is None:
                    reached = chunk
        if rank == 0:
            print("goal reached" + (f" after chunk {reached}" if reached is not None else ": no"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
