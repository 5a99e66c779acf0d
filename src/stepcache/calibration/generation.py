"""How calibration runs one generation under a given cache config, whatever runs the sampler.

Two sources, one interface (:class:`GenerationSource`):

- a **generation function** ``generate(config)`` (or ``generate(config, input)`` with inputs) that
  runs one full generation with ``config`` installed however the caller's code does it
  (``VelocityCache`` in a hand-written loop, ``enable_dreamzero_stepcache`` / ``Omni`` /
  ``DreamZeroPipeline``, ``enable_step_cache``...) and returns the output tensor(s);
- a **diffusers pipeline** and its call kwargs: StepCache is applied with the config, the pipeline
  is called, StepCache is removed.

Random generators found in an input (a ``torch.Generator``, or a list of them, as a value of a call
kwargs dict, an item of a list or tuple, or the input itself) are rewound to the state they had when
calibration started before every generation, so every run of an input starts from the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from stepcache.config import DiffusionCacheConfig

# Installed to record: never skips (the similarity is clamped to [-1, 1], so > 1.0 never fires), so
# the run is bit-identical to one without StepCache, and every step's velocity is recorded.
NEVER_SKIP = DiffusionCacheConfig(velocity_sim_thresholds=[1.0], velocity_skip_countdowns=[1])

Fidelity = Callable[[Any, Any], float]


class GenerationSource:
    """Runs one generation of calibration input ``index`` under a config; ``len()`` inputs."""

    inputs: list[Any]

    def __len__(self) -> int:
        return len(self.inputs)

    def run(self, config: DiffusionCacheConfig, index: int) -> Any:
        raise NotImplementedError

    def guidance_scale(self) -> float | None:
        """The CFG scale the branches combine with, where the source knows it (diffusers pipelines)."""
        return None

    def run_fewer_steps(self, steps: int, index: int) -> Any:
        """Input ``index`` sampled with ``steps`` steps and no cache, or None where the step count is the
        source's own (a generation function)."""
        return None

    def solver_aware_effect(self) -> str:
        """What ``solver_aware`` does to this source's sampler: ``"unknown"`` (a function's loop: measure
        it), ``"multistep"`` (a solver with memory: it matters), ``"none"`` (no multistep memory: the run
        is identical), ``"unsupported"`` (the scheduler cannot be driven solver-aware)."""
        return "unknown"


class FunctionSource(GenerationSource):
    """``generate(config)`` (``inputs`` None: one input) or ``generate(config, input)``."""

    def __init__(self, generate: Callable[..., Any], inputs: Sequence[Any] | None) -> None:
        if not callable(generate):
            raise TypeError(f"generate must be callable, got {type(generate).__name__}")
        self.generate = generate
        self.takes_input = inputs is not None
        self.inputs = [None] if inputs is None else list(inputs)
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one calibration input (or None for generate(config))")
        self._rewind = [_GeneratorRewind(x) for x in self.inputs]

    def run(self, config: DiffusionCacheConfig, index: int) -> Any:
        self._rewind[index]()
        if self.takes_input:
            return self.generate(config, self.inputs[index])
        return self.generate(config)


class DiffusersSource(GenerationSource):
    """A diffusers pipeline called with each input's kwargs, StepCache applied for the call."""

    def __init__(self, pipe: Any, inputs: Sequence[Mapping[str, Any]] | None) -> None:
        from stepcache.integrations.diffusers import get_step_cache_stats

        if inputs is None or not list(inputs):
            raise ValueError(
                "a diffusers pipeline needs inputs: a list of call kwargs, one dict per calibration generation "
                "(prompts, sizes, num_inference_steps, generator=torch.Generator().manual_seed(...))"
            )
        self.inputs = list(inputs)
        for i, kwargs in enumerate(self.inputs):
            if not isinstance(kwargs, Mapping):
                raise ValueError(f"inputs[{i}] must be a dict of pipeline call kwargs, got {type(kwargs).__name__}")
        try:
            get_step_cache_stats(pipe)
        except ValueError:
            pass  # not applied: what calibration needs
        else:
            raise ValueError(
                "StepCache is already applied to this pipeline; call disable_step_cache(pipe) before calibrating "
                "(calibration applies each config it measures itself)"
            )
        self.pipe = pipe
        self._rewind = [_GeneratorRewind(kwargs) for kwargs in self.inputs]

    def run(self, config: DiffusionCacheConfig, index: int) -> Any:
        from stepcache.integrations.diffusers import disable_step_cache, enable_step_cache

        self._rewind[index]()
        enable_step_cache(self.pipe, config)
        try:
            return self.pipe(**self.inputs[index])
        finally:
            disable_step_cache(self.pipe)

    def run_fewer_steps(self, steps: int, index: int) -> Any:
        self._rewind[index]()
        return self.pipe(**{**self.inputs[index], "num_inference_steps": steps})

    def guidance_scale(self) -> float | None:
        scale = getattr(self.pipe, "_guidance_scale", None)  # set by the pipeline's last call
        return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None

    def solver_aware_effect(self) -> str:
        from stepcache.integrations.schedulers import SkipAwareStepper

        try:
            stepper = SkipAwareStepper(self.pipe.scheduler)
        except (ValueError, AttributeError):
            return "unsupported"
        return "multistep" if stepper.multistep else "none"


def is_diffusers_pipeline(value: Any) -> bool:
    """Whether ``value`` is a diffusers ``DiffusionPipeline`` (checked without importing diffusers)."""
    return any(
        cls.__name__ == "DiffusionPipeline" and cls.__module__.startswith("diffusers")
        for cls in type(value).__mro__
    )


class _GeneratorRewind:
    """Puts every ``torch.Generator`` found in an input back to the state it had at construction."""

    def __init__(self, value: Any) -> None:
        self.saved = [(g, g.get_state()) for g in _generators(value)]

    def __call__(self) -> None:
        for generator, state in self.saved:
            generator.set_state(state)


def _generators(value: Any) -> list[torch.Generator]:
    if isinstance(value, torch.Generator):
        return [value]
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    found = []
    for item in items:
        if isinstance(item, torch.Generator):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            found.extend(g for g in item if isinstance(g, torch.Generator))
    return found


# -- outputs --------------------------------------------------------------------------------------


def detached(output: Any) -> Any:
    """A copy of a generation's output that nothing the sampler does later can change."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(detached(v) for v in output)
    if isinstance(output, list):
        return [detached(v) for v in output]
    if isinstance(output, dict) and type(output) is dict:
        return {k: detached(v) for k, v in output.items()}
    return output  # numpy arrays, PIL images and pipeline output objects are not reused by the sampler


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of an output, in order: a tensor, a numpy array, a PIL image, or a tuple, list or
    dict (diffusers' pipeline outputs are dicts) of those."""
    if isinstance(output, torch.Tensor):
        return [output]
    if type(output).__module__.startswith("numpy") or type(output).__module__.startswith("PIL"):
        import numpy as np

        return [torch.as_tensor(np.asarray(output))]
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (list, tuple)):
        items = output
    else:
        return []
    tensors = []
    for item in items:
        tensors.extend(output_tensors(item))
    return tensors


def same_output(output: Any, other: Any) -> bool:
    """Whether two outputs hold the same tensors, bit for bit (False where ``output`` holds none: an
    output that cannot be compared is never taken for an equal one)."""
    mine, theirs = output_tensors(output), output_tensors(other)
    return bool(mine) and len(mine) == len(theirs) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())
        for a, b in zip(mine, theirs)
    )


def non_finite(value: Any) -> str | None:
    """Where ``value`` (an output or a prediction: a tensor or a structure of them) holds NaN or an
    infinity, e.g. ``"tensor 0 (3 of 64 elements)"``; None where every element is finite."""
    for i, tensor in enumerate(output_tensors(value)):
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                return f"tensor {i} ({bad} of {tensor.numel()} elements)"
    return None


def psnr_db(output: Any, reference: Any, *, peak: float | None = None) -> float:
    """The default fidelity: PSNR (dB) of the output's first tensor against the full-step output's,
    ``10 log10(peak^2 / MSE)``; ``peak`` defaults to the full-step tensor's range (max - min). ``inf``
    where they are equal. (For images in a known range pass it: ``functools.partial(psnr_db, peak=1.0)``.)"""
    produced, wanted = output_tensors(output), output_tensors(reference)
    if not produced or not wanted:
        raise ValueError(
            f"cannot compare outputs of type {type(output).__name__}: the generation must return a tensor (or a "
            "tuple, list or dict of them, or a pipeline output holding one); or pass fidelity=callable"
        )
    a, b = produced[0].detach().double().cpu(), wanted[0].detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"the output's shape {tuple(a.shape)} differs from the full-step output's {tuple(b.shape)}")
    if peak is None:
        peak = float(b.max() - b.min()) or 1.0
    mse = float(((a - b) ** 2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


# -- describing inputs ----------------------------------------------------------------------------


def describe(value: Any, depth: int = 0) -> Any:
    """A short JSON-able description of a calibration input (what the result file says was used)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Generator):
        return {"generator_seed": value.initial_seed()}
    if isinstance(value, torch.Tensor):
        if value.numel() <= 16:
            return value.detach().cpu().tolist()
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if depth < 3 and isinstance(value, Mapping):
        return {str(k): describe(v, depth + 1) for k, v in value.items()}
    if depth < 3 and isinstance(value, (list, tuple)):
        items = [describe(v, depth + 1) for v in value[:16]]
        return items + ([f"... {len(value)} items"] if len(value) > 16 else [])
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
