"""Solver-aware skipping: multistep schedulers that know which of their evaluations were computed.

A multistep solver (UniPC, DPM-Solver++) keeps the model outputs of its last steps and combines them
at each new step. With plain step skipping, a reused velocity enters that memory as if it had been
computed at the skipped step's own sample and sigma: the solver then extrapolates from a fake
evaluation. :class:`SkipAwareStepper` drives a diffusers scheduler so that it never sees one:

- a **skipped** step takes a plain first-order (Euler) step with the reused velocity,
  ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v``, and leaves the solver's memory untouched;
- a **computed** step calls the scheduler's own ``step``, with the sigmas of its memory replaced by
  the sigmas where those evaluations really were made. For UniPC this makes the corrector redo the
  whole skip window from the last computed sample, with the new evaluation; the predictor then
  extrapolates from real evaluations only.

The maths stays diffusers': the stepper only shows the scheduler, for the duration of one ``step``
call, a sigma array whose entries before the current step are the computed steps' sigmas (the real
step index, step count and ``lower_order_final`` behaviour are unchanged), then puts the real array
back. Flow-matching schedulers only (the skipped step's Euler update is the velocity form).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _is_flow_matching(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", None)
    if config is None:
        return False
    if getattr(config, "prediction_type", None) == "flow_prediction" or getattr(config, "use_flow_sigmas", False):
        return True
    return type(scheduler).__name__.startswith("FlowMatch")


def _has_multistep_memory(scheduler: Any) -> bool:
    return isinstance(getattr(scheduler, "model_outputs", None), list)


def check_solver_aware_support(scheduler: Any) -> None:
    """Raise ValueError when :class:`SkipAwareStepper` cannot drive ``scheduler``."""
    name = type(scheduler).__name__
    if not callable(getattr(scheduler, "step", None)) or not isinstance(getattr(scheduler, "sigmas", None),
                                                                        torch.Tensor):
        raise ValueError(f"solver-aware skipping needs a diffusers scheduler with `step` and `sigmas`, got {name}")
    if not _is_flow_matching(scheduler):
        raise ValueError(
            f"solver-aware skipping needs a flow-matching scheduler (velocity predictions, sigmas in [0, 1]); "
            f"{name} with prediction_type={getattr(scheduler.config, 'prediction_type', None)!r} is not one: "
            "turn step_cache_dit_solver_aware off for this pipeline"
        )


class SkipAwareStepper:
    """Steps a diffusers flow-matching scheduler through a generation in which some steps were skipped.

    Call :meth:`step` once per scheduler step, in place of ``scheduler.step``, saying whether the
    model was computed at that step. For a scheduler without multistep memory (e.g.
    ``FlowMatchEulerDiscreteScheduler``) every step is the scheduler's own: a skipped Euler step with
    the reused velocity is exactly what it does anyway.

    Args:
        scheduler: the diffusers scheduler, after ``set_timesteps`` (its ``sigmas`` may be edited
            after that, as long as it happens before the first step).
    """

    def __init__(self, scheduler: Any) -> None:
        check_solver_aware_support(scheduler)
        self.scheduler = scheduler
        self.multistep = _has_multistep_memory(scheduler)
        self._computed_sigmas: list[torch.Tensor] = []

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, computed: bool,
        **kwargs: Any,
    ) -> Any:
        """``scheduler.step(model_output, timestep, sample, *args, **kwargs)`` for a computed step; a
        first-order step that bypasses the solver's memory for a skipped one. Returns what
        ``scheduler.step`` returns (a ``SchedulerOutput``, or a tuple with ``return_dict=False``)."""
        scheduler = self.scheduler
        step = type(scheduler).step.__get__(scheduler)  # the class's own, under any instance wrapper
        if not self.multistep:
            return step(model_output, timestep, sample, *args, **kwargs)
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        index = scheduler.step_index
        sigmas = scheduler.sigmas
        if index == 0:
            self._computed_sigmas = []
        if not computed:
            if not self._computed_sigmas:
                raise RuntimeError("the first step of a generation must be computed")
            delta = (sigmas[index + 1] - sigmas[index]).to(sample.device, torch.float32)
            prev_sample = (sample.float() + delta * model_output.float()).to(sample.dtype)
            scheduler._step_index = index + 1
            return_dict = kwargs.get("return_dict", args[-1] if args and isinstance(args[-1], bool) else True)
            if return_dict:
                from diffusers.schedulers.scheduling_utils import SchedulerOutput

                return SchedulerOutput(prev_sample=prev_sample)
            return (prev_sample,)
        view = sigmas.clone()
        for back, sigma in enumerate(reversed(self._computed_sigmas), start=1):
            if index - back < 0:
                break
            view[index - back] = sigma
        scheduler.sigmas = view
        try:
            out = step(model_output, timestep, sample, *args, **kwargs)
        finally:
            scheduler.sigmas = sigmas
        self._computed_sigmas.append(sigmas[index])
        # the memory is a few steps deep: keep only what a view can use
        del self._computed_sigmas[: -max(4, getattr(scheduler.config, "solver_order", 2) + 1)]
        return out
