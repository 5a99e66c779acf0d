"""Rank workers for test_core_ranks.py: StepCache decisions over velocities split across ranks."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from stepcache import StepCacheBackend, StepCacheConfig, VelocityCache, get_stepcache_state
from stepcache.state import StepCacheState

STEPS = 16
BATCH = 4
# Per-step noise levels of the synthetic velocities: similarities of successive computed velocities then
# fall on both sides of the seed's thresholds (0.95, 0.93).
NOISE = (0.05, 0.1, 0.3, 0.15, 0.45, 0.1, 0.5, 0.25, 0.3, 0.1, 0.6, 0.35, 0.3, 0.5, 0.45, 0.6)

CONFIGS = {
    "seed": StepCacheConfig(),
    "seed_loose": StepCacheConfig(sim_thresholds=(0.9, 0.85), skip_countdowns=(3, 1)),
    "error_budget": StepCacheConfig(policy="error_budget", error_budget=0.05),
    "guards": StepCacheConfig(sim_thresholds=(0.85,), skip_countdowns=(4,), warmup_steps=3, final_steps=2,
                              max_skip_steps=2),
    "extrapolate": StepCacheConfig(sim_thresholds=(0.85,), skip_countdowns=(3,), reuse="extrapolate"),
    "static": StepCacheConfig(static_run_steps=(0, 1, 2, 6, 10, 13, 14, 15)),
}


def velocities(seed: int = 0, nan_at: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """The whole (unsharded) velocity of every step ``(BATCH, 3, 7, 9)``; ``nan_at=(step, flat index)``
    puts a NaN into sample 0 at that step."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(BATCH, 3, 7, 9, generator=generator)
    out = []
    for step, level in enumerate(NOISE):
        v = (1.0 + 0.03 * step) * base + level * torch.randn(BATCH, 3, 7, 9, generator=generator)
        if nan_at is not None and nan_at[0] == step:
            v[0].view(-1)[nan_at[1]] = float("nan")
        out.append(v)
    return out


def feature_bounds(world: int, width: int) -> list[int]:
    """Uneven cuts of ``width`` features into ``world`` shards (shards need not be equal)."""
    weights = [1 + 2 * r for r in range(world)]
    cuts = [0]
    for w in weights:
        cuts.append(cuts[-1] + width * w // sum(weights))
    cuts[-1] = width
    return cuts


def layout_of(rank: int, world: int, layout: str) -> dict[str, Any]:
    """Which part of the batch and which features this rank holds.

    ``sequence``: every sample, a shard of its features. ``batch``: one part of the samples (one CFG
    branch per rank), all features. ``batch_x_sequence`` (4 ranks): a half of the samples, a half of
    their features.
    """
    if layout == "sequence":
        return {"parts": None, "samples": slice(None), "shard": rank, "shards": world}
    if layout == "batch":
        per = BATCH // world
        return {"parts": (rank, world), "samples": slice(rank * per, (rank + 1) * per), "shard": 0, "shards": 1}
    if layout == "batch_x_sequence":
        half = BATCH // 2
        part = rank // 2
        return {"parts": (part, 2), "samples": slice(part * half, (part + 1) * half), "shard": rank % 2,
                "shards": 2}
    raise ValueError(layout)


def local_part(v: torch.Tensor, where: dict[str, Any]) -> torch.Tensor:
    flat = v[where["samples"]].flatten(1)
    cuts = feature_bounds(where["shards"], flat.shape[1])
    return flat[:, cuts[where["shard"]] : cuts[where["shard"] + 1]].clone()


def run_cache(cache: VelocityCache, sequence: list[torch.Tensor], action: bool = True) -> dict[str, Any]:
    """One generation through ``cache``; the model callable returns (velocity, action-like) so that
    reuse of a whole prediction tuple is covered."""
    outputs = []
    timesteps = [1.0 - i / STEPS for i in range(STEPS)]
    with cache.generation(STEPS):
        for step, (v, t) in enumerate(zip(sequence, timesteps)):
            prediction = cache.step(lambda v=v, step=step: (v, torch.full((2,), float(step))), timestep=t)
            outputs.append(prediction[0].clone())
    trace = cache.state.trace
    return {
        "ran": [r.ran for r in trace],
        "reasons": [r.reason for r in trace],
        "similarities": [r.similarity for r in trace],
        "errors": [r.estimated_error for r in trace],
        "outputs": outputs,
    }


def run_state(state: StepCacheState, sequence: list[torch.Tensor]) -> dict[str, Any]:
    """:func:`run_cache` through the state's own API (``should_run_step``, ``push_computed``,
    ``reused_prediction``), as the bundled pipeline and the diffusers hook use it."""
    outputs = []
    timesteps = [1.0 - i / STEPS for i in range(STEPS)]
    history: list[tuple[torch.Tensor, ...]] = []
    state.reset(STEPS)
    for step, (v, t) in enumerate(zip(sequence, timesteps)):
        if state.should_run_step(history, timestep=t):
            state.push_computed(history, (v, torch.full((2,), float(step))))
            outputs.append(v.clone())
        else:
            outputs.append(state.reused_prediction(history)[0].clone())
    trace = state.trace
    return {
        "ran": [r.ran for r in trace],
        "reasons": [r.reason for r in trace],
        "similarities": [r.similarity for r in trace],
        "errors": [r.estimated_error for r in trace],
        "outputs": outputs,
    }


def core_worker(rank: int, world: int) -> dict[str, Any]:
    group = dist.group.WORLD
    layouts = ["sequence", "batch"] + (["batch_x_sequence"] if world == 4 else [])
    results: dict[str, Any] = {"decisions": {}, "reference": {}}
    whole = velocities()
    for name, config in CONFIGS.items():
        results["reference"][name] = run_cache(VelocityCache(config), whole)
        for layout in layouts:
            where = layout_of(rank, world, layout)
            mine = [local_part(v, where) for v in whole]
            if where["parts"] is None:
                result = run_cache(VelocityCache(config, process_group=group, check_consistency=True), mine)
            else:  # VelocityCache takes no batch_part: drive the state as the pipelines do
                state = StepCacheState(config, process_group=group, check_consistency=True,
                                       batch_part=where["parts"])
                result = run_state(state, mine)
            result["where"] = where
            results["decisions"][(name, layout)] = result

    # A NaN in one rank's shard only: every rank (and one process on the whole velocity) runs that step.
    where = layout_of(rank, world, "sequence")
    width = whole[0][0].numel()
    nan_feature = feature_bounds(world, width)[world - 1]  # inside the last rank's shard
    with_nan = velocities(nan_at=(5, nan_feature))  # step 5 runs
    results["nan_reference"] = run_cache(VelocityCache(CONFIGS["seed_loose"]), with_nan)
    results["nan"] = run_cache(
        VelocityCache(CONFIGS["seed_loose"], process_group=group, check_consistency=True),
        [local_part(v, where) for v in with_nan],
    )
    results["nan_rank"] = world - 1

    # The backend path: enable(pipeline, process_group=...) gives the pipeline's state the group.
    class DreamZeroPipeline:  # matched by class name, as the bundled pipeline is
        pass

    pipeline = DreamZeroPipeline()
    backend = StepCacheBackend({"velocity_sim_thresholds": [0.9, 0.85], "velocity_skip_countdowns": [3, 1]})
    backend.enable(pipeline, process_group=group, check_consistency=True)
    backend.refresh(pipeline, STEPS)
    state = get_stepcache_state(pipeline)
    history: list[tuple[torch.Tensor]] = []
    ran = []
    for v in whole:
        run = state.should_run_step(history)
        if run:
            state.push_computed(history, (local_part(v, where),))
        ran.append(run)
    results["backend"] = {"ran": ran, "group_is_world": state.process_group is group}

    # A forced disagreement: rank 1 is given another config. The check before the first decision
    # raises on every rank, naming the step and the ranks, instead of leaving a rank in a collective.
    config = CONFIGS["seed"] if rank != 1 else CONFIGS["seed_loose"]
    started = time.monotonic()
    try:
        run_cache(VelocityCache(config, process_group=group, check_consistency=True),
                  [local_part(v, where) for v in whole])
        results["mismatch"] = None
    except RuntimeError as err:
        results["mismatch"] = str(err)
    results["mismatch_s"] = time.monotonic() - started

    # Another: rank 0 starts a generation of another length (the check compares the step counts).
    cache = VelocityCache(CONFIGS["seed"], process_group=group, check_consistency=True)
    try:
        with cache.generation(STEPS if rank != 0 else STEPS - 1):
            cache.step(lambda: local_part(whole[0], where), timestep=1.0)
        results["length_mismatch"] = None
    except RuntimeError as err:
        results["length_mismatch"] = str(err)

    # The same without the check (the default): the fingerprint at each generation's start still makes
    # every rank fail together, naming what differs, instead of one rank succeeding.
    for key, config, steps in (
        ("start_config", CONFIGS["seed"] if rank != 1 else CONFIGS["seed_loose"], STEPS),
        ("start_steps", CONFIGS["seed"], STEPS if rank != 0 else STEPS - 1),
    ):
        cache = VelocityCache(config, process_group=group)
        started = time.monotonic()
        try:
            with cache.generation(steps):
                for v in whole[:steps]:
                    cache.step(lambda v=v: local_part(v, where))
            results[key] = None
        except RuntimeError as err:
            results[key] = str(err)
        results[key + "_s"] = time.monotonic() - started
    # ...and a rank whose own arguments are refused stops every rank at the start.
    cache = VelocityCache(StepCacheConfig(static_run_steps=(0, 1, 12)), process_group=group)
    try:
        cache.reset(STEPS if rank != 0 else 8)  # rank 0's schedule runs past its end: a local ValueError
        results["start_refused"] = None
    except (RuntimeError, ValueError) as err:
        results["start_refused"] = f"{type(err).__name__}: {err}"
    dist.barrier()
    return results
