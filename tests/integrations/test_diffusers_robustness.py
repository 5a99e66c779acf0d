"""No silent wrong results from the diffusers hook: aborted generations, threads, schedules that do not
fit, back-to-back one-step generations, and the new policies on real tiny pipelines."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator

import pytest
import torch

from stepcache.integrations.diffusers import (
    apply_step_cache,
    get_step_cache_stats,
    is_step_cache_enabled,
    remove_step_cache,
)
from tests.integrations.tiny_pipelines import TinyPipeline, sd3, wan_t2v

SKIP_WHENEVER_ALLOWED = {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]}
STEPS = 8


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Abort(Exception):
    pass


def _generate(tiny: TinyPipeline, steps: int = STEPS, abort_after: int | None = None) -> torch.Tensor:
    def callback(pipe, i, t, callback_kwargs):
        if abort_after is not None and i + 1 >= abort_after:
            raise Abort
        return {}

    return tiny.pipe(**tiny.kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     callback_on_step_end=callback, output_type="latent", return_dict=False)[0]


@pytest.mark.parametrize("builder", [lambda: wan_t2v(two_experts=False), sd3], ids=["wan", "sd3"])
@pytest.mark.parametrize("abort_after", [1, 3])
def test_an_aborted_generation_never_leaks_into_the_next(builder, abort_after):
    tiny = builder()
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    fresh = _generate(tiny)
    fresh_stats = get_step_cache_stats(tiny.pipe)
    with pytest.raises(Abort):
        _generate(tiny, abort_after=abort_after)
    after_abort = _generate(tiny)
    assert torch.equal(after_abort, fresh)
    stats = get_step_cache_stats(tiny.pipe)
    assert stats.num_steps == STEPS and stats.run_steps == fresh_stats.run_steps
    assert stats.forwards == fresh_stats.forwards


def test_back_to_back_one_step_generations_stay_apart():
    tiny = sd3()  # not a CacheMixin: no end-of-call reset, one batched call without a context
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    outputs = [_generate(tiny, steps=1) for _ in range(3)]
    stats = get_step_cache_stats(tiny.pipe)
    assert (stats.num_steps, stats.forwards, stats.branches) == (1, 1, ("call0",))
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_a_fixed_schedule_past_the_end_is_refused_before_any_forward():
    tiny = wan_t2v(two_experts=False)
    apply_step_cache(tiny.pipe, {"step_cache_dit_static_steps": [0, 50]})
    with pytest.raises(ValueError, match=r"\[50\] past the end of a 8-step generation"):
        _generate(tiny)
    assert tiny.forwards == []


def _sibling(tiny: TinyPipeline) -> TinyPipeline:
    """A second pipeline sharing the transformer, with its own scheduler (how threads should share)."""
    components = {**tiny.pipe.components, "scheduler": copy.deepcopy(tiny.pipe.scheduler)}
    other = copy.copy(tiny)
    other.pipe = type(tiny.pipe)(**components)
    other.pipe.set_progress_bar_config(disable=True)
    return other


def test_threads_on_pipelines_that_share_a_transformer_are_each_exact():
    tiny = wan_t2v(two_experts=False)
    other = _sibling(tiny)
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    apply_step_cache(other.pipe, SKIP_WHENEVER_ALLOWED)  # same config: adds the sibling's scheduler
    alone = _generate(tiny)
    results: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=30)

    def worker(name: str, pipeline: TinyPipeline) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[name].append(_generate(pipeline))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n, p)) for n, p in (("a", tiny), ("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert all(torch.equal(out, alone) for outs in results.values() for out in outs)


def test_one_pipeline_in_two_threads_at_once_is_refused_not_corrupted():
    tiny = wan_t2v(two_experts=False)
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    alone = _generate(tiny)
    inside = threading.Event()
    release = threading.Event()
    outcome: dict[str, object] = {}

    def slow_first(pipe, i, t, callback_kwargs):  # thread A pauses after its first step
        if i == 0:
            inside.set()
            release.wait(timeout=60)
        return {}

    def thread_a() -> None:
        try:
            outcome["a"] = tiny.pipe(
                **tiny.kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                callback_on_step_end=slow_first, output_type="latent", return_dict=False,
            )[0]
        except RuntimeError as err:
            outcome["a"] = err

    a = threading.Thread(target=thread_a)
    a.start()
    assert inside.wait(timeout=60)
    outcome["b"] = _generate(tiny)  # thread B restarts the shared scheduler while A is mid-generation
    release.set()
    a.join(timeout=120)
    assert torch.equal(outcome["b"], alone)  # the thread that owns the scheduler now is exact
    assert isinstance(outcome["a"], RuntimeError) and "another thread" in str(outcome["a"])


@pytest.mark.parametrize(
    "config",
    [
        {"step_cache_dit_policy": "planned", "step_cache_dit_forward_budget": 3, "step_cache_dit_solver_aware": True,
         "velocity_reuse": "extrapolate"},
        {"step_cache_dit_policy": "error_budget", "velocity_error_budget": 0.05, "step_cache_dit_final_steps": 1},
        {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4], "step_cache_dit_max_skip_steps": 2},
        "fast",
    ],
    ids=["planned-solver-aware", "error-budget-final", "seed-capped", "preset-fast"],
)
def test_every_option_runs_through_the_hook_and_removal_restores_exactness(config):
    tiny = wan_t2v(two_experts=False)
    reference = _generate(tiny)
    apply_step_cache(tiny.pipe, config)
    cached = _generate(tiny)
    stats = get_step_cache_stats(tiny.pipe)
    assert stats.num_steps == STEPS and stats.expected_steps == STEPS and torch.isfinite(cached).all()
    assert stats.computed_steps < STEPS
    if isinstance(config, dict) and config.get("step_cache_dit_policy") == "planned":
        assert stats.computed_steps == 3 and stats.run_steps[0] == 0
    if isinstance(config, dict) and "step_cache_dit_max_skip_steps" in config:
        assert "..." not in stats.schedule
    remove_step_cache(tiny.pipe)
    assert torch.equal(_generate(tiny), reference)
    assert "step" not in tiny.pipe.scheduler.__dict__ and "set_timesteps" not in tiny.pipe.scheduler.__dict__


def test_never_skip_with_solver_aware_is_bit_identical():
    tiny = wan_t2v(two_experts=False)
    reference = _generate(tiny)
    apply_step_cache(tiny.pipe, {"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1],
                                 "step_cache_dit_solver_aware": True})
    assert torch.equal(_generate(tiny), reference)


def test_options_that_need_the_scheduler_are_refused_on_a_bare_transformer():
    tiny = wan_t2v(two_experts=False)
    with pytest.raises(ValueError, match="need the pipeline's scheduler"):
        apply_step_cache(tiny.pipe.transformer, {"step_cache_dit_final_steps": 1})
    for preset in ("fast", "balanced", "quality"):  # the planned policy needs the generation's timesteps
        with pytest.raises(ValueError, match=r"step_cache_dit_policy 'planned'.*need the pipeline's scheduler"):
            apply_step_cache(tiny.pipe.transformer, preset)
    assert not is_step_cache_enabled(tiny.pipe)
