"""StepCache for diffusers pipelines: one hook on the transformer skips whole forwards.

Usage (see docs/diffusers.md)::

    from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats

    apply_step_cache(pipe)                      # or apply_step_cache(pipe.transformer, config)
    video = pipe(prompt, num_inference_steps=16).frames[0]
    print(get_step_cache_stats(pipe).summary())  # stepcache: 4/16 steps computed, 12 skipped [RR....R....R....] ...

A diffusers ``ModelHook`` replaces the transformer's ``forward``. The pipeline is unchanged: it still
calls the transformer once or twice per scheduler step and still steps its scheduler; on a skipped
step the hook answers every call with that call's last computed output, without running the model.

**Where a call belongs** (the pipeline never says which step it is in, so the hook reads it from the
call). Each call's *timestep* is the largest value of its ``timestep`` argument (any units: Wan/SD3
pass 0..1000, Flux 0..1). Its *branch* is the name the pipeline gave ``transformer.cache_context``
(``"cond"``, ``"uncond"``, ``"cond_uncond"``...), or, without a context, its position among the calls
of the step (``"call0"``, ``"call1"``...). Then, compared with the current step:

1. no generation in progress (first call after :func:`apply_step_cache`, after the end of a
   pipeline call of a ``CacheMixin`` transformer, or after :func:`reset_step_cache`) -> new
   generation, step 0;
2. same timestep and a branch not seen yet in this step -> same step, another branch;
3. same timestep and a branch already seen in this step -> next step (a second evaluation at the
   same time, or two timesteps that became equal after rounding to bfloat16);
4. timestep moved on in the generation's direction (set by its first change: Wan, SD3 and Flux
   descend, some pipelines ascend) -> next step;
5. timestep moved against that direction -> new generation (the pipeline started over).

**What decides.** One decision per step, by the core's :class:`~stepcache.StepCacheState`, made at the
step's first call and shared by all its branches. The history entry of each computed step is
``(torch.cat(branch outputs, dim=0),)`` in call order, so the batch-mean cosine covers every sample of
every branch: a pipeline that calls cond and uncond separately (Wan, Flux true CFG, QwenImage) and one
that makes a single batched call holding both halves (SD3, CogVideoX, LTX) decide identically.
These are the raw branch predictions: the hook never sees the guided (post-CFG) velocity that
DreamZero compares. When the branches of two computed steps differ (a branch appears, disappears or
changes shape), the history restarts, so the rule only ever compares like with like.

Caches that diffusers applies itself (``enable_cache`` or its ``apply_*`` functions) are refused:
several of them count calls as steps, which step skipping would silently corrupt. accelerate's model
CPU offload must be enabled after :func:`apply_step_cache` (enforced; see ``_refuse_accelerate_hook``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stepcache.config import DiffusionCacheConfig, StepCacheConfig, as_diffusion_cache_config
from stepcache.state import StepCacheState, StepRecord, TraceSummary

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

logger = logging.getLogger(__name__)

# The releases whose hook API this module was written against and tested with (0.35 added
# `cache_context`, through which pipelines name their CFG branches). Others get a warning, not a refusal:
# the features used are checked where they are used.
SUPPORTED_DIFFUSERS_VERSIONS = ">=0.35,<0.43"
_SUPPORTED_RANGE = ((0, 35), (0, 43))

_STEP_CACHE_HOOK = "stepcache_step_hook"
# Pipeline attributes that hold a denoiser (Wan 2.2 switches from `transformer` to `transformer_2`
# mid-generation; both then share one decision state).
_DENOISER_COMPONENTS = ("transformer", "transformer_2")

# What a step-boundary check concluded about one call (StepCacheHookState.locate).
_NEW_GENERATION = "generation"
_NEW_STEP = "step"
_SAME_STEP = "branch"


@dataclass(frozen=True)
class StepCacheStats(TraceSummary):
    """What StepCache did in the last (or the current) generation.

    Attributes:
        trace: one :class:`~stepcache.StepRecord` per scheduler step (``step``, ``ran``, ``reason``,
            ``similarity``: the cosine the rule computed there, None where it did not need one).
        branches: the branches seen (context names, or ``callN`` by position within a step).
        forwards: transformer forwards that ran (every branch of a computed step counts).
        reused_outputs: calls answered from the cache instead.
    """

    trace: tuple[StepRecord, ...]
    branches: tuple[str, ...]
    forwards: int
    reused_outputs: int

    def summary(self) -> str:
        return f"{super().summary()}; {self.forwards} forwards, {self.reused_outputs} reused outputs"


@dataclass
class _BranchOutput:
    """A branch's last computed output and the input shape it answered."""

    input_shape: tuple[int, ...] | None
    output: Any


class StepCacheHookState:
    """What changes during one generation: where the sampler is, the decision and the cached outputs.

    Shared by the hooks of every denoiser of one pipeline. Tensors are dropped when a generation ends;
    the decision trace and the counters stay readable until the next generation starts.
    """

    def __init__(self, config: StepCacheConfig) -> None:
        self.config = config
        self.decision = StepCacheState(config)
        self.velocity_history: list[tuple[torch.Tensor]] = []
        self._history_signature: tuple[Any, ...] | None = None
        self.branch_outputs: dict[str, _BranchOutput] = {}
        self.branches: dict[str, None] = {}  # insertion-ordered set of every branch seen
        self.forwards = 0
        self.reused_outputs = 0
        self.in_generation = False
        self.generation = -1  # counts generations, so each hook checks once per generation
        self.step_timestep: float | None = None
        self.direction = 0  # +1 / -1 once the generation's timesteps have moved; 0 before
        self.step_runs = True
        self.step_branches: list[str] = []
        self.step_velocities: dict[str, torch.Tensor] = {}

    def locate(self, timestep: float, context_name: str | None) -> tuple[str, str]:
        """Place one call by the module's rule, without changing anything: ``(event, branch)``."""
        if not self.in_generation or self.step_timestep is None:
            return _NEW_GENERATION, _branch_key(context_name, 0)
        if timestep == self.step_timestep:
            branch = _branch_key(context_name, len(self.step_branches))
            return (_NEW_STEP if branch in self.step_branches else _SAME_STEP), branch
        moved = 1 if timestep > self.step_timestep else -1
        if self.direction in (0, moved):
            return _NEW_STEP, _branch_key(context_name, 0)
        return _NEW_GENERATION, _branch_key(context_name, 0)

    def enter(self, event: str, timestep: float, branch: str) -> None:
        """Apply what :meth:`locate` found; a new step (or generation) is decided here, once."""
        if event == _NEW_GENERATION:
            self.begin_generation()
        elif event == _NEW_STEP:
            if timestep != self.step_timestep:
                self.direction = 1 if timestep > self.step_timestep else -1
            self._commit_step()
        if event != _SAME_STEP:
            self.step_timestep = timestep
            self.step_branches = []
            self.step_velocities = {}
            self.step_runs = self.decision.should_run_step(self.velocity_history)
        self.step_branches.append(branch)
        self.branches.setdefault(branch)

    def begin_generation(self) -> None:
        """Forget everything about the previous generation, its trace included."""
        if self.decision.trace:
            logger.debug("previous generation: %s", self.stats().summary())
        self.end_generation()
        self.decision.reset()
        self.branches = {}
        self.forwards = 0
        self.reused_outputs = 0
        self.direction = 0
        self.in_generation = True
        self.generation += 1

    def end_generation(self) -> None:
        """The generation is over: free the cached tensors, keep the trace and counters."""
        self.in_generation = False
        self.step_timestep = None
        self.velocity_history.clear()
        self._history_signature = None
        self.branch_outputs.clear()
        self.step_branches = []
        self.step_velocities = {}

    def cached_output(self, branch: str, input_shape: tuple[int, ...] | None) -> Any | None:
        """The output to reuse for this call, or None when it must run (a computed step, or a skipped
        step whose branch has no computed output for this input shape yet)."""
        if self.step_runs:
            return None
        cached = self.branch_outputs.get(branch)
        if cached is None or cached.input_shape != input_shape:
            logger.debug("step %d: branch %r has no reusable output; running it", self._step, branch)
            return None
        self.reused_outputs += 1
        return _clone_output(cached.output)

    def record_output(self, branch: str, input_shape: tuple[int, ...] | None, output: Any) -> None:
        """Keep a computed output for reuse, and its velocity for the decision of later steps."""
        self.forwards += 1
        if not self.config.enabled:  # nothing will ever be reused: keep no tensors
            return
        kept = _clone_output(output)
        self.branch_outputs[branch] = _BranchOutput(input_shape, kept)
        velocity = _velocity_of(kept)
        if self.step_runs and velocity is not None:
            self.step_velocities[branch] = velocity

    def stats(self) -> StepCacheStats:
        return StepCacheStats(
            trace=tuple(self.decision.trace),
            branches=tuple(self.branches),
            forwards=self.forwards,
            reused_outputs=self.reused_outputs,
        )

    @property
    def _step(self) -> int:
        return len(self.decision.trace) - 1

    def _commit_step(self) -> None:
        """Enter the finished step's velocities into the history, if that step was computed."""
        if not self.step_runs or not self.step_velocities:
            return
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
                logger.debug("step %d: the branches changed; the velocity history restarts", self._step)
            self.velocity_history.clear()
            self._history_signature = signature
        self.velocity_history.append((torch.cat([v.detach() for _, v in voting], dim=0),))
        self.decision.trim_history(self.velocity_history)


class StepCacheHook(ModelHook):
    """Answers each transformer call from the cache on a skipped step, or runs it (see the module doc)."""

    _is_stateful = True  # so pipelines of CacheMixin transformers tell it when a generation ends

    def __init__(self, state: StepCacheHookState, timestep_position: int | None) -> None:
        super().__init__()
        self.state = state
        self._timestep_position = timestep_position
        # A StateManager attribute is what diffusers' `cache_context` looks for on stateful hooks.
        self._context = _ContextNameProbe() if _ContextNameProbe is not None else None
        self._warned_no_timestep = False
        self._checked_generation = -1  # the last generation in which no other diffusers cache was found

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        placed = self._place_call(module, args, kwargs)
        if placed is None:  # no timestep: the call cannot be placed in a step, so it runs untouched
            return self.fn_ref.original_forward(*args, **kwargs)
        branch, input_shape = placed
        cached = self.state.cached_output(branch, input_shape)
        if cached is not None:
            return cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.state.record_output(branch, input_shape, output)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by diffusers at the end of a pipeline call (CacheMixin transformers only): the next
        # call starts a new generation, but the stats of this one stay readable until then.
        self.state.end_generation()
        return module

    @torch.compiler.disable
    def _place_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, tuple[int, ...] | None] | None:
        """Find the call's step and branch (deciding the step if it is new): ``(branch, input shape)``,
        or None for a call without a usable timestep."""
        timestep = self._timestep_of(args, kwargs)
        if timestep is None:
            if not self._warned_no_timestep:
                self._warned_no_timestep = True
                logger.warning(
                    "%s was called without a usable `timestep`; StepCache leaves such calls alone",
                    type(module).__name__,
                )
            return None
        context_name = self._context.name if self._context is not None else None
        event, branch = self.state.locate(timestep, context_name)
        generation = self.state.generation + (event == _NEW_GENERATION)
        if generation != self._checked_generation:
            # Once per generation and denoiser, before anything changes, so a refusal leaves no trace.
            _refuse_other_caches(module)
            self._checked_generation = generation
        self.state.enter(event, timestep, branch)
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        input_shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else None
        return branch, input_shape

    def _timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """The call's timestep as one number: the largest value passed (per-token timesteps, as in
        Wan 2.2 TI2V, hold 0 for the clean conditioning frame and the step's value elsewhere)."""
        if "timestep" in kwargs:
            value = kwargs["timestep"]
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
        return f"StepCacheHook(config={self.state.config})"


if StateManager is not None and hasattr(StateManager, "set_context"):

    class _NoState(BaseState):
        def reset(self, *args: Any, **kwargs: Any) -> None:
            pass

    class _ContextNameProbe(StateManager):
        """Receives the name a pipeline passes to ``transformer.cache_context(name)``.

        diffusers hands the context to every ``StateManager`` attribute of a stateful hook (a
        ``CacheContext`` since 0.42, the bare name before); this one only remembers the name.
        """

        def __init__(self) -> None:
            super().__init__(_NoState)
            self.name: str | None = None

        def set_context(self, context: Any) -> None:
            name = getattr(context, "name", context)
            self.name = None if name is None else str(name)

        def reset(self, *args: Any, **kwargs: Any) -> None:
            self.name = None

else:  # pragma: no cover - a diffusers without cache contexts: branches are told apart by position
    _ContextNameProbe = None


def apply_step_cache(
    pipe_or_transformer: Any,
    config: StepCacheConfig | DiffusionCacheConfig | Mapping[str, Any] | str | None = None,
) -> None:
    """Make a diffusers pipeline skip whole transformer forwards while its velocities stay aligned.

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, if present, ``transformer_2`` are
            hooked, sharing one decision state), or the denoiser module itself.
        config: a :class:`~stepcache.StepCacheConfig`, or anything
            :func:`~stepcache.as_diffusion_cache_config` accepts (a :class:`~stepcache.DiffusionCacheConfig`,
            a dict or JSON string of its fields, or None for the defaults: thresholds (0.95, 0.93),
            countdowns (4, 2)).

    Raises:
        ValueError: not a pipeline or module; StepCache already applied; a diffusers cache
            (``enable_cache``) already active; CPU offload already enabled (apply StepCache first);
            a denoiser whose ``forward`` takes no ``timestep``; a bad config (the error names the field).

    Example::

        apply_step_cache(pipe, {"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [2]})
    """
    _warn_if_untested_diffusers()
    step_config = _as_step_cache_config(config)
    denoisers = _denoisers(pipe_or_transformer)
    positions = []
    for name, module in denoisers:  # check every denoiser before hooking any
        if _step_cache_hook(module) is not None:
            raise ValueError(
                f"StepCache is already applied to {name} ({type(module).__name__}); "
                "call remove_step_cache() first to apply it with another config"
            )
        _refuse_other_caches(module, name)
        _refuse_accelerate_hook(module, name, "apply_step_cache() before enabling it")
        positions.append(_timestep_position(module, name))
    state = StepCacheHookState(step_config)
    for (name, module), position in zip(denoisers, positions):
        hook = StepCacheHook(state, position)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _STEP_CACHE_HOOK)
        if hook.fn_ref is None or hook.fn_ref.original_forward is None:  # the hook API changed under us
            remove_step_cache(pipe_or_transformer)
            raise RuntimeError(
                f"diffusers {diffusers.__version__} did not give the StepCache hook the original forward of "
                f"{name}; supported versions: diffusers{SUPPORTED_DIFFUSERS_VERSIONS}"
            )
        logger.debug("StepCache applied to %s (%s): %s", name, type(module).__name__, step_config)


def remove_step_cache(pipe_or_transformer: Any) -> None:
    """Remove the StepCache hook(s) and restore the transformer's own ``forward``.

    Raises:
        ValueError: StepCache is not applied to it; CPU offload is enabled on top of it (call
            ``pipe.remove_all_hooks()`` first).
    """
    denoisers = _denoisers(pipe_or_transformer)
    removed = False
    for name, module in denoisers:
        if _step_cache_hook(module) is None:
            continue
        _refuse_accelerate_hook(module, name, "pipe.remove_all_hooks() first, then enable it again")
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.remove_hook(_STEP_CACHE_HOOK, recurse=False)
        _restore_class_forward(module, registry)
        removed = True
        logger.debug("StepCache removed from %s (%s)", name, type(module).__name__)
    if not removed:
        names = ", ".join(name for name, _ in denoisers)
        raise ValueError(f"StepCache is not applied to {names}; nothing to remove")


def get_step_cache_stats(pipe_or_transformer: Any) -> StepCacheStats:
    """Stats of the last generation (or of the one in progress): steps computed and skipped, the
    schedule, the per-step similarity trace, forwards run and outputs reused.

    Raises:
        ValueError: StepCache is not applied to it.
    """
    return _hook_state(pipe_or_transformer).stats()


def reset_step_cache(pipe_or_transformer: Any) -> None:
    """Make the next transformer call start a new generation.

    Only needed where the timestep rule cannot see the boundary: e.g. back-to-back one-step
    generations through a transformer that is not a ``CacheMixin``.
    """
    _hook_state(pipe_or_transformer).end_generation()


# --- private helpers ---------------------------------------------------------------------------


def _branch_key(context_name: str | None, position: int) -> str:
    return context_name if context_name is not None else f"call{position}"


def _velocity_of(output: Any) -> torch.Tensor | None:
    """The velocity in a transformer output: the tensor itself, ``output[0]`` of a tuple, or the
    first field of a ``BaseOutput`` (``.sample``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        first = next(iter(output.values()), None)
        return first if isinstance(first, torch.Tensor) else None
    if isinstance(output, Sequence) and not isinstance(output, str) and len(output) > 0:
        return output[0] if isinstance(output[0], torch.Tensor) else None
    return None


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


def _as_step_cache_config(config: Any) -> StepCacheConfig:
    if isinstance(config, StepCacheConfig):
        return config
    if config is not None and not isinstance(config, (DiffusionCacheConfig, Mapping, str)):
        raise ValueError(
            f"config must be a StepCacheConfig, a DiffusionCacheConfig, a dict or JSON string of its fields, "
            f"or None; got {type(config).__name__}: {config!r}"
        )
    return StepCacheConfig.from_diffusion_cache_config(as_diffusion_cache_config(config))


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
            "is stored under another name, pass the module (e.g. apply_step_cache(pipe.unet))."
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
    raise ValueError(f"StepCache is not applied to {names}; call apply_step_cache() first")


def _timestep_position(module: torch.nn.Module, name: str) -> int | None:
    """Where ``timestep`` sits among the positional arguments of the module's own ``forward``.

    Read from the class, not the instance: another hook's wrapper may hide the real signature.
    """
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters]
    if "timestep" not in names:
        raise ValueError(
            f"{name} ({type(module).__name__}) has no `timestep` argument in its forward "
            f"(arguments: {names}); StepCache reads it to find scheduler steps"
        )
    position = names.index("timestep")
    kind = parameters[position].kind
    positional = kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return position if positional else None


def _other_cache(module: torch.nn.Module) -> str | None:
    """A diffusers cache active on the module or its blocks (every diffusers cache has a stateful hook)."""
    cache_config = getattr(module, "_cache_config", None)
    if cache_config is not None:
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
    advice = "disable_cache()" if "enable_cache" in other else "remove that cache's hooks"
    message = (
        f"{where} also runs diffusers' {other}. StepCache cannot share a transformer with another "
        f"diffusers cache (several count calls as denoising steps, which skipped steps would corrupt); "
        f"call {advice} or remove_step_cache() first"
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
