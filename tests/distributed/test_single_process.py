"""Without a process group nothing distributed happens: no torch.distributed module beyond those
``import torch`` loads itself, no call into torch.distributed, no process group (a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepcache import StepCacheBackend, StepCacheConfig, VelocityCache

SCRIPT = textwrap.dedent(
    """
    import inspect, json, sys
    import torch  # loads torch.distributed itself (torch/__init__.py): the baseline
    import torch.distributed as dist

    def distributed_modules():
        return {name for name in sys.modules if name.startswith("torch.distributed")}

    baseline = distributed_modules()
    calls = []

    def refuse(name, original):
        def call(*args, **kwargs):  # torch's own modules may call it; stepcache's must not
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.split(".")[0] == "stepcache":
                calls.append(f"{caller}: {name}")
                raise AssertionError(f"{caller} called torch.distributed.{name} without a process group")
            return original(*args, **kwargs)
        return call

    for name, value in vars(dist).copy().items():
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isbuiltin(value)):
            setattr(dist, name, refuse(name, value))

    import stepcache
    from stepcache import StepCacheBackend, StepCacheConfig, VelocityCache, get_stepcache_state

    def velocity(step):
        return torch.full((2, 8), 1.0 + 0.01 * step) + 0.05 * torch.sin(torch.arange(16.0) * step).view(2, 8)

    configs = [StepCacheConfig(), StepCacheConfig(policy="error_budget", error_budget=0.05),
               StepCacheConfig(sim_thresholds=(0.9,), skip_countdowns=(3,), reuse="extrapolate", max_skip_steps=2)]
    schedules = []
    for config in configs:
        cache = VelocityCache(config)
        with cache.generation(16):
            for step in range(16):
                cache.step(lambda: velocity(step), timestep=1.0 - step / 16)
        schedules.append(cache.state.schedule)

    class DreamZeroPipeline:
        pass

    pipeline = DreamZeroPipeline()
    backend = StepCacheBackend()
    backend.enable(pipeline)
    backend.refresh(pipeline, 16)
    state, history = get_stepcache_state(pipeline), []
    for step in range(16):
        if state.should_run_step(history):
            state.push_computed(history, (velocity(step),))
    schedules.append(state.schedule)
    new_modules = distributed_modules() - baseline

    import diffusers  # loads more of torch.distributed itself (FSDP, via its dependencies): a new baseline

    baseline = distributed_modules()
    from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats

    class Denoiser(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return (hidden_states * (1.0 + timestep.float().mean() / 1000.0),)

    denoiser = Denoiser()
    apply_step_cache(denoiser)
    x = torch.ones(1, 4)
    for step in range(16):
        x = x - 0.01 * denoiser(x, torch.tensor([1000.0 - 60 * step]))[0]
    schedules.append(get_step_cache_stats(denoiser).schedule)

    new_modules |= distributed_modules() - baseline
    print(json.dumps({
        "new_modules": sorted(new_modules),
        "calls": calls,
        "parallel_module_loaded": "stepcache.models.dreamzero.parallel" in sys.modules,
        "schedules": schedules,
    }))
    """
)


def test_a_generation_without_a_group_uses_nothing_distributed(tmp_path: Path) -> None:
    script = tmp_path / "single.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["new_modules"] == []
    assert report["calls"] == []
    assert not report["parallel_module_loaded"]
    assert any("." in schedule for schedule in report["schedules"])  # the generations did skip steps


def test_options_that_need_a_group_are_refused_without_one() -> None:
    with pytest.raises(ValueError, match="check_consistency needs a process_group"):
        VelocityCache(StepCacheConfig(), check_consistency=True)

    class DreamZeroPipeline:
        pass

    with pytest.raises(ValueError, match="check_consistency needs a process_group"):
        StepCacheBackend().enable(DreamZeroPipeline(), check_consistency=True)
    from stepcache.state import StepCacheState

    with pytest.raises(ValueError, match="batch_part needs a process_group"):
        StepCacheState(StepCacheConfig(), batch_part=(0, 2))


def test_a_pipeline_on_groups_without_an_agreement_group_is_refused() -> None:
    # Without its own group, the ranks' agreement on a chunk's outcome could pair with a forward collective.
    from stepcache.models.dreamzero import load_model
    from stepcache.models.dreamzero.parallel import ParallelGroups
    from stepcache.models.dreamzero.pipeline import DreamZeroPipeline

    with pytest.raises(ValueError, match="parallel has no agreement_group"):
        DreamZeroPipeline(load_model("dreamzero-mini"), parallel=ParallelGroups(model_group=None))
