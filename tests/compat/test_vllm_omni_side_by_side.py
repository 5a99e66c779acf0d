"""stepcache's StepCacheState against the released vLLM-Omni one, decision by decision.

The upstream state comes from the ``vllm-omni`` wheel on the package registry (or an installed
``vllm_omni``), never from this tree. Only its two stepcache module files are loaded (``config.py``
and ``state.py``): the package's ``__init__`` chain imports vLLM itself, which is not installed here.
Those two files import one name from outside them, ``vllm_omni.diffusion.data.DiffusionCacheConfig``,
used only in the signature of ``StepCacheConfig.from_diffusion_cache_config``; it is given as a class
that refuses to be built, so nothing that takes a decision is replaced. The modules are registered in
``sys.modules`` only while they load, then removed.

The wheel is downloaded once into ``~/.cache/stepcache-tests`` (``STEPCACHE_TEST_CACHE`` overrides it);
the test is skipped, saying why, when neither an installed copy nor the registry is available.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from stepcache import StepCacheConfig, StepCacheState

VLLM_OMNI_VERSION = "0.30.0"
STEPCACHE_FILES = ("config.py", "state.py")
PACKAGE = "vllm_omni.diffusion.cache.stepcache"
DOWNLOAD_TIMEOUT_S = 300


def _cache_dir() -> Path:
    root = os.environ.get("STEPCACHE_TEST_CACHE") or Path.home() / ".cache" / "stepcache-tests"
    return Path(root) / f"vllm-omni-{VLLM_OMNI_VERSION}"


def _installed_stepcache_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("vllm_omni")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "diffusion" / "cache" / "stepcache"
    return directory if all((directory / name).is_file() for name in STEPCACHE_FILES) else None


def _wheel_stepcache_dir() -> Path:
    """The upstream stepcache files unpacked from the registry's wheel (downloaded on first use)."""
    target = _cache_dir() / "stepcache"
    if all((target / name).is_file() for name in STEPCACHE_FILES):
        return target
    wheels = _cache_dir() / "wheel"
    found = sorted(wheels.glob("vllm_omni-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--timeout", "30", f"vllm-omni=={VLLM_OMNI_VERSION}", "-d", str(wheels)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"cannot download vllm-omni {VLLM_OMNI_VERSION} from the package registry: {err}")
        found = sorted(wheels.glob("vllm_omni-*.whl"))
        if done.returncode != 0 or not found:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"cannot download vllm-omni {VLLM_OMNI_VERSION} from the package registry "
                        f"(pip exit {done.returncode}: {last[0]})")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        for name in STEPCACHE_FILES:
            (target / name).write_bytes(wheel.read(f"{PACKAGE.replace('.', '/')}/{name}"))
    return target


class _UnusedDiffusionCacheConfig:
    """Stands for vLLM-Omni's DiffusionCacheConfig, which the state never touches."""

    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("the side-by-side test builds upstream's StepCacheConfig directly")


def _load_upstream(directory: Path) -> types.SimpleNamespace:
    data = types.ModuleType("vllm_omni.diffusion.data")
    data.DiffusionCacheConfig = _UnusedDiffusionCacheConfig
    loading = {"vllm_omni.diffusion.data": data}
    saved = {name: sys.modules.get(name) for name in [*loading, *(f"{PACKAGE}.{f[:-3]}" for f in STEPCACHE_FILES)]}
    try:
        sys.modules.update(loading)
        modules = {}
        for file_name in STEPCACHE_FILES:
            name = f"{PACKAGE}.{file_name[:-3]}"
            spec = importlib.util.spec_from_file_location(name, directory / file_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # state.py imports config.py by this name
            spec.loader.exec_module(module)
            modules[file_name[:-3]] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(StepCacheConfig=modules["config"].StepCacheConfig,
                                 StepCacheState=modules["state"].StepCacheState, directory=directory)


@pytest.fixture(scope="module")
def upstream() -> types.SimpleNamespace:
    return _load_upstream(_installed_stepcache_dir() or _wheel_stepcache_dir())


def _random_config(rng: random.Random) -> dict:
    """Seed-rule fields inside the space both accept (stepcache refuses more, e.g. unordered thresholds).

    A threshold of exactly 1.0 is left out: on equal or parallel velocities upstream's float32 cosine
    can round to just above 1 and fire it, where stepcache clamps the similarity to [-1, 1] and never
    does (a documented difference; test_a_threshold_of_one_is_the_one_known_difference)."""
    count = rng.randint(0, 3)
    thresholds = sorted((rng.uniform(-0.5, 0.999) for _ in range(count)), reverse=True)
    if len(set(thresholds)) < count:
        thresholds = [0.99 - 0.1 * i for i in range(count)]
    min_history = rng.randint(2, 4)
    return {
        "enabled": rng.random() > 0.1,
        "min_history_steps": min_history,
        "max_history": min_history + rng.randint(0, 2),
        "sim_thresholds": tuple(thresholds),
        "skip_countdowns": tuple(rng.randint(1, 5) for _ in range(count)),
    }


def _next_velocity(rng: random.Random, gen: torch.Generator, last: torch.Tensor) -> torch.Tensor:
    kind = rng.random()
    if kind < 0.1:
        return last.clone()
    if kind < 0.15:
        return last * rng.uniform(0.5, 2.0)
    scale = 10 ** rng.uniform(-3, 1)  # similarities from ~1 down to ~0
    return last + scale * last.norm() / math.sqrt(last.numel()) * torch.randn(last.shape, generator=gen)


def _run_side_by_side(upstream, case: int) -> tuple[int, int]:
    rng = random.Random(case)
    gen = torch.Generator().manual_seed(case)
    fields = _random_config(rng)
    ours = StepCacheState(StepCacheConfig(**fields))
    theirs = upstream.StepCacheState(upstream.StepCacheConfig(**fields))
    shape = (rng.randint(1, 3), rng.randint(1, 3), rng.randint(2, 6))
    decisions = skips = 0
    for generation in range(rng.randint(1, 2)):
        num_steps = rng.randint(4, 24)
        ours.reset(num_steps)
        theirs.reset()
        our_history, their_history = [], []
        velocity = torch.randn(shape, generator=gen)
        for step in range(num_steps):
            our_run, their_run = ours.should_run_step(our_history), theirs.should_run_step(their_history)
            where = f"case {case}, config {fields}, generation {generation}, step {step}"
            assert our_run == their_run, where
            assert ours.skip_countdown == theirs.skip_countdown, where
            decisions += 1
            skips += not our_run
            if our_run:
                velocity = _next_velocity(rng, gen, velocity)
                for state, history in ((ours, our_history), (theirs, their_history)):
                    history.append((velocity.clone(),))
                    state.trim_history(history)
                assert len(our_history) == len(their_history), where
    return decisions, skips


def test_decisions_match_the_released_vllm_omni_state(upstream):
    decisions = skips = 0
    for case in range(300):
        made, skipped = _run_side_by_side(upstream, case)
        decisions, skips = decisions + made, skips + skipped
    # the cases exercise both outcomes often, so agreement is not agreement on "always run"
    assert skips > 0.2 * decisions and decisions - skips > 0.2 * decisions, (decisions, skips)


def test_the_upstream_files_are_the_registry_release(upstream):
    text = (upstream.directory / "state.py").read_text()
    assert "class StepCacheState" in text and "def should_run_step" in text
    module = sys.modules.get(upstream.StepCacheState.__module__)
    assert module is None  # loaded privately: nothing else in the process sees upstream's modules
    assert upstream.StepCacheState.should_run_step.__code__.co_filename == str(upstream.directory / "state.py")


def test_a_threshold_of_one_is_the_one_known_difference(upstream):
    """Upstream's cosine of a velocity with itself times 3 rounds above 1 for some vectors and fires a
    1.0 threshold; stepcache's never fires (docs: "a threshold of 1.0 can never fire")."""
    fields = {"sim_thresholds": (1.0,), "skip_countdowns": (2,)}
    gen = torch.Generator().manual_seed(0)
    fired = 0
    for _ in range(50):
        v = torch.randn(2, 7, generator=gen)
        history = [(v,), (3 * v,)]
        assert StepCacheState(StepCacheConfig(**fields)).should_run_step(history) is True
        fired += upstream.StepCacheState(upstream.StepCacheConfig(**fields)).should_run_step(history) is False
    assert fired > 0  # if upstream ever clamps too, this test says the difference is gone
