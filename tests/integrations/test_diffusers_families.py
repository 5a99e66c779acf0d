"""StepCache on one tiny random pipeline per diffusers family (see tiny_pipelines.py), so that a diffusers
upgrade that breaks one is caught: never-skip is bit-identical to no cache, skip-whenever-allowed follows
the seed's schedule in every branch (and expert), and removal restores the uncached output exactly."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import diffusers
import pytest
import torch

from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats, remove_step_cache
from tests.integrations.tiny_pipelines import FAMILIES, Forward, TinyPipeline, z_image

NEVER_SKIP = {"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1]}
SKIP_WHENEVER_ALLOWED = {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]}
STEPS = 16
SEED_RUNS = [0, 1, 6, 11]  # two warm-up runs, then 4 skipped steps and a refresh, again and again
# Wan 2.2's switch to the second expert at step 6 (a refresh) restarts the history: 6 and 7 run as a new
# warm-up, never compared with, nor answered by, the first expert's outputs; then the countdown resumes.
TWO_EXPERT_RUNS = [0, 1, 6, 7, 12]


def _schedule(runs: list[int]) -> str:
    return "".join("R" if step in runs else "." for step in range(STEPS))


requires_z_image = pytest.mark.skipif(
    not hasattr(diffusers, "ZImagePipeline"), reason=f"diffusers {diffusers.__version__} has no Z-Image pipeline"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is several times faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Iterator[tuple[TinyPipeline, torch.Tensor, list[Forward]]]:
    """A family's tiny pipeline, its uncached output and the forwards that made it."""
    tiny = FAMILIES[request.param]()
    reference = tiny.generate(STEPS)
    yield tiny, reference, list(tiny.forwards)


@pytest.fixture
def tiny(family: tuple[TinyPipeline, torch.Tensor, list[Forward]]) -> Iterator[TinyPipeline]:
    """The family's pipeline, guaranteed free of StepCache afterwards even when the test fails."""
    yield family[0]
    with contextlib.suppress(ValueError):  # raised where it is not applied
        remove_step_cache(family[0].pipe)


def _forwards_per_step(forwards: list[Forward]) -> Counter:
    return Counter(forward.step for forward in forwards)


def test_the_uncached_run_is_what_the_family_claims(family: tuple[TinyPipeline, torch.Tensor, list[Forward]]) -> None:
    tiny, reference, forwards = family
    assert torch.isfinite(reference).all()
    assert _forwards_per_step(forwards) == {step: len(tiny.branches) for step in range(STEPS)}
    assert {f.denoiser for f in forwards} == set(tiny.denoisers)  # both experts of Wan 2.2 take part
    # One sample per branch: a batched call holds the uncond and cond halves.
    assert {f.batch for f in forwards} == {2 if tiny.cfg == "one batched call" else 1}
    assert len(tiny.branches) == (2 if tiny.cfg == "two calls" else 1)
    timesteps = [f.timestep for f in forwards]
    start, end = (float(side) for side in tiny.timesteps.split(" -> "))
    assert (timesteps[0] > timesteps[-1]) == (start > end)
    assert 0 <= min(timesteps) and max(timesteps) <= max(start, end)
    if max(start, end) == 1000:
        assert max(timesteps) > 1  # 0..1000 units, not 0..1


def test_never_skip_is_bit_identical_to_no_cache(
    tiny: TinyPipeline, family: tuple[TinyPipeline, torch.Tensor, list[Forward]]
) -> None:
    apply_step_cache(tiny.pipe, NEVER_SKIP)
    assert torch.equal(tiny.generate(STEPS), family[1])
    stats = get_step_cache_stats(tiny.pipe)
    assert len(stats.trace) == STEPS and stats.run_steps == list(range(STEPS))
    assert stats.branches == tiny.branches
    assert (stats.forwards, stats.reused_outputs) == (STEPS * len(tiny.branches), 0)
    assert [f.step for f in tiny.forwards] == [f.step for f in family[2]]


def test_skipping_whenever_allowed_follows_the_seed_schedule(
    tiny: TinyPipeline, family: tuple[TinyPipeline, torch.Tensor, list[Forward]]
) -> None:
    reference, reference_forwards = family[1], family[2]
    expert_of_step = {f.step: f.denoiser for f in reference_forwards}
    runs = TWO_EXPERT_RUNS if len(tiny.denoisers) == 2 else SEED_RUNS
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    outputs = []
    for _ in range(2):  # the second generation starts afresh, whether or not the pipeline resets hooks
        outputs.append(tiny.generate(STEPS))
        stats = get_step_cache_stats(tiny.pipe)
        assert len(stats.trace) == STEPS  # one record per scheduler step
        assert stats.run_steps == runs and stats.schedule == _schedule(runs)
        assert stats.branches == tiny.branches
        assert stats.forwards == len(runs) * len(tiny.branches)
        assert stats.reused_outputs == (STEPS - len(runs)) * len(tiny.branches)
        # The forwards that really ran: every branch at the computed steps, by the expert of that step.
        assert _forwards_per_step(tiny.forwards) == {step: len(tiny.branches) for step in runs}
        assert all(f.denoiser == expert_of_step[f.step] for f in tiny.forwards)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.isfinite(outputs[0]).all() and not torch.equal(outputs[0], reference)


def test_removal_restores_the_uncached_output(
    tiny: TinyPipeline, family: tuple[TinyPipeline, torch.Tensor, list[Forward]]
) -> None:
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    tiny.generate(STEPS)
    remove_step_cache(tiny.pipe)
    for name in tiny.denoisers:
        assert getattr(tiny.pipe, name).__dict__["forward"] is tiny.spies[name]  # what was there before
    assert torch.equal(tiny.generate(STEPS), family[1])
    assert len(tiny.forwards) == STEPS * len(tiny.branches)


def test_wan22_experts_split_the_skip_schedule() -> None:
    """The boundary falls between steps 5 and 6: the first expert computes 0 and 1, the second 6, 7 and 12."""
    for name in ("wan2.2-t2v-two-experts", "wan2.2-i2v-two-experts"):
        tiny = FAMILIES[name]()
        apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
        tiny.generate(STEPS)
        assert {(f.step, f.denoiser) for f in tiny.forwards} == {
            (0, "transformer"), (1, "transformer"), (6, "transformer_2"), (7, "transformer_2"), (12, "transformer_2")
        }  # fmt: skip
        assert get_step_cache_stats(tiny.pipe.transformer_2) == get_step_cache_stats(tiny.pipe)
        remove_step_cache(tiny.pipe)


@requires_z_image
def test_z_image_steps_are_found_through_its_t_argument() -> None:
    """Z-Image's transformer takes the timestep as `t`, by position; StepCache finds it by name."""
    tiny = z_image()
    reference = tiny.generate(STEPS)
    apply_step_cache(tiny.pipe, NEVER_SKIP)
    assert torch.equal(tiny.generate(STEPS), reference)
    stats = get_step_cache_stats(tiny.pipe)
    assert len(stats.trace) == STEPS and stats.branches == ("call0",) and stats.forwards == STEPS
    remove_step_cache(tiny.pipe)
    assert torch.equal(tiny.generate(STEPS), reference)


@requires_z_image
def test_z_image_skips_whenever_allowed() -> None:
    """Z-Image returns a list of per-sample tensors: the hook stacks them to decide."""
    tiny = z_image()
    apply_step_cache(tiny.pipe, SKIP_WHENEVER_ALLOWED)
    try:
        tiny.generate(STEPS)
        assert get_step_cache_stats(tiny.pipe).run_steps == SEED_RUNS
    finally:
        remove_step_cache(tiny.pipe)
