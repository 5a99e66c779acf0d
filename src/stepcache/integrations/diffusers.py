"""StepCache for diffusers pipelines: one hook on the transformer skips whole forwards.

Usage (see docs/diffusers.md)::

    from stepcache.integrations.diffusers import disable_step_cache, enable_step_cache, get_step_cache_stats

    enable_step_cache(pipe)                     # the "balanced" preset; or enable_step_cache(pipe, config)
    video = pipe(prompt, num_inference_steps=16).frames[0]
    print(get_step_cache_stats(pipe).summary())  # stepcache: 4/16 steps computed, 12 skipped [RR....R....R....] ...
    disable_step_cache(pipe)                    # the pipeline's own behaviour, exactly

The names follow diffusers' ``enable_cache`` / ``disable_cache`` / ``is_cache_enabled``:
:func:`enable_step_cache`, :func:`disable_step_cache`, :func:`is_step_cache_enabled`,
:func:`get_step_cache_stats` and :func:`reset_step_cache`. ``apply_step_cache`` and
``remove_step_cache`` (diffusers' ``apply_*`` hook-function style) are the same functions. On a
transformer that has diffusers' ``CacheMixin``, StepCache also shows through diffusers' own API:
``transformer.is_cache_enabled`` is True, ``transformer.enable_cache(...)`` refuses another cache with
diffusers' own "already enabled" error, and ``transformer.disable_cache()`` removes StepCache.

A diffusers ``ModelHook`` replaces the transformer's ``forward``. The pipeline is unchanged: it still
calls the transformer once or twice per scheduler step and still steps its scheduler; on a skipped
step the hook answers every call with that call's last computed output (or its extrapolation), without
running the model.

**Generations.** Applied to a pipeline, StepCache also watches the pipeline's scheduler: every
``set_timesteps`` (which every diffusers pipeline calls at the start of ``__call__``) starts a new
generation at the calling thread's next transformer call, whatever happened to the previous one (an
exception, an interrupt from a step callback), and gives the generation's step count (which
``final_steps`` and fixed schedules need, and against which they are checked). Applied to a bare
transformer, generations are told apart by the timesteps alone (rules 1 and 5 below) and by diffusers'
end-of-call reset (``CacheMixin`` transformers only); call :func:`reset_step_cache` between
generations where that cannot see the boundary.

**Threads.** Each thread has its own generation (decision, history, cached outputs), so pipelines that
share one transformer can generate from several threads at once. One pipeline (one scheduler) cannot
run two generations at once, with or without StepCache: when a thread restarts a scheduler whose
generation another thread is still running, the other thread's next call raises instead of stepping
a scheduler that is no longer its own.

**Where a call belongs** (the pipeline never says which step it is in, so the hook reads it from the
call). Each call's *timestep* is the largest value of its timestep argument (any units: Wan/SD3
pass 0..1000, Flux 0..1). Its *branch* is the name the pipeline gave ``transformer.cache_context``
(``"cond"``, ``"uncond"``, ``"cond_uncond"``...), or, without a context, its position among the calls
of the step (``"call0"``, ``"call1"``...). Then, compared with the current step:

1. no generation in progress for this thread, or the scheduler was restarted -> new generation, step 0;
2. same timestep and a branch not seen yet in this step -> same step, another branch;
3. same timestep and a branch already seen in this step -> next step (a second evaluation at the
   same time, or two timesteps that became equal after rounding to bfloat16); on a bare transformer
   at step 0 it is a new generation instead (the previous one was aborted after its first step);
4. timestep moved on in the generation's direction (set by its first change: Wan, SD3 and Flux
   descend, some pipelines ascend) -> next step;
5. timestep moved against that direction -> new generation on a bare transformer (the pipeline started
   over), the next step when the scheduler marks generations.

**What decides.** One decision per step, by the core's :class:`~stepcache.StepCacheState`, made at the
step's first call and shared by all its branches. The history entry of each computed step is
``(torch.cat(branch outputs, dim=0),)`` in call order, so the batch-mean cosine covers every sample of
every branch: a pipeline that calls cond and uncond separately (Wan, Flux true CFG, QwenImage) and one
that makes a single batched call holding both halves (SD3, CogVideoX, LTX) decide identically.
These are the raw branch predictions: the hook never sees the guided (post-CFG) velocity that
DreamZero compares. When the branches of two computed steps differ (a branch appears, disappears or
changes shape), or the denoiser changes (Wan 2.2's ``transformer`` -> ``transformer_2``), the history
restarts, so the rule only ever compares like with like; after a denoiser switch no output of the
other expert is ever reused, and the switch step always runs.

With ``solver_aware`` (needs the pipeline), the scheduler's ``step`` is driven by
:class:`~stepcache.integrations.schedulers.SkipAwareStepper`: skipped steps never enter a multistep
solver's memory.

Caches that diffusers applies itself (``enable_cache`` or its ``apply_*`` functions) are refused:
several of them count calls as steps, which step skipping would silently corrupt. accelerate's model
CPU offload must be enabled after :func:`enable_step_cache` (enforced; see ``_refuse_accelerate_hook``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stepcache.config import (
    RECOMMENDED_PRESET,
    RUNTIME_FIELD_NAMES,
    USER_FIELD_NAMES,
    DiffusionCacheConfig,
    StepCacheConfig,
    as_diffusion_cache_config,
    describe_config,
)
from stepcache.integrations.schedulers import SkipAwareStepper, check_solver_aware_support
from stepcache.state import StepCacheState, StepRecord, TraceSummary, _checked_batch_part, extrapolate_prediction

try:
    import diffusers
    from diffusers.hooks import HookRegistry, ModelHook
except ImportError as err:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "stepcache.integrations.diffusers needs diffusers; install it with `pip install 'stepcache[diffusers]'`"
    ) from err

try:  # Private: how `cache_context(name)` reaches stateful hooks. Optional, see _ContextNameProbe.
    from diffusers.hooks.hooks import BaseState, StateManager
except ImportError:  # pragma: no cover - depends on the diffusers version
    BaseState = StateManager = None

try:  # diffusers' enable_cache / disable_cache / is_cache_enabled, which StepCache makes itself known to
    from diffusers.models.cache_utils import CacheMixin
except ImportError:  # pragma: no cover - depends on the diffusers version
    CacheMixin = None

logger = logging.getLogger(__name__)

# The releases whose hook API this module was written against and tested with (0.35 added
# `cache_context`, through which pipelines name their CFG branches). Others get a warning, not a refusal:
# the features used are checked where they are used.
SUPPORTED_DIFFUSERS_VERSIONS = ">=0.35,<0.43"
_SUPPORTED_RANGE = ((0, 35), (0, 43))

_STEP_CACHE_HOOK = "stepcache_step_hook"
# The names diffusers denoisers give their timestep argument, in the order they are looked for
# (diffusers 0.42: `timestep` almost everywhere, HiDream `timesteps`, Z-Image `t`).
_TIMESTEP_ARGS = ("timestep", "timesteps", "t")
# Pipeline attributes that hold a denoiser (Wan 2.2 switches from `transformer` to `transformer_2`
# mid-generation; both then share one decision state).
_DENOISER_COMPONENTS = ("transformer", "transformer_2")
# The attribute of a scheduler that StepCache watches (a _SchedulerGuard).
_GUARD_ATTR = "_stepcache_guard"

# What a step-boundary check concluded about one call (_Generation.locate).
_NEW_GENERATION = "generation"
_NEW_STEP = "step"
_SAME_STEP = "branch"


@dataclass(frozen=True)
class StepCacheStats(TraceSummary):
    """What StepCache did in one generation (the calling thread's last one, else the latest of any thread).

    Attributes:
        trace: one :class:`~stepcache.StepRecord` per scheduler step (``step``, ``ran``, ``reason``,
            ``similarity``: the cosine of the last two computed velocities the rule read *before* that
            step, None where it did not need one).
        branches: the branches seen (context names, or ``callN`` by position within a step).
        forwards: transformer forwards that ran (every branch of a computed step counts).
        reused_outputs: calls answered from the cache instead.
        forwards_by_denoiser: forwards per denoiser (``transformer``, ``transformer_2``).
        expected_steps: the step count the scheduler announced (None on a bare transformer).
    """

    trace: tuple[StepRecord, ...]
    branches: tuple[str, ...]
    forwards: int
    reused_outputs: int
    forwards_by_denoiser: Mapping[str, int] = field(default_factory=dict)
    expected_steps: int | None = None

    def summary(self) -> str:
        experts = ""
        if len(self.forwards_by_denoiser) > 1:
            experts = " (" + ", ".join(f"{name} {n}" for name, n in self.forwards_by_denoiser.items()) + ")"
        return f"{super().summary()}; {self.forwards} forwards{experts}, {self.reused_outputs} reused outputs"


@dataclass
class _BranchCache:
    """A branch's last computed outputs (newest last, at most two) and the input shape they answered."""

    input_shape: tuple[int, ...] | None
    outputs: list[Any]


class _Generation:
    """One generation of one thread: where the sampler is, the decision, and the cached outputs."""

    def __init__(self, hook_state: StepCacheHookState, guard: _SchedulerGuard | None, epoch: int,
                 num_steps: int | None, schedule: list[float] | None = None) -> None:
        self.config = hook_state.config
        self.decision = StepCacheState(
            hook_state.config, process_group=hook_state.process_group,
            check_consistency=hook_state.check_consistency, batch_part=hook_state.batch_part,
        )
        self.decision.reset(num_steps, timesteps=schedule)
        self._committed = -1  # the last step whose velocities entered the history
        self.guard = guard
        self.epoch = epoch
        self.velocity_history: list[tuple[torch.Tensor]] = []
        self._history_signature: tuple[Any, ...] | None = None
        self.branch_cache: dict[str, _BranchCache] = {}
        self.branches: dict[str, None] = {}  # insertion-ordered set of every branch seen
        self.forwards = 0
        self.reused_outputs = 0
        self.forwards_by_denoiser: dict[str, int] = {}
        self.open = True
        self.step_timestep: float | None = None
        self.direction = 0  # +1 / -1 once the generation's timesteps have moved; 0 before
        self.step_runs = True
        self.step_branches: list[str] = []
        self.step_velocities: dict[str, torch.Tensor] = {}
        self.denoiser: str | None = None
        self.reuse_coefficient = 0.0

    @property
    def step(self) -> int:
        return len(self.decision.trace) - 1

    def locate(self, timestep: float, context_name: str | None) -> tuple[str, str]:
        """Place one call by the module's rule, without changing anything: ``(event, branch)``."""
        if not self.open or self.step_timestep is None:
            return _NEW_GENERATION, _branch_key(context_name, 0)
        if timestep == self.step_timestep:
            branch = _branch_key(context_name, len(self.step_branches))
            if branch not in self.step_branches:
                return _SAME_STEP, branch
            if self.guard is None and self.step == 0 and context_name is not None:
                return _NEW_GENERATION, branch  # the same first step again: the last generation was aborted
            return _NEW_STEP, branch
        moved = 1 if timestep > self.step_timestep else -1
        if self.direction in (0, moved) or self.guard is not None:
            return _NEW_STEP, _branch_key(context_name, 0)
        return _NEW_GENERATION, _branch_key(context_name, 0)

    def enter(self, event: str, timestep: float, branch: str, denoiser: str) -> None:
        """Apply what :meth:`locate` found (never ``_NEW_GENERATION``); a new step is decided here, once."""
        if event == _NEW_STEP or self.step_timestep is None:
            if self.step_timestep is not None:
                if timestep != self.step_timestep:
                    self.direction = 1 if timestep > self.step_timestep else -1
                self._commit_step()
            if self.denoiser is not None and denoiser != self.denoiser:
                # Another expert: never compare with, nor answer from, the previous expert's outputs.
                logger.debug("step %d: denoiser %s -> %s; the history restarts", self.step + 1, self.denoiser,
                             denoiser)
                self.velocity_history.clear()
                self._history_signature = None
                self.branch_cache.clear()
            self.denoiser = denoiser
            self.step_timestep = timestep
            self.step_branches = []
            self.step_velocities = {}
            self.step_runs = self.decision.should_run_step(self.velocity_history, timestep=timestep)
            self.reuse_coefficient = 0.0 if self.step_runs else self.decision.reuse_coefficient()
        self.step_branches.append(branch)
        self.branches.setdefault(branch)

    def close(self) -> None:
        """The generation is over: free the cached tensors, keep the trace and counters."""
        self.open = False
        self.step_timestep = None
        self.velocity_history.clear()
        self._history_signature = None
        self.branch_cache.clear()
        self.step_branches = []
        self.step_velocities = {}

    def cached_output(self, branch: str, input_shape: tuple[int, ...] | None) -> Any | None:
        """The output to reuse for this call, or None when it must run (a computed step, or a skipped
        step whose branch has no computed output for this input shape yet)."""
        if self.step_runs:
            return None
        cached = self.branch_cache.get(branch)
        if cached is None or cached.input_shape != input_shape:
            logger.debug("step %d: branch %r has no reusable output; running it", self.step, branch)
            return None
        self.reused_outputs += 1
        latest = cached.outputs[-1]
        if self.reuse_coefficient != 0.0 and len(cached.outputs) == 2:
            return _extrapolated(latest, cached.outputs[0], self.reuse_coefficient)
        return _clone_output(latest)

    def record_output(self, branch: str, input_shape: tuple[int, ...] | None, output: Any, denoiser: str) -> None:
        """Keep a computed output for reuse, and its velocity for the decision of later steps."""
        self.forwards += 1
        self.forwards_by_denoiser[denoiser] = self.forwards_by_denoiser.get(denoiser, 0) + 1
        if not self.config.enabled:  # nothing will ever be reused or compared: keep no tensors
            return
        kept = _clone_output(output)
        cached = self.branch_cache.get(branch)
        if cached is None or cached.input_shape != input_shape:
            cached = self.branch_cache[branch] = _BranchCache(input_shape, [])
        cached.outputs = [*cached.outputs[-1:], kept]
        velocity = _velocity_of(kept)
        if self.step_runs and velocity is not None:
            self.step_velocities[branch] = velocity

    def stats(self) -> StepCacheStats:
        return StepCacheStats(
            trace=tuple(self.decision.trace),
            branches=tuple(self.branches),
            forwards=self.forwards,
            reused_outputs=self.reused_outputs,
            forwards_by_denoiser=dict(self.forwards_by_denoiser),
            expected_steps=self.decision.generation_steps,
        )

    def finish_step(self) -> None:
        """The current step is complete (its scheduler step is being taken): enter its velocities."""
        if self.step_timestep is not None:
            self._commit_step()

    def _commit_step(self) -> None:
        """Enter the finished step's velocities into the history (once), if that step was computed."""
        if self._committed == self.step or not self.step_runs or not self.step_velocities:
            return
        self._committed = self.step
        computed = [(b, self.step_velocities[b]) for b in self.step_branches if b in self.step_velocities]
        # Batch-stack the branches that share the first one's per-sample shape; a branch of another
        # shape (rare: e.g. a lower-resolution pass) is cached but does not vote.
        sample_shape = computed[0][1].shape[1:]
        voting = [(b, v) for b, v in computed if v.dim() >= 2 and v.shape[1:] == sample_shape]
        if not voting:
            return
        signature = tuple((branch, tuple(v.shape), v.dtype, v.device) for branch, v in voting)
        if signature != self._history_signature:
            if self._history_signature is not None:
                logger.debug("step %d: the branches changed; the velocity history restarts", self.step)
            self.velocity_history.clear()
            self._history_signature = signature
        self.decision.push_computed(
            self.velocity_history,
            (torch.cat([v.detach() for _, v in voting], dim=0),),
            branches={b: v for b, v in computed},
        )


class StepCacheHookState:
    """What the hooks of one pipeline's denoisers share: the config and each thread's generation."""

    def __init__(
        self,
        config: StepCacheConfig,
        process_group: Any = None,
        check_consistency: bool = False,
        batch_part: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        self.process_group = process_group
        self.check_consistency = check_consistency
        self.batch_part = batch_part
        self._lock = threading.Lock()
        self._generations: dict[int, _Generation] = {}  # thread id -> its current (or last) generation
        # thread -> (guard, epoch, steps, schedule): what its scheduler announced for its next generation
        self._pending: dict[int, tuple[_SchedulerGuard, int, int, list[float] | None]] = {}
        self._latest: _Generation | None = None
        self.generations_started = 0
        self.guards: weakref.WeakSet[_SchedulerGuard] = weakref.WeakSet()  # schedulers watched for these hooks

    def announce_generation(self, guard: _SchedulerGuard, epoch: int, schedule: list[float]) -> None:
        """The calling thread's scheduler was set up: its next call starts a generation of these steps
        (``schedule``: their timesteps)."""
        self.config.check_num_steps(len(schedule))
        with self._lock:
            self._pending[threading.get_ident()] = (guard, epoch, len(schedule), schedule)

    def adjust_announced_steps(self, guard: _SchedulerGuard, begin: int) -> None:
        """``set_begin_index`` (img2img) starts the announced generation at step ``begin``."""
        thread = threading.get_ident()
        with self._lock:
            pending = self._pending.get(thread)
            if pending is not None and pending[0] is guard and pending[3] is not None:
                schedule = pending[3][begin:]
                self.config.check_num_steps(len(schedule))
                self._pending[thread] = (guard, pending[1], len(schedule), schedule)

    def generation_for(self, timestep: float, context_name: str | None) -> tuple[_Generation, str, str]:
        """The calling thread's generation for this call (a new one where the rules say so),
        with the event and the branch."""
        thread = threading.get_ident()
        with self._lock:
            generation = self._generations.get(thread)
            pending = self._pending.pop(thread, None)
        if pending is not None:
            return self._start(thread, *pending), _NEW_STEP, _branch_key(context_name, 0)
        if (
            generation is not None
            and generation.open
            and generation.guard is not None
            and generation.guard.epoch != generation.epoch
        ):
            raise RuntimeError(
                "this pipeline's scheduler was restarted by another thread while this thread's generation "
                "was running; one diffusers pipeline cannot run two generations at once. Give each thread its "
                "own pipeline (they can share the transformer and StepCache: "
                "`type(pipe)(**{**pipe.components, 'scheduler': type(pipe.scheduler).from_config("
                "pipe.scheduler.config)})`, then enable_step_cache() on it)"
            )
        if generation is None:
            return self._start(thread, None, 0, None, None), _NEW_STEP, _branch_key(context_name, 0)
        event, branch = generation.locate(timestep, context_name)
        if event == _NEW_GENERATION:
            return self._start(thread, None, 0, None, None), _NEW_STEP, _branch_key(context_name, 0)
        return generation, event, branch

    def generation_of_thread(self) -> _Generation | None:
        with self._lock:
            return self._generations.get(threading.get_ident())

    def end_thread_generation(self) -> None:
        """diffusers' end-of-call reset (CacheMixin transformers), from the thread that finished."""
        generation = self.generation_of_thread()
        if generation is not None:
            generation.close()

    def end_all(self) -> None:
        """Every thread's next call starts a new generation."""
        with self._lock:
            generations = list(self._generations.values())
            self._pending.clear()
        for generation in generations:
            generation.close()

    def stats(self) -> StepCacheStats:
        generation = self.generation_of_thread() or self._latest
        if generation is None:
            return StepCacheStats(trace=(), branches=(), forwards=0, reused_outputs=0)
        return generation.stats()

    def _start(
        self, thread: int, guard: _SchedulerGuard | None, epoch: int, num_steps: int | None,
        schedule: list[float] | None,
    ) -> _Generation:
        generation = _Generation(self, guard, epoch, num_steps, schedule)
        with self._lock:
            previous = self._generations.get(thread)
            alive = {t.ident for t in threading.enumerate()}
            for other in [t for t in self._generations if t not in alive]:  # threads that ended
                del self._generations[other]
            self._generations[thread] = generation
            self._latest = generation
            self.generations_started += 1
        if previous is not None:
            if previous.decision.trace:
                logger.debug("previous generation: %s", previous.stats().summary())
            previous.close()
        return generation


class _SchedulerGuard:
    """Watches a pipeline's scheduler: ``set_timesteps`` announces each generation (and its step count),
    ``step`` is refused to a thread whose generation another thread restarted, and, with
    ``solver_aware``, skipped steps bypass the solver's memory.

    Installed as instance attributes over the scheduler's own methods; :meth:`uninstall` removes them.
    """

    _METHODS = ("set_timesteps", "set_begin_index", "step")

    def __init__(self, scheduler: Any, denoisers: Sequence[torch.nn.Module]) -> None:
        self._scheduler = weakref.ref(scheduler)
        self._denoisers = [weakref.ref(module) for module in denoisers]
        self._lock = threading.RLock()
        self.epoch = 0
        self.owner: int | None = None
        self._stepper: SkipAwareStepper | None = None
        self._saved = {name: scheduler.__dict__.get(name) for name in self._METHODS}
        for name, wrapper in (("set_timesteps", self._set_timesteps), ("step", self._step),
                              ("set_begin_index", self._set_begin_index)):
            if callable(getattr(scheduler, name, None)):
                setattr(scheduler, name, _signed_like(getattr(scheduler, name), wrapper))
        setattr(scheduler, _GUARD_ATTR, self)

    def uninstall(self) -> None:
        scheduler = self._scheduler()
        if scheduler is None:
            return
        for name, saved in self._saved.items():
            if saved is None:
                scheduler.__dict__.pop(name, None)
            else:
                scheduler.__dict__[name] = saved
        scheduler.__dict__.pop(_GUARD_ATTR, None)

    def hook_state(self) -> StepCacheHookState | None:
        for ref in self._denoisers:
            module = ref()
            hook = _step_cache_hook(module) if module is not None else None
            if hook is not None:
                return hook.state
        return None

    def _original(self, name: str) -> Any:
        scheduler = self._scheduler()
        saved = self._saved[name]
        return saved if saved is not None else getattr(type(scheduler), name).__get__(scheduler)

    def _set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            result = self._original("set_timesteps")(*args, **kwargs)
            self.epoch += 1
            self.owner = threading.get_ident()
            state = self.hook_state()
            if state is not None:
                state.announce_generation(self, self.epoch, [float(t) for t in self._scheduler().timesteps])
                if state.config.solver_aware:
                    self._stepper = SkipAwareStepper(self._scheduler())
            return result

    def _set_begin_index(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            result = self._original("set_begin_index")(*args, **kwargs)
            scheduler = self._scheduler()
            state = self.hook_state()
            begin = getattr(scheduler, "begin_index", None) or 0
            if state is not None:
                state.adjust_announced_steps(self, begin)
            return result

    def _step(self, model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            thread = threading.get_ident()
            if self.owner is not None and thread != self.owner:
                raise RuntimeError(
                    "this scheduler was restarted by another thread during this thread's generation; one diffusers "
                    "pipeline cannot run two generations at once: give each thread its own pipeline"
                )
            state = self.hook_state()
            generation = state.generation_of_thread() if state is not None else None
            if generation is not None and generation.open and generation.guard is self:
                generation.finish_step()
            if (
                self._stepper is not None
                and generation is not None
                and generation.guard is self
                and generation.epoch == self.epoch
                and generation.config.solver_aware
            ):
                return self._stepper.step(model_output, timestep, sample, *args, computed=generation.step_runs,
                                          **kwargs)
            return self._original("step")(model_output, timestep, sample, *args, **kwargs)


class StepCacheHook(ModelHook):
    """Answers each transformer call from the cache on a skipped step, or runs it (see the module doc)."""

    _is_stateful = True  # so pipelines of CacheMixin transformers tell it when a generation ends

    def __init__(self, state: StepCacheHookState, denoiser: str, timestep_arg: str,
                 timestep_position: int | None) -> None:
        super().__init__()
        self.state = state
        self.denoiser = denoiser
        self._timestep_arg = timestep_arg
        self._timestep_position = timestep_position
        # A StateManager attribute is what diffusers' `cache_context` looks for on stateful hooks.
        self._context = _ContextNameProbe() if _ContextNameProbe is not None else None
        self._warned_no_timestep = False
        self._checked_generation = -1  # the last generation in which no other diffusers cache was found

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        placed = self._place_call(module, args, kwargs)
        if placed is None:  # no timestep: the call cannot be placed in a step, so it runs untouched
            return self.fn_ref.original_forward(*args, **kwargs)
        generation, branch, input_shape = placed
        cached = generation.cached_output(branch, input_shape)
        if cached is not None:
            return cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        generation.record_output(branch, input_shape, output, self.denoiser)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by diffusers at the end of a pipeline call (CacheMixin transformers only): the next
        # call starts a new generation, but the stats of this one stay readable until then.
        self.state.end_thread_generation()
        return module

    @torch.compiler.disable
    def _place_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[_Generation, str, tuple[int, ...] | None] | None:
        """Find the call's generation, step and branch (deciding the step if it is new), or None for a
        call without a usable timestep."""
        timestep = self._timestep_of(args, kwargs)
        if timestep is None:
            if not self._warned_no_timestep:
                self._warned_no_timestep = True
                logger.warning(
                    "%s was called without a usable `%s`; StepCache leaves such calls alone",
                    type(module).__name__,
                    self._timestep_arg,
                )
            return None
        context_name = self._context.name if self._context is not None else None
        generation, event, branch = self.state.generation_for(timestep, context_name)
        if self._checked_generation != self.state.generations_started:
            # Once per generation and denoiser, before the step is decided, so a refusal leaves no trace.
            _refuse_other_caches(module)
            self._checked_generation = self.state.generations_started
        generation.enter(event, timestep, branch, self.denoiser)
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        input_shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else None
        return generation, branch, input_shape

    def _timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """The call's timestep argument as one number: the largest value passed (per-token timesteps, as
        in Wan 2.2 TI2V, hold 0 for the clean conditioning frame and the step's value elsewhere)."""
        if self._timestep_arg in kwargs:
            value = kwargs[self._timestep_arg]
        elif self._timestep_position is not None and len(args) > self._timestep_position:
            value = args[self._timestep_position]
        else:
            return None
        if isinstance(value, torch.Tensor):
            if value.numel() == 0:
                return None
            return float(value.detach().max())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return None

    def __repr__(self) -> str:
        return f"StepCacheHook({self.denoiser}, config={_config_text(self.state.config)})"


if StateManager is not None and hasattr(StateManager, "set_context"):

    class _NoState(BaseState):
        def reset(self, *args: Any, **kwargs: Any) -> None:
            pass

    class _ContextNameProbe(StateManager):
        """Receives the name a pipeline passes to ``transformer.cache_context(name)``, per thread.

        diffusers hands the context to every ``StateManager`` attribute of a stateful hook (a
        ``CacheContext`` since 0.42, the bare name before); this one only remembers the name, in
        thread-local storage, so that threads sharing a transformer never see each other's branch.
        """

        def __init__(self) -> None:
            super().__init__(_NoState)
            self._local = threading.local()

        @property
        def name(self) -> str | None:
            return getattr(self._local, "name", None)

        def set_context(self, context: Any) -> None:
            name = getattr(context, "name", context)
            self._local.name = None if name is None else str(name)

        def reset(self, *args: Any, **kwargs: Any) -> None:
            self._local.name = None

else:  # pragma: no cover - a diffusers without cache contexts: branches are told apart by position
    _ContextNameProbe = None


def enable_step_cache(
    pipe_or_transformer: Any,
    config: StepCacheConfig | DiffusionCacheConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    timestep_arg: str | None = None,
    process_group: Any = None,
    check_consistency: bool = False,
    batch_part: tuple[int, int] | None = None,
    **fields: Any,
) -> None:
    """Make a diffusers pipeline skip whole transformer forwards while its velocities stay aligned.

    ``apply_step_cache`` is the same function.

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, if present, ``transformer_2`` are
            hooked, sharing one decision state, and its scheduler marks generations), or the denoiser
            module itself.
        config: a :class:`~stepcache.StepCacheConfig`, or anything
            :func:`~stepcache.as_diffusion_cache_config` accepts (a :class:`~stepcache.DiffusionCacheConfig`,
            a dict or JSON string of its fields, a path to a saved config, or a preset name). None: on a
            pipeline, the recommended preset (``"balanced"``, :data:`~stepcache.config.RECOMMENDED_PRESET`);
            on a bare transformer module, which has no scheduler to plan with, the seed's rule (thresholds
            (0.95, 0.93), countdowns (4, 2)).
        timestep_arg: the name of the denoiser's timestep argument, read to find scheduler steps. None:
            the first of ``timestep``, ``timesteps`` (HiDream), ``t`` (Z-Image) that its ``forward`` takes.
        process_group: a ``torch.distributed`` group whose ranks each hold part of what the hooked
            module returns (its output sharded along the tokens, or one CFG branch per rank with
            ``batch_part``): the decision signals are reduced across it, so every rank takes the
            decisions one process would take on the whole output (docs/distributed.md). Not needed
            where every rank gets the whole output (diffusers' context parallelism and xDiT gather it).
            Every rank enables StepCache with the same arguments and runs one generation at a time
            (from one thread: the collectives of concurrent generations would interleave).
        check_consistency: with a group, check each decision across ranks (tests, debugging).
        batch_part: with a group whose ranks call different CFG branches, ``(index, count)``: this
            rank's calls are the ``index``-th of ``count`` parts of the single-process batch of branches
            (e.g. ``(0, 2)`` on the rank that runs "cond", ``(1, 2)`` on the one that runs "uncond");
            see :class:`~stepcache.StepCacheState`.
        **fields: config fields by their user-facing names (``step_cache_dit_forward_budget=6``) or
            their short runtime names (``policy="planned"``, ``forward_budget=6``). With ``config`` they
            override its fields; without it they are the whole config (the seed's defaults for the rest).

    Enabling it again with the same config and options is a no-op (a second pipeline that shares the
    transformer gets its scheduler watched). Another config is refused, as diffusers refuses a second
    ``enable_cache``: call :func:`disable_step_cache` first, then enable it with the new config.

    Raises:
        ValueError: not a pipeline or module; StepCache already enabled with another config; a
            diffusers cache (``enable_cache``) already active; CPU offload already enabled (enable
            StepCache first); a denoiser whose ``forward`` takes no such timestep argument; options
            that need the pipeline's scheduler (``step_cache_dit_final_steps``,
            ``step_cache_dit_solver_aware``, the ``planned`` policy) on a bare module; a scheduler that
            solver-aware skipping cannot drive; a bad config (the error names the field).

    Example::

        enable_step_cache(pipe)                                          # the "balanced" preset
        enable_step_cache(pipe, policy="planned", forward_budget=4)      # fields as keywords
        enable_step_cache(pipe, {"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [2]})
    """
    _warn_if_untested_diffusers()
    scheduler = None if isinstance(pipe_or_transformer, torch.nn.Module) else getattr(
        pipe_or_transformer, "scheduler", None
    )
    if config is None and not fields and scheduler is not None:
        config = RECOMMENDED_PRESET
    step_config = _as_step_cache_config(config, fields)
    denoisers = _denoisers(pipe_or_transformer)
    needs_scheduler = [name for name, on in (("step_cache_dit_final_steps", step_config.final_steps),
                                             ("step_cache_dit_solver_aware", step_config.solver_aware),
                                             ("step_cache_dit_policy 'planned'", step_config.policy == "planned"))
                       if on]
    if needs_scheduler and scheduler is None:
        raise ValueError(
            f"{needs_scheduler} need the pipeline's scheduler (for the step count and timesteps, or to drive its "
            "solver): enable StepCache on the pipeline, not on the bare transformer"
        )
    if step_config.solver_aware:
        check_solver_aware_support(scheduler)
    if (check_consistency or batch_part is not None) and process_group is None:
        raise ValueError("check_consistency and batch_part need a process_group")
    if batch_part is not None:
        batch_part = _checked_batch_part(batch_part, process_group)
    existing = [_step_cache_hook(module) for _, module in denoisers]
    if any(hook is not None for hook in existing):
        hooked = next(hook for hook in existing if hook is not None)
        ranks = (process_group, check_consistency, batch_part)
        hooked_ranks = (hooked.state.process_group, hooked.state.check_consistency, hooked.state.batch_part)
        if hooked.state.config != step_config or hooked_ranks != ranks or any(hook is None for hook in existing):
            names = ", ".join(name for (name, _), hook in zip(denoisers, existing) if hook is not None)
            raise ValueError(
                f"StepCache is already enabled on {names} with another config ({_config_text(hooked.state.config)}) "
                "or other process_group / check_consistency / batch_part; call disable_step_cache() first, then "
                "enable_step_cache() with the new settings"
            )
        _watch_scheduler(scheduler, [module for _, module in denoisers], hooked.state)
        return
    positions = []
    for name, module in denoisers:  # check every denoiser before hooking any
        _refuse_other_caches(module, name)
        _refuse_accelerate_hook(module, name, "enable_step_cache() before enabling it")
        positions.append(_timestep_position(module, name, timestep_arg))
    state = StepCacheHookState(step_config, process_group, check_consistency, batch_part)
    for (name, module), (arg, position) in zip(denoisers, positions):
        hook = StepCacheHook(state, name, arg, position)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _STEP_CACHE_HOOK)
        if hook.fn_ref is None or hook.fn_ref.original_forward is None:  # the hook API changed under us
            disable_step_cache(pipe_or_transformer)
            raise RuntimeError(
                f"diffusers {diffusers.__version__} did not give the StepCache hook the original forward of "
                f"{name}; supported versions: diffusers{SUPPORTED_DIFFUSERS_VERSIONS}"
            )
        _show_in_diffusers_cache_api(module, step_config)
        logger.debug("StepCache enabled on %s (%s): %s", name, type(module).__name__, _config_text(step_config))
    _watch_scheduler(scheduler, [module for _, module in denoisers], state)


def disable_step_cache(pipe_or_transformer: Any) -> None:
    """Remove StepCache: the transformer's own ``forward`` comes back (and the scheduler's own methods,
    once no watched denoiser carries StepCache). ``remove_step_cache`` is the same function, and on a
    ``CacheMixin`` transformer so is ``transformer.disable_cache()``.

    Raises:
        ValueError: StepCache is not applied to it; CPU offload is enabled on top of it (call
            ``pipe.remove_all_hooks()`` first).
    """
    denoisers = _denoisers(pipe_or_transformer)
    hooked = [(name, module) for name, module in denoisers if _step_cache_hook(module) is not None]
    if not hooked:
        names = ", ".join(name for name, _ in denoisers)
        raise ValueError(f"StepCache is not applied to {names}; nothing to remove")
    for name, module in hooked:  # check every denoiser before unhooking any
        _refuse_accelerate_hook(module, name, "pipe.remove_all_hooks() first, then enable it again")
    for name, module in hooked:
        _remove_hook(module, name)


def is_step_cache_enabled(pipe_or_transformer: Any) -> bool:
    """True when StepCache is enabled on the pipeline's transformer (or ``transformer_2``), or on the
    module passed. On a ``CacheMixin`` transformer, diffusers' ``transformer.is_cache_enabled`` is True
    as well (it is for any cache).

    Raises:
        ValueError: neither a pipeline with a ``transformer`` nor a module.
    """
    return any(_step_cache_hook(module) is not None for _, module in _denoisers(pipe_or_transformer))


def get_step_cache_stats(pipe_or_transformer: Any) -> StepCacheStats:
    """Stats of the calling thread's last generation (or of the one in progress; from another thread,
    the latest generation of any thread): steps computed and skipped, the schedule, the per-step
    similarity trace, forwards run and outputs reused. ``.summary()`` is all of it in one line.

    Raises:
        ValueError: StepCache is not applied to it.
    """
    return _hook_state(pipe_or_transformer).stats()


def reset_step_cache(pipe_or_transformer: Any) -> None:
    """Make the next transformer call of every thread start a new generation.

    Only needed on a bare transformer where the timestep rule cannot see the boundary: e.g. back-to-back
    one-step generations through a transformer that is not a ``CacheMixin``. Enabled on a pipeline,
    StepCache sees each generation start by itself.
    """
    _hook_state(pipe_or_transformer).end_all()


# The names of the first release, in diffusers' hook-function style: the same functions.
apply_step_cache = enable_step_cache
remove_step_cache = disable_step_cache

__all__ = [
    "SUPPORTED_DIFFUSERS_VERSIONS",
    "StepCacheStats",
    "apply_step_cache",
    "disable_step_cache",
    "enable_step_cache",
    "get_step_cache_stats",
    "is_step_cache_enabled",
    "remove_step_cache",
    "reset_step_cache",
]


# --- private helpers ---------------------------------------------------------------------------


def _watch_scheduler(scheduler: Any, denoisers: list[torch.nn.Module], state: StepCacheHookState) -> None:
    if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
        return
    guard = getattr(scheduler, _GUARD_ATTR, None)
    if isinstance(guard, _SchedulerGuard):
        guard.uninstall()
    state.guards.add(_SchedulerGuard(scheduler, denoisers))


def _remove_hook(module: torch.nn.Module, name: str) -> None:
    """Unhook one denoiser; then put back the own methods of every scheduler that watched only
    denoisers without StepCache."""
    state = _step_cache_hook(module).state
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.remove_hook(_STEP_CACHE_HOOK, recurse=False)
    _restore_class_forward(module, registry)
    _hide_from_diffusers_cache_api(module)
    for guard in list(state.guards):
        if guard.hook_state() is None:
            guard.uninstall()
            state.guards.discard(guard)
    logger.debug("StepCache removed from %s (%s)", name, type(module).__name__)


def _show_in_diffusers_cache_api(module: torch.nn.Module, config: StepCacheConfig) -> None:
    """On a ``CacheMixin`` transformer, make diffusers' cache API see StepCache: ``is_cache_enabled``
    reads ``_cache_config`` (so ``enable_cache`` refuses another cache with diffusers' own message), and
    ``disable_cache`` (an instance attribute over the class's, which knows only diffusers' caches)
    removes StepCache."""
    if CacheMixin is None or not isinstance(module, CacheMixin):
        return
    module._cache_config = config
    module_ref = weakref.ref(module)

    def disable_cache() -> None:
        """Remove StepCache from this transformer (``disable_step_cache(transformer)``)."""
        target = module_ref()
        if target is not None and _step_cache_hook(target) is not None:
            disable_step_cache(target)

    disable_cache.removes_step_cache = True  # what _hide_from_diffusers_cache_api looks for
    module.disable_cache = disable_cache


def _hide_from_diffusers_cache_api(module: torch.nn.Module) -> None:
    """Undo :func:`_show_in_diffusers_cache_api`: the class's ``_cache_config`` and ``disable_cache`` again."""
    if isinstance(module.__dict__.get("_cache_config"), StepCacheConfig):
        del module.__dict__["_cache_config"]
    if getattr(module.__dict__.get("disable_cache"), "removes_step_cache", False):
        del module.__dict__["disable_cache"]


def _config_text(config: StepCacheConfig) -> str:
    """The fields in force, as users write them (:func:`~stepcache.config.describe_config`)."""
    return describe_config(config)


def _signed_like(original: Any, implementation: Any) -> Any:
    """A function that calls ``implementation`` but shows ``original``'s signature: pipelines inspect it
    (diffusers' ``retrieve_timesteps`` looks for a ``sigmas`` argument of ``set_timesteps``)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return implementation(*args, **kwargs)

    return wrapper


def _branch_key(context_name: str | None, position: int) -> str:
    return context_name if context_name is not None else f"call{position}"


def _velocity_of(output: Any) -> torch.Tensor | None:
    """The velocity in a transformer output: the tensor itself, ``output[0]`` of a tuple, or the
    first field of a ``BaseOutput`` (``.sample``); a list of per-sample tensors of one shape (Z-Image)
    is stacked along a new batch dimension."""
    if isinstance(output, Mapping):
        output = next(iter(output.values()), None)
    elif isinstance(output, (tuple, list)) and output and not _is_sample_list(output):
        output = output[0]
    if isinstance(output, torch.Tensor):
        return output
    if _is_sample_list(output):
        return torch.stack(list(output))
    return None


def _is_sample_list(value: Any) -> bool:
    """A list of per-sample tensors of one shape (how Z-Image returns its batch)."""
    return (
        isinstance(value, list) and len(value) > 0
        and all(isinstance(v, torch.Tensor) and v.shape == value[0].shape for v in value)
    )


def _extrapolated(latest: Any, previous: Any, coefficient: float) -> Any:
    """A copy of ``latest`` whose velocity is extrapolated from ``previous`` (other fields reused)."""
    new, old = _velocity_of(latest), _velocity_of(previous)
    (velocity,) = extrapolate_prediction((new,), (old,), coefficient)

    def shaped_like(value: Any) -> Any:  # the velocity in the form the pipeline expects it
        return list(velocity.unbind(0)) if _is_sample_list(value) else velocity

    if isinstance(latest, torch.Tensor) or _is_sample_list(latest):
        return shaped_like(latest)
    out = _clone_output(latest)
    if isinstance(out, Mapping):
        key = next(iter(out.keys()))
        out[key] = shaped_like(out[key])
        return out
    return type(out)([shaped_like(out[0]), *out[1:]])


def _clone_output(output: Any) -> Any:
    """A copy whose tensors share no memory with ``output``: a cached output must survive what the
    caller does with the one it got (in-place edits, or a compiled model's reused output buffers)."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_clone_output(v) for v in output)
    if isinstance(output, list):
        return [_clone_output(v) for v in output]
    if isinstance(output, Mapping):  # diffusers' BaseOutput dataclasses (Transformer2DModelOutput...)
        copied = copy.copy(output)
        for key, value in output.items():
            copied[key] = _clone_output(value)
        return copied
    return output


def _as_step_cache_config(config: Any, fields: Mapping[str, Any] | None = None) -> StepCacheConfig:
    if fields:
        return StepCacheConfig.from_diffusion_cache_config(_with_fields(config, fields))
    if isinstance(config, StepCacheConfig):
        return config
    if config is not None and not isinstance(config, (DiffusionCacheConfig, Mapping, str, os.PathLike)):
        raise ValueError(
            f"config must be a StepCacheConfig, a DiffusionCacheConfig, a dict or JSON string of its fields, a "
            f"path to a saved config, a preset name, or None; got {type(config).__name__}: {config!r}"
        )
    return StepCacheConfig.from_diffusion_cache_config(as_diffusion_cache_config(config))


def _with_fields(config: Any, fields: Mapping[str, Any]) -> DiffusionCacheConfig:
    """``config`` (None: the seed's defaults) with ``fields`` (user-facing or runtime names) overridden."""
    user_fields: dict[str, Any] = {}
    for name, value in fields.items():
        user = name if name in RUNTIME_FIELD_NAMES else USER_FIELD_NAMES.get(name)
        if user is None:
            raise TypeError(
                f"enable_step_cache() got an unexpected keyword argument {name!r}; config fields are "
                f"{sorted(RUNTIME_FIELD_NAMES)} (or their short names {sorted(USER_FIELD_NAMES)})"
            )
        if user in user_fields:
            raise TypeError(
                f"enable_step_cache() got {user!r} twice (as {user!r} and as {RUNTIME_FIELD_NAMES[user]!r})"
            )
        user_fields[user] = value
    base = _as_step_cache_config(config).to_diffusion_cache_config()
    return DiffusionCacheConfig.from_dict({**base.to_dict(), **user_fields})


def _denoisers(pipe_or_transformer: Any) -> list[tuple[str, torch.nn.Module]]:
    """``[(name, module)]``: the module itself, or the pipeline's transformer component(s)."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [(type(pipe_or_transformer).__name__, pipe_or_transformer)]
    found = [
        (name, getattr(pipe_or_transformer, name))
        for name in _DENOISER_COMPONENTS
        if isinstance(getattr(pipe_or_transformer, name, None), torch.nn.Module)
    ]
    if not found:
        raise ValueError(
            f"expected a diffusers pipeline with a `transformer` (or `transformer_2`) component, or the "
            f"denoiser module itself; got {type(pipe_or_transformer).__name__}. For a pipeline whose denoiser "
            "is stored under another name, pass the module (e.g. enable_step_cache(pipe.unet))."
        )
    return found


def _step_cache_hook(module: torch.nn.Module) -> StepCacheHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(_STEP_CACHE_HOOK) if registry is not None else None
    return hook if isinstance(hook, StepCacheHook) else None


def _hook_state(pipe_or_transformer: Any) -> StepCacheHookState:
    denoisers = _denoisers(pipe_or_transformer)
    for _, module in denoisers:
        hook = _step_cache_hook(module)
        if hook is not None:
            return hook.state
    names = ", ".join(name for name, _ in denoisers)
    raise ValueError(f"StepCache is not applied to {names}; call enable_step_cache() first")


def _timestep_position(module: torch.nn.Module, name: str, timestep_arg: str | None) -> tuple[str, int | None]:
    """``(argument name, position)``: the module's timestep argument (``timestep_arg``, or the first
    of :data:`_TIMESTEP_ARGS` it takes) and where it sits among the positional arguments of its own
    ``forward`` (None: keyword-only).

    Read from the class, not the instance: another hook's wrapper may hide the real signature.
    """
    if timestep_arg is not None and (not isinstance(timestep_arg, str) or not timestep_arg.isidentifier()):
        raise ValueError(
            f"timestep_arg must be the name of an argument of the denoiser's forward; got {timestep_arg!r}"
        )
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters]
    candidates = (timestep_arg,) if timestep_arg is not None else _TIMESTEP_ARGS
    found = next((arg for arg in candidates if arg in names), None)
    if found is None:
        wanted = f"`{candidates[0]}` argument"
        if timestep_arg is None:
            wanted += " (nor " + " or ".join(f"`{arg}`" for arg in candidates[1:]) + ")"
        raise ValueError(
            f"{name} ({type(module).__name__}) has no {wanted} in its forward (arguments: {names}); "
            "StepCache reads the timestep to find scheduler steps: name it with "
            "enable_step_cache(..., timestep_arg=...)"
        )
    position = names.index(found)
    kind = parameters[position].kind
    positional = kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return found, (position if positional else None)


def _other_cache(module: torch.nn.Module) -> str | None:
    """A diffusers cache active on the module or its blocks (every diffusers cache has a stateful hook)."""
    cache_config = getattr(module, "_cache_config", None)
    if cache_config is not None and not isinstance(cache_config, StepCacheConfig):  # StepCacheConfig: ours
        return f"{type(cache_config).__name__} (enable_cache)"
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None)
        if not isinstance(hooks, Mapping):
            continue
        for hook_name, hook in hooks.items():
            if hook_name != _STEP_CACHE_HOOK and getattr(hook, "_is_stateful", False):
                return f"{type(hook).__name__} (hook {hook_name!r})"
    return None


def _refuse_other_caches(module: torch.nn.Module, name: str | None = None) -> None:
    other = _other_cache(module)
    if other is None:
        return
    where = f"{name} ({type(module).__name__})" if name else type(module).__name__
    advice = "call disable_cache()" if "enable_cache" in other else "remove that cache's hooks"
    message = (
        f"{where} also runs diffusers' {other}. StepCache cannot share a transformer with another "
        f"diffusers cache (several count calls as denoising steps, which skipped steps would corrupt); "
        f"{advice} or call disable_step_cache() first"
    )
    raise (ValueError if name else RuntimeError)(message)


def _refuse_accelerate_hook(module: torch.nn.Module, name: str, fix: str) -> None:
    """accelerate's hooks (model CPU offload) save the forward they wrap and put it back whenever the
    pipeline re-arms them, after every call: a StepCache hook added under one would silently vanish
    after the first generation, and removing one from under it would drop the offload hook."""
    if hasattr(module, "_hf_hook"):
        raise ValueError(
            f"{name} ({type(module).__name__}) carries an accelerate hook (enable_model_cpu_offload / "
            f"enable_sequential_cpu_offload); StepCache must sit under it: call {fix}"
        )


def _restore_class_forward(module: torch.nn.Module, registry: HookRegistry) -> None:
    """diffusers puts back the bound method it found as an instance attribute; when no hook is left
    and that is the class's own forward, drop it so the module is as it was before any hook."""
    if getattr(registry, "hooks", None):
        return
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def _warn_if_untested_diffusers() -> None:
    match = re.match(r"(\d+)\.(\d+)", diffusers.__version__)
    if match is None:
        return
    version = (int(match.group(1)), int(match.group(2)))
    low, high = _SUPPORTED_RANGE
    if not low <= version < high:
        logger.warning(
            "diffusers %s is outside the tested range %s; StepCache checks the hook features it uses, "
            "but report problems",
            diffusers.__version__,
            SUPPORTED_DIFFUSERS_VERSIONS,
        )
