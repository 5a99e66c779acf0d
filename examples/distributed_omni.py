"""Omni on several ranks: the bundled DreamZero-mini spread over a torchrun job, StepCache on.

    torchrun --nproc-per-node 2 examples/distributed_omni.py --cfg-parallel 2                       # CFG parallel
    torchrun --nproc-per-node 2 examples/distributed_omni.py --sequence-parallel 2                  # sequence parallel
    torchrun --nproc-per-node 4 examples/distributed_omni.py --cfg-parallel 2 --sequence-parallel 2
    torchrun --nproc-per-node 2 examples/distributed_omni.py --cfg-parallel 2 --compare            # vs one process

Every rank runs this same script: it builds the same ``Omni(..., parallel=...)`` (which starts the
process group from torchrun's environment: gloo on CPU, NCCL with ``--device cuda``), plays the same
closed-loop episode of the reaching world, and gets the same actions. Rank 0 prints one line per
chunk: StepCache's schedule (R = forward, . = reused), the chunk's latency, the distance to the goal,
whether every rank holds the same actions, and with ``--compare`` how far they are from a
one-process ``Omni``'s. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
import torch.distributed as dist

from stepcache.models.dreamzero import ReachingWorld
from stepcache.omni import Omni


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-parallel", type=int, default=1, choices=(1, 2), help="1, or 2: a CFG branch per rank")
    parser.add_argument("--sequence-parallel", type=int, default=None,
                        help="ranks sharing the video tokens (default: the ranks left: world / cfg-parallel)")
    parser.add_argument("--chunks", type=int, default=6, help="chunks of the episode")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per chunk")
    parser.add_argument("--no-cache", action="store_true", help="run every step (the reference)")
    parser.add_argument("--check", action="store_true", help="compare every StepCache decision across the ranks")
    parser.add_argument("--compare", action="store_true", help="rank 0 also runs one process's Omni on each chunk")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda (one GPU per rank, NCCL)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a rank per core; more threads would only compete for the same cores
    logging.basicConfig(level=logging.WARNING)
    cache_backend = None if args.no_cache else "step_cache"
    settings = dict(model="dreamzero-mini", cache_backend=cache_backend, seed=args.seed,
                    pipeline_config={"num_inference_steps": args.steps})
    parallel = {"cfg_parallel": args.cfg_parallel, "sequence_parallel": args.sequence_parallel,
                "check_consistency": args.check}
    omni = Omni(**settings, parallel=parallel, device=args.device)
    try:
        rank, world = omni.rank, omni.world_size
        nccl = dist.get_backend() == "nccl"
        collective_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        single = Omni(**settings) if args.compare and rank == 0 else None
        env = ReachingWorld()
        frame, state = env.reset(seed=args.seed)
        if rank == 0:
            dit = omni.pipeline.dit
            print(f"{world} ranks: cfg_parallel={args.cfg_parallel}, sequence_parallel={dit.sp_size}; "
                  f"instruction {env.instruction!r}; StepCache {'off' if args.no_cache else 'on'}")
        reached = None
        for chunk in range(args.chunks):
            started = time.perf_counter()
            out = omni.generate(frame, env.instruction, state)
            elapsed = time.perf_counter() - started
            # NCCL gathers CUDA tensors only; gloo CPU ones
            actions = torch.as_tensor(out.actions, device=collective_device)
            gathered = [torch.empty_like(actions) for _ in range(world)]
            dist.all_gather(gathered, actions)  # every rank executes the actions: the same bits everywhere?
            agree = all(torch.equal(g, actions) for g in gathered)
            compared = ""
            if single is not None:
                reference = single.generate(frame, env.instruction, state)
                same = "same" if reference.stats.schedule == out.stats.schedule else reference.stats.schedule
                compared = (f", vs one process: actions {np.abs(out.actions - reference.actions).max():.1e}, "
                            f"frames {np.abs(out.frames - reference.frames).max():.1e}, schedule {same}")
            frame, state = env.execute(out.actions)
            if rank == 0:
                print(f"chunk {chunk}: {out.stats.schedule} {1000 * elapsed:6.1f} ms, distance to goal "
                      f"{env.distance_to_goal:.3f}, ranks agree: {agree}{compared}")
            if env.success and reached is None:
                reached = chunk
        if rank == 0:
            print("goal reached" + (f" after chunk {reached}" if reached is not None else ": no"))
        if single is not None:
            single.close()
    finally:
        omni.close()  # ends the process group it started


if __name__ == "__main__":
    main()
