"""The distributed pipeline's collectives on a GPU (NCCL), checked against one process, with one rank.

    torchrun --nproc-per-node 1 examples/distributed_nccl_check.py     # a GPU machine: NCCL; else gloo on CPU

NCCL cannot run two ranks on one GPU, so this uses one rank and gives it a sequence-parallel group of
that rank alone: the K/V gathers, the gather of the frames, the input check and StepCache's reduction
and check then all run as NCCL collectives on the GPU. It prints, per chunk of a closed-loop episode,
the schedules and the largest differences of actions, frames and per-step similarities between the
distributed pipeline and the one-process pipeline on the same device; then chunk latencies of both,
with StepCache off and on; then one step's decision signals without and with the collective.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from stepcache import StepCacheBackend
from stepcache.models.dreamzero.parallel import ParallelGroups, init_distributed
from stepcache.models.dreamzero.pipeline import ChunkOutput, DreamZeroPipeline, DreamZeroPipelineConfig
from stepcache.models.dreamzero.world import ReachingWorld
from stepcache.state import schedule_string, velocity_signals

CUDA = torch.cuda.is_available()  # without a GPU: a dry run on CPU (gloo)
DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if CUDA else torch.device("cpu")


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def pipeline(parallel: ParallelGroups | None, cache: bool, check: bool = False) -> DreamZeroPipeline:
    pipe = DreamZeroPipeline.from_pretrained("dreamzero-mini", DreamZeroPipelineConfig(), parallel=parallel)
    pipe.transformer.to(DEVICE)
    if cache:
        backend = StepCacheBackend(None)  # the default config
        if parallel is None:
            backend.enable(pipe)
        else:
            backend.enable(pipe, process_group=pipe.decision_group, check_consistency=check)
    return pipe


def episode(pipe: DreamZeroPipeline, chunks: int = 6) -> tuple[list[ChunkOutput], float, float]:
    """A closed-loop episode: its chunks, their median latency in ms (after the first) and the final
    distance to the goal."""
    env = ReachingWorld()
    frame, state = env.reset(seed=1)
    generator = torch.Generator().manual_seed(0)
    outputs, latencies = [], []
    for _ in range(chunks):
        synchronize()
        started = time.perf_counter()
        out = pipe(frame, env.instruction, state, generator=generator)
        synchronize()
        latencies.append(1000 * (time.perf_counter() - started))
        outputs.append(out)
        frame, state = env.execute(out.actions[0])
    return outputs, statistics.median(latencies[1:]), env.distance_to_goal


def median_us(fn: Callable[[], object], repeats: int = 300) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def main() -> None:
    if CUDA:
        torch.cuda.set_device(DEVICE)
    init_distributed(device=DEVICE)
    print(f"backend {dist.get_backend()}, {torch.cuda.get_device_name() if CUDA else 'CPU'}")
    groups = ParallelGroups(model_group=dist.group.WORLD, sp_group=dist.group.WORLD,  # SP over this one rank
                            agreement_group=dist.new_group([0], backend="gloo"))  # where chunks' outcomes are agreed
    try:
        with torch.no_grad():
            mine, _, distance = episode(pipeline(groups, cache=True, check=True))
            reference, _, reference_distance = episode(pipeline(None, cache=True))
            for index, (a, b) in enumerate(zip(mine, reference)):
                similarity = max((abs(x - y) for x, y in zip(a.velocity_similarity, b.velocity_similarity)
                                  if x is not None), default=0.0)
                print(f"chunk {index}: {schedule_string(a.ran)} vs one process {schedule_string(b.ran)}, actions "
                      f"{np.abs(a.actions - b.actions).max():.1e}, frames {np.abs(a.frames - b.frames).max():.1e}, "
                      f"similarity {similarity:.1e}")
            print(f"distance to goal: distributed {distance:.3f}, one process {reference_distance:.3f}")
            for label, parallel in (("one process", None), ("distributed, 1 rank", groups)):
                for cache in (False, True):
                    _, latency, _ = episode(pipeline(parallel, cache))
                    print(f"{label}, StepCache {'on' if cache else 'off'}: {latency:.1f} ms per chunk "
                          "(median of 5 after a warm-up)")
            velocity = torch.randn(2, 2, 32, 32, device=DEVICE)
            previous = velocity + 0.1 * torch.randn_like(velocity)
            local = median_us(lambda: velocity_signals(velocity, previous))
            reduced = median_us(lambda: velocity_signals(velocity, previous, dist.group.WORLD))
            print(f"one step's signals: {local:.0f} us alone, {reduced:.0f} us with the all_reduce (median of 300)")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
