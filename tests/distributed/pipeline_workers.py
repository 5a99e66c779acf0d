"""The bundled pipeline and ``Omni`` on several ranks (test_pipeline_ranks.py): what each rank runs, and
the same runs in one process (the references, computed by the test itself).

Every run here is deterministic given its arguments, so the test computes the single-process
reference with the same functions, without a group.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepcache import StepCacheBackend, StepCacheState, get_stepcache_config
from stepcache.models.dreamzero.parallel import ParallelGroups
from stepcache.models.dreamzero.pipeline import DecisionGroup, DreamZeroPipeline, DreamZeroPipelineConfig
from tests.distributed.dreamzero_workers import GUIDANCE, TINY, tiny_model

STEPS = 6
CHUNKS = 3
INSTRUCTION = 1
PIPELINE = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "context_reset_chunks": 2}
# (cfg_parallel, sequence_parallel) per layout; the options run on each, the batched chunks too.
LAYOUTS = {2: {"sp2": (1, 2), "cfg2": (2, 1)}, 4: {"cfg2xsp2": (2, 2), "sp4": (1, 4)}}
# Every StepCache option on the sharded guided velocity (user field names, as Omni takes them). The
# similarity thresholds and the error budget are filled in by the test (see ``options``); the last
# two also change how the pipeline steps (diffusers' schedulers stepped directly, decoupled noise).
OPTION_NAMES = ("seed_rule", "error_budget", "planned", "static", "extrapolate", "solver_aware", "direct_decoupled")
HUNDRED_CHUNKS = {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [2]}  # "RR." per 3 steps


def options(threshold: float, budget: float) -> dict[str, dict[str, Any]]:
    """The cache config and pipeline settings of every option, given the seed rule's threshold and
    the error budget (chosen by the test so that no decision sits near them)."""
    rule = {"velocity_sim_thresholds": [threshold], "velocity_skip_countdowns": [2]}
    return {
        "seed_rule": {"cache": rule},
        "error_budget": {"cache": {"step_cache_dit_policy": "error_budget", "velocity_error_budget": budget}},
        "planned": {"cache": {"step_cache_dit_policy": "planned", "step_cache_dit_forward_budget": 4}},
        "static": {"cache": {"step_cache_dit_static_steps": [0, 1, 3, 5]}},
        "extrapolate": {"cache": {**rule, "velocity_reuse": "extrapolate"}},
        "solver_aware": {"cache": {**rule, "step_cache_dit_solver_aware": True}},
        "direct_decoupled": {"cache": {**rule, "step_cache_dit_solver_aware": True},
                             "pipeline": {"replay_schedulers": False, "decoupled_video_noise": True}},
    }


def episode_inputs(chunks: int, seed: int, batch: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Observations (grey frames in [0, 1]) and states per chunk; ``batch``: a leading batch dimension."""
    rng = np.random.default_rng(seed)
    shape = () if batch is None else (batch,)
    return [(rng.random((*shape, TINY.frame_size, TINY.frame_size), dtype=np.float32),
             rng.random((*shape, TINY.state_dim), dtype=np.float32)) for _ in range(chunks)]


def make_pipeline(option: dict[str, Any], groups: ParallelGroups | None, steps: int = STEPS,
                  check: bool = True) -> DreamZeroPipeline:
    """The tiny model in the bundled pipeline, StepCache enabled through the backend (its decisions
    reduced over the pipeline's group on several ranks, and checked)."""
    config = DreamZeroPipelineConfig(**{**PIPELINE, "num_inference_steps": steps, **option.get("pipeline", {})})
    pipe = DreamZeroPipeline(tiny_model(), config, parallel=groups)
    if option.get("cache") is not None:
        backend = StepCacheBackend(option["cache"])
        if groups is None:
            backend.enable(pipe)
        else:
            backend.enable(pipe, process_group=pipe.decision_group, check_consistency=check)
    return pipe


def _chunk(out: Any) -> dict[str, Any]:
    return {"actions": out.actions, "frames": out.frames, "ran": out.ran, "similarity": out.velocity_similarity,
            "trace": [(record.reason, record.similarity, record.estimated_error) for record in out.trace]}


def run_episode(pipe: DreamZeroPipeline, chunks: int = CHUNKS, seed: int = 0) -> list[dict[str, Any]]:
    """``chunks`` chunks of one episode through ``pipe(...)`` (its own context)."""
    generator = torch.Generator().manual_seed(seed)
    return [_chunk(pipe(observation, INSTRUCTION, state, generator=generator))
            for observation, state in episode_inputs(chunks, seed)]


def run_batched(pipe: DreamZeroPipeline, check: bool = True) -> list[dict[str, Any]]:
    """The serving engine's path, by hand: episode A (one sample, one chunk already in its context) and
    episode B (two samples, empty context) in one batch with padded KV contexts; B joins two steps
    after A started; each decides from its own StepCache state."""
    config = get_stepcache_config(pipe)

    def state() -> StepCacheState:
        group = pipe.decision_group
        return StepCacheState(config) if group is None else StepCacheState(config, process_group=group,
                                                                           check_consistency=check)

    episode_a, episode_b = pipe.new_context(torch.Generator().manual_seed(1)), pipe.new_context(
        torch.Generator().manual_seed(2))
    state_a, state_b = state(), state()
    (first, second), ((frames_b, states_b),) = episode_inputs(2, seed=7), episode_inputs(1, seed=8, batch=2)
    pipe.run_chunk(pipe.begin_chunk(episode_a, first[0], INSTRUCTION, first[1], cache_state=state_a))
    job_a = pipe.begin_chunk(episode_a, second[0], INSTRUCTION, second[1], cache_state=state_a)
    assert not pipe.prefill([job_a])
    group_a = DecisionGroup([job_a], state_a)
    for _ in range(2):
        assert not pipe.denoise_step([group_a])
    job_b = pipe.begin_chunk(episode_b, frames_b, 2, states_b, cache_state=state_b)
    assert not pipe.prefill([job_b])
    groups = [group_a, DecisionGroup([job_b], state_b)]
    while not all(group.done for group in groups):
        assert not pipe.denoise_step([group for group in groups if not group.done])
    return [_chunk(job.finish(pipe.config.decoupled_video_noise)) for job in (job_a, job_b)]


def hundred_chunks(pipe: DreamZeroPipeline) -> list[dict[str, Any]]:
    """100 consecutive short chunks of one episode (the context reset every 2)."""
    return run_episode(pipe, chunks=100, seed=11)


def omni_run(model_dir: str, cache_config: dict[str, Any], parallel: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Two chunks of Omni's implicit session, then two of an explicit session."""
    from stepcache.omni import Omni

    omni = Omni(model=model_dir, cache_backend="step_cache", cache_config=cache_config, pipeline_config=PIPELINE,
                seed=3, parallel=parallel)
    try:
        outputs = []
        inputs = episode_inputs(4, seed=21)
        for observation, state in inputs[:2]:
            out = omni.generate(observation, INSTRUCTION, state)
            outputs.append({"actions": out.actions, "frames": out.frames, "ran": out.stats.ran})
        with omni.open_session(seed=5) as session:
            for observation, state in inputs[2:]:
                out = session.generate(observation, 2, state)
                outputs.append({"actions": out.actions, "frames": out.frames, "ran": out.stats.ran})
        return outputs
    finally:
        omni.close()


def _error_of(call) -> tuple[str | None, float]:
    """What ``call`` raised (None: nothing), and after how many seconds."""
    started = time.monotonic()
    try:
        call()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}", time.monotonic() - started
    return None, time.monotonic() - started


def pipeline_worker(rank: int, world: int, option_configs: dict[str, dict[str, Any]],
                    model_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {"layouts": {}}
    for name, (cfg_parallel, sp) in LAYOUTS[world].items():
        groups = ParallelGroups.create(cfg_parallel=cfg_parallel, sequence_parallel=sp)
        names = OPTION_NAMES if name != "sp4" else ("seed_rule", "error_budget")  # sp4: shares the others' code
        layout: dict[str, Any] = {"options": {}}
        for option in names:
            layout["options"][option] = run_episode(make_pipeline(option_configs[option], groups))
        layout["batched"] = run_batched(make_pipeline(option_configs["seed_rule"], groups))
        results["layouts"][name] = layout

    # 100 consecutive chunks on the layout with every collective (CFG exchange, and SP on 4 ranks).
    name = next(iter(LAYOUTS[world]))
    groups = ParallelGroups.create(cfg_parallel=LAYOUTS[world][name][0], sequence_parallel=LAYOUTS[world][name][1])
    started = time.monotonic()
    chunks = hundred_chunks(make_pipeline({"cache": HUNDRED_CHUNKS}, groups, steps=3))
    results["hundred"] = {"layout": name, "chunks": chunks, "seconds": time.monotonic() - started}

    # Omni under torchrun: the default group already runs here (run_ranks started it).
    parallel = {"cfg_parallel": 2, "sequence_parallel": world // 2, "check_consistency": True}
    results["omni"] = omni_run(model_dir, option_configs["seed_rule"]["cache"], parallel)

    # Forced disagreements: each fails on every rank, before any forward, naming what differs.
    other = {"cache": {"velocity_sim_thresholds": [0.5], "velocity_skip_countdowns": [1]}}
    mine = option_configs["seed_rule"] if rank != 1 else other
    errors = {
        "omni_config": _error_of(lambda: omni_run(model_dir, mine["cache"], parallel)),
        "pipeline_config": _error_of(lambda: run_episode(make_pipeline(mine, groups), chunks=1)),
        "seed": _error_of(lambda: run_episode(make_pipeline(option_configs["seed_rule"], groups), chunks=1,
                                              seed=rank)),
    }
    no_group = make_pipeline({}, groups)
    StepCacheBackend(option_configs["seed_rule"]["cache"]).enable(no_group)  # forgot the group: refused, not a hang
    errors["no_group"] = _error_of(lambda: run_episode(no_group, chunks=1))
    bad_input = make_pipeline(option_configs["seed_rule"], groups)
    observation, state = episode_inputs(1, seed=0)[0]
    if rank == 1:
        observation = np.full_like(observation, np.nan)
    errors["input"] = _error_of(lambda: bad_input(observation, INSTRUCTION, state))
    # ...and the ranks go on together afterwards (nothing half-run is left behind).
    errors["after"] = _error_of(lambda: run_episode(bad_input, chunks=1))
    results["errors"] = errors
    return results


MARGIN = 1e-3  # no decision of the references lies closer than this to its threshold (relative for budgets)


def _margins_ok(chunks: list[dict], threshold: float | None, budget: float | None) -> bool:
    for chunk in chunks:
        for reason, similarity, estimate in chunk["trace"]:
            if threshold is not None and reason in ("similar", "dissimilar") and abs(similarity - threshold) < MARGIN:
                return False
            if budget is not None and estimate is not None and abs(estimate - budget) < MARGIN * budget:
                return False
    return True


def skips_and_runs(chunks: list[dict]) -> bool:
    ran = [r for chunk in chunks for r in chunk["ran"]]
    return any(ran) and not all(ran)


@torch.no_grad()
def single_process_references() -> dict[str, Any]:
    """Single-process runs of every option, the batched chunks and the 100 chunks, with a threshold and
    a budget that no decision sits near (so that float rounding across ranks cannot tip one), chosen
    from fixed candidates; ``configs``: the options, for the ranks."""
    for threshold in (0.99, 0.98, 0.95, 0.9, 0.8, 0.5):
        configs = options(threshold, 1.0)
        runs = {name: run_episode(make_pipeline(configs[name], None))
                for name in ("seed_rule", "extrapolate", "solver_aware", "direct_decoupled")}
        if all(skips_and_runs(chunks) and _margins_ok(chunks, threshold, None) for chunks in runs.values()):
            break
    else:
        raise RuntimeError("no candidate threshold keeps every decision clear of it")
    for budget in (0.01, 0.003, 0.03, 0.001, 0.1):
        runs["error_budget"] = run_episode(make_pipeline(options(threshold, budget)["error_budget"], None))
        if skips_and_runs(runs["error_budget"]) and _margins_ok(runs["error_budget"], None, budget):
            break
    else:
        raise RuntimeError("no candidate budget keeps every decision clear of it")
    configs = options(threshold, budget)
    for name in ("planned", "static"):
        runs[name] = run_episode(make_pipeline(configs[name], None))
    return {
        "configs": configs, "options": runs, "batched": run_batched(make_pipeline(configs["seed_rule"], None)),
        "hundred": hundred_chunks(make_pipeline({"cache": HUNDRED_CHUNKS}, None, steps=3)),
    }


def save_model_dir(folder: Path) -> str:
    from stepcache.models.dreamzero.weights import save_model

    return str(save_model(tiny_model(), folder))
