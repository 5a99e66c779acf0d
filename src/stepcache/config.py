"""Configuration for step-level DiT velocity caching.

Two configs describe the same choice:

- :class:`DiffusionCacheConfig` is what users write (vLLM-Omni's field names; a dict, a JSON string, a
  JSON file or a preset name works too, via :func:`as_diffusion_cache_config`);
- :class:`StepCacheConfig` is the frozen runtime config the decision rule reads.

:class:`StepCacheConfig` is validated when it is built. :class:`DiffusionCacheConfig` checks only its
form when built (a mapping, known keys), as vLLM-Omni's does; its values are checked where vLLM-Omni
checks them, when it is translated (:meth:`StepCacheConfig.from_diffusion_cache_config`, that is at
``enable`` and at every entry point), and when it is read from a file. Either way a bad value fails
before any forward. Every error names the field (in the caller's own field names), the value given
and what is allowed.

The seed's fields (thresholds, countdowns, history lengths) keep the seed's defaults and meaning.
Every other field is opt-in and defaults to the seed's behaviour; see :class:`StepCacheConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The fixed 8-of-16 schedule DreamZero's released inference code uses when its adaptive rule is off.
DREAMZERO_STATIC_RUN_STEPS = (0, 1, 2, 6, 10, 13, 14, 15)

# The decision rules (``policy``): the seed's cosine thresholds, or an accumulated error estimate.
SIMILARITY_POLICY = "similarity"
ERROR_BUDGET_POLICY = "error_budget"
PLANNED_POLICY = "planned"
POLICIES = (SIMILARITY_POLICY, ERROR_BUDGET_POLICY, PLANNED_POLICY)
# What a skipped step answers with (``reuse``): the last computed prediction, or a first-order
# extrapolation in time from the last two.
REUSE_CACHED = "cache"
REUSE_EXTRAPOLATE = "extrapolate"
REUSE_MODES = (REUSE_CACHED, REUSE_EXTRAPOLATE)

# Runtime field name -> user-facing field name (vLLM-Omni's style). Errors use the caller's names.
USER_FIELD_NAMES: dict[str, str] = {
    "enabled": "step_cache_dit_enabled",
    "min_history_steps": "step_cache_dit_min_history",
    "max_history": "step_cache_dit_max_history",
    "sim_thresholds": "velocity_sim_thresholds",
    "skip_countdowns": "velocity_skip_countdowns",
    "static_run_steps": "step_cache_dit_static_steps",
    "policy": "step_cache_dit_policy",
    "error_budget": "velocity_error_budget",
    "forward_budget": "step_cache_dit_forward_budget",
    "forward_fraction": "step_cache_dit_forward_fraction",
    "warmup_steps": "step_cache_dit_warmup_steps",
    "final_steps": "step_cache_dit_final_steps",
    "max_skip_steps": "step_cache_dit_max_skip_steps",
    "reuse": "velocity_reuse",
    "extrapolation_damping": "velocity_extrapolation_damping",
    "solver_aware": "step_cache_dit_solver_aware",
}
RUNTIME_FIELD_NAMES = {user: runtime for runtime, user in USER_FIELD_NAMES.items()}
# The ``format`` a calibration file (stepcache.calibration.result) declares; a config file may be one.
CALIBRATION_FORMAT_NAME = "stepcache-calibration"


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80
_SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 8
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` cut to a readable length: every error message that echoes a value the caller gave
    uses it, so a 5 MB config cannot become a 5 MB message."""
    return _SHOWN.repr(value)


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON value in ``path``; a missing, unreadable, empty, non-UTF-8 (a pickle, any binary: it is
    only ever parsed as JSON, never executed) or malformed file is a ValueError that says what the file
    was for (``what``) and names it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 JSON text (byte {err.start} is "
            f"{err.object[err.start:err.start + 1]!r}); it should hold a JSON object, not a pickle or other binary "
            "file"
        ) from None
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    if not text.strip():
        raise ValueError(f"{what} {str(path)!r} is empty; it should hold a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_sequence(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list or tuple, got {shown(value)} ({type(value).__name__})")
    return tuple(value)


def _count(name: str, value: Any, minimum: int, meaning: str) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({meaning}), got {shown(value)}")
    return int(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {shown(value)}")
    return str(value)


def _validated(values: Mapping[str, Any], user_names: bool) -> dict[str, Any]:
    """Check one config's values (keyed by runtime field name); return them normalised (tuples,
    floats, ints). Messages use the user-facing names when ``user_names``."""

    def name(runtime: str) -> str:
        return USER_FIELD_NAMES[runtime] if user_names else runtime

    out: dict[str, Any] = {}
    # vLLM-Omni's one check comes first, with its message first: code written against it matches on that text.
    thresholds = _as_sequence(name("sim_thresholds"), values["sim_thresholds"])
    countdowns = _as_sequence(name("skip_countdowns"), values["skip_countdowns"])
    if len(thresholds) != len(countdowns):
        raise ValueError(
            f"{name('sim_thresholds')} and {name('skip_countdowns')} must have the same length; "
            f"got {len(thresholds)} and {len(countdowns)}. One countdown per threshold: thresholds "
            f"{shown(list(thresholds))}, countdowns {shown(list(countdowns))}"
        )
    if not isinstance(values["enabled"], bool):
        raise ValueError(f"{name('enabled')} must be True or False, got {shown(values['enabled'])}")
    out["enabled"] = values["enabled"]
    min_history = values["min_history_steps"]
    if not _is_int(min_history) or min_history < 2:
        raise ValueError(
            f"{name('min_history_steps')} must be an integer >= 2 (the similarity compares the last two "
            f"computed velocities), got {shown(min_history)}"
        )
    out["min_history_steps"] = int(min_history)
    max_history = values["max_history"]
    if not _is_int(max_history) or max_history < min_history:
        raise ValueError(
            f"{name('max_history')} must be an integer >= {name('min_history_steps')} ({min_history}), "
            f"got {shown(max_history)}; a shorter history could never reach the minimum and would never skip"
        )
    out["max_history"] = int(max_history)

    for i, threshold in enumerate(thresholds):
        if not _is_real(threshold):
            raise ValueError(f"{name('sim_thresholds')}[{i}] must be a number in (-1, 1], got {shown(threshold)}")
        if math.isnan(threshold) or not -1.0 < threshold <= 1.0:
            raise ValueError(
                f"{name('sim_thresholds')}[{i}] must be a cosine similarity in (-1, 1], got {shown(threshold)}"
            )
    for i in range(1, len(thresholds)):
        if not thresholds[i] < thresholds[i - 1]:
            raise ValueError(
                f"{name('sim_thresholds')} must be strictly descending (the first threshold the similarity "
                f"exceeds picks the countdown, so a later, higher one could never fire), got {shown(list(thresholds))}"
            )
    for i, countdown in enumerate(countdowns):
        if not _is_int(countdown) or countdown < 1:
            raise ValueError(
                f"{name('skip_countdowns')}[{i}] must be an integer >= 1 (the number of steps to skip), "
                f"got {shown(countdown)}"
            )
    out["sim_thresholds"] = tuple(float(t) for t in thresholds)
    out["skip_countdowns"] = tuple(int(c) for c in countdowns)

    static_steps = values["static_run_steps"]
    if static_steps is not None:
        static_steps = _as_sequence(name("static_run_steps"), static_steps)
        if not all(_is_int(step) and step >= 0 for step in static_steps):
            raise ValueError(f"{name('static_run_steps')} must hold step indices >= 0, got {shown(list(static_steps))}")
        if 0 not in static_steps:
            raise ValueError(
                f"{name('static_run_steps')} must include step 0 (there is nothing to reuse before the first "
                f"computed step), got {shown(list(static_steps))}"
            )
        static_steps = tuple(sorted({int(step) for step in static_steps}))
    out["static_run_steps"] = static_steps

    out["policy"] = _choice(name("policy"), values["policy"], POLICIES)
    budget = values["error_budget"]
    if not _is_real(budget) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(
            f"{name('error_budget')} must be a finite number > 0 (the accumulated estimated relative error "
            f"at which a skip window ends), got {shown(budget)}"
        )
    out["error_budget"] = float(budget)
    forwards, fraction = values["forward_budget"], values["forward_fraction"]
    if forwards is not None:
        forwards = _count(name("forward_budget"), forwards, 1, "computed steps per generation")
    if fraction is not None and (not _is_real(fraction) or math.isnan(fraction) or not 0.0 < fraction <= 1.0):
        raise ValueError(
            f"{name('forward_fraction')} must be a number in (0, 1] (the share of the steps computed), "
            f"got {shown(fraction)}"
        )
    if out["policy"] == PLANNED_POLICY and (forwards is None) == (fraction is None):
        raise ValueError(
            f"{name('policy')} {shown(PLANNED_POLICY)} needs exactly one of {name('forward_budget')} (forwards per "
            f"generation) and {name('forward_fraction')} (their share of the steps), got {shown(forwards)} and "
            f"{shown(fraction)}"
        )
    if out["policy"] != PLANNED_POLICY and (forwards is not None or fraction is not None):
        raise ValueError(
            f"{name('forward_budget')} and {name('forward_fraction')} belong to {name('policy')} "
            f"{shown(PLANNED_POLICY)}; with {shown(out['policy'])} they would be ignored: drop them or set the policy"
        )
    out["forward_budget"] = forwards
    out["forward_fraction"] = None if fraction is None else float(fraction)
    out["warmup_steps"] = _count(name("warmup_steps"), values["warmup_steps"], 0, "leading steps that always run")
    out["final_steps"] = _count(name("final_steps"), values["final_steps"], 0, "trailing steps that always run")
    max_skips = values["max_skip_steps"]
    out["max_skip_steps"] = (
        None if max_skips is None
        else _count(name("max_skip_steps"), max_skips, 1, "the longest run of skipped steps; None for no cap")
    )
    out["reuse"] = _choice(name("reuse"), values["reuse"], REUSE_MODES)
    damping = values["extrapolation_damping"]
    if not _is_real(damping) or math.isnan(damping) or not 0.0 <= damping <= 1.0:
        raise ValueError(
            f"{name('extrapolation_damping')} must be a number in [0, 1] (the fraction of the linear "
            f"extrapolation applied; 0 reuses the cached velocity), got {shown(damping)}"
        )
    out["extrapolation_damping"] = float(damping)
    if not isinstance(values["solver_aware"], bool):
        raise ValueError(f"{name('solver_aware')} must be True or False, got {shown(values['solver_aware'])}")
    out["solver_aware"] = values["solver_aware"]

    if static_steps is not None:
        # A fixed schedule is complete: options that shape an adaptive schedule would be silently ignored.
        shaping = [
            runtime for runtime, default in (("warmup_steps", 0), ("final_steps", 0), ("max_skip_steps", None))
            if out[runtime] != default
        ]
        if out["policy"] != SIMILARITY_POLICY:
            shaping.insert(0, "policy")
        if shaping:
            raise ValueError(
                f"{name('static_run_steps')} is a complete fixed schedule; {[name(s) for s in shaping]} "
                f"shape the adaptive rule and do not apply to it: drop them, or drop {name('static_run_steps')}"
            )
    return out


@dataclass(frozen=True)
class StepCacheConfig:
    """Runtime config for velocity-based step skipping (DreamZero's ``should_run_model`` rule and opt-in
    policies around it). The defaults are the seed's, and so is the behaviour they give.

    The seed's rule (``policy="similarity"``): at a step with at least ``min_history_steps`` computed
    velocities and no countdown running, the cosine similarity ``s`` of the last two is compared with
    ``sim_thresholds`` in order; at the first ``s > sim_thresholds[i]`` the current step and the next
    ``skip_countdowns[i] - 1`` are skipped, then one step is forced to run.

    Args:
        enabled: False makes every step run (bit-identical to no cache).
        min_history_steps: computed velocities needed before any skip (>= 2).
        max_history: computed velocities kept in the history (>= ``min_history_steps``).
        sim_thresholds: strictly descending cosine thresholds in (-1, 1]. The similarity is clamped
            to [-1, 1], so a threshold of 1.0 can never fire.
        skip_countdowns: steps skipped when the matching threshold fires (>= 1 each).
        static_run_steps: not in the seed; None (the default) uses the adaptive rule. A set of step
            indices (including 0) replaces it with a fixed schedule: exactly those steps run, every
            other step reuses (DreamZero's released code ships ``DREAMZERO_STATIC_RUN_STEPS`` for 16
            steps; ``stepcache.calibrate`` learns one for a pipeline).
        policy: not in the seed. ``"similarity"`` (default): the seed's thresholds and countdowns.
            ``"error_budget"``: skip while the accumulated estimate of the relative error of reusing
            the last velocity stays within ``error_budget``. At step ``i`` the estimate is
            ``||v1 - v2|| / ||v1|| * |t_i - t1| / |t1 - t2| * |t_i - t_{i+1}| / |t_0|``: the velocity's
            relative change between the last two computed steps (worst sample of the batch; magnitude
            and direction both count), scaled linearly to step ``i``'s distance from the last computed
            step, times the share of the path the step integrates. A computed step starts a new sum.
            ``"planned"``: a fixed number of forwards per generation (``forward_budget``, or
            ``forward_fraction`` of the steps), placed at generation start where the sampler's own
            sigma schedule says reuse costs least (:func:`stepcache.policies.plan_schedule`): no
            signal is read, nothing is calibrated; needs the generation's timesteps (every entry point
            passes them).
        error_budget: the budget of ``"error_budget"`` (> 0); smaller runs more steps.
        forward_budget: ``"planned"``: computed steps per generation (>= 1; capped at the step count).
        forward_fraction: ``"planned"``: computed steps as a share of the step count, in (0, 1].
        warmup_steps: the first ``warmup_steps`` steps always run (on top of ``min_history_steps``).
        final_steps: the last ``final_steps`` steps always run (the velocity turns most at the end);
            needs the generation's step count (every entry point passes it).
        max_skip_steps: at most this many consecutive skipped steps (None: no cap).
        reuse: what a skipped step answers with: ``"cache"`` (the seed: the last computed prediction)
            or ``"extrapolate"``: ``v1 + damping * (v1 - v2) * (t - t1) / (t1 - t2)`` from the last
            two computed predictions (every tensor of the tuple), exact for a velocity linear in time
            up to one measured gap ahead, held at that distance beyond.
        extrapolation_damping: ``damping`` above, in [0, 1] (DreamZero's unused helper used 0.25).
        solver_aware: for multistep solvers (UniPC, DPM-Solver++): a skipped step takes a first-order
            step with the reused velocity and never enters the solver's memory; the next computed step
            redoes the window from the last computed sample with the solver's own corrector. Applied by
            the integrations that own a scheduler (the diffusers hook, ``DreamZeroPipeline``).

    Example:
        >>> StepCacheConfig(sim_thresholds=(0.97,), skip_countdowns=(2,)).skip_countdowns
        (2,)
    """

    enabled: bool = True
    min_history_steps: int = 2
    max_history: int = 2
    sim_thresholds: tuple[float, ...] = (0.95, 0.93)
    skip_countdowns: tuple[int, ...] = (4, 2)
    static_run_steps: tuple[int, ...] | None = None
    policy: str = SIMILARITY_POLICY
    error_budget: float = 0.05
    forward_budget: int | None = None
    forward_fraction: float | None = None
    warmup_steps: int = 0
    final_steps: int = 0
    max_skip_steps: int | None = None
    reuse: str = REUSE_CACHED
    extrapolation_damping: float = 1.0
    solver_aware: bool = False

    def __post_init__(self) -> None:
        values = _validated({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, user_names=False)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def max_consecutive_skips(self) -> int | None:
        """The longest run of skipped steps this config can produce: 0 when it cannot skip, None when
        only the step count bounds it."""
        if not self.enabled:
            return 0
        if self.static_run_steps is not None:
            return None
        if self.policy == SIMILARITY_POLICY:
            longest = max(self.skip_countdowns, default=0)
            return longest if self.max_skip_steps is None else min(longest, self.max_skip_steps)
        if self.policy == PLANNED_POLICY:
            return None  # the plan's own windows; warm-up, final steps and the cap still apply
        return self.max_skip_steps

    @property
    def never_skips(self) -> bool:
        """True when no step can ever be skipped (the run is bit-identical to no cache)."""
        if not self.enabled:
            return True
        if self.static_run_steps is not None:
            return False
        return self.policy == SIMILARITY_POLICY and all(t >= 1.0 for t in self.sim_thresholds)

    def check_num_steps(self, num_steps: int) -> None:
        """Fail when this config cannot apply to a generation of ``num_steps`` steps (a fixed
        schedule that names steps past the end would silently reuse its last computed step)."""
        if not _is_int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {shown(num_steps)}")
        if self.enabled and self.static_run_steps is not None and self.static_run_steps[-1] >= num_steps:
            beyond = [s for s in self.static_run_steps if s >= num_steps]
            raise ValueError(
                f"static_run_steps {shown(list(self.static_run_steps))} (user field step_cache_dit_static_steps) names "
                f"steps {shown(beyond)} past the end of a {num_steps}-step generation (steps 0..{num_steps - 1}); "
                f"give a schedule for {num_steps} steps"
            )

    @classmethod
    def from_diffusion_cache_config(cls, config: DiffusionCacheConfig) -> StepCacheConfig:
        """Translate the user-facing config (vLLM-Omni field names) into the runtime config."""
        if not isinstance(config, DiffusionCacheConfig):
            raise TypeError(f"expected a DiffusionCacheConfig, got {type(config).__name__}")
        values = {RUNTIME_FIELD_NAMES[name]: value for name, value in dataclasses.asdict(config).items()}
        return cls(**_validated(values, user_names=True))

    def to_diffusion_cache_config(self) -> DiffusionCacheConfig:
        """The same choice in the user-facing field names (e.g. to write it as JSON)."""
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values[USER_FIELD_NAMES[f.name]] = list(value) if isinstance(value, tuple) else value
        return DiffusionCacheConfig(**values)


@dataclass
class DiffusionCacheConfig:
    """User-facing cache config, with the field names vLLM-Omni uses (and ours in the same style for
    the options the seed does not have; see :class:`StepCacheConfig` for what each one does).

    Like vLLM-Omni's, it holds values without checking them: they are checked (errors name these
    fields) when it is translated to a :class:`StepCacheConfig`, at ``enable`` and at every entry
    point, so ``get_cache_backend("step_cache", {...})`` accepts what vLLM-Omni's accepts. Build it
    from a dict, a JSON string, a JSON file or a preset name with :func:`as_diffusion_cache_config`;
    an unknown key is an error, so a typo is never silently ignored.

    Example:
        >>> DiffusionCacheConfig.from_dict('{"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [2]}')
        ... # doctest: +ELLIPSIS
        DiffusionCacheConfig(step_cache_dit_enabled=True, velocity_sim_thresholds=[0.97], ...)
    """

    step_cache_dit_enabled: bool = True
    velocity_sim_thresholds: list[float] = field(default_factory=lambda: [0.95, 0.93])
    velocity_skip_countdowns: list[int] = field(default_factory=lambda: [4, 2])
    step_cache_dit_min_history: int = 2
    step_cache_dit_max_history: int = 2
    # Not vLLM-Omni fields: opt-in options (StepCacheConfig documents each one).
    step_cache_dit_static_steps: list[int] | None = None
    step_cache_dit_policy: str = SIMILARITY_POLICY
    velocity_error_budget: float = StepCacheConfig.error_budget
    step_cache_dit_forward_budget: int | None = None
    step_cache_dit_forward_fraction: float | None = None
    step_cache_dit_warmup_steps: int = 0
    step_cache_dit_final_steps: int = 0
    step_cache_dit_max_skip_steps: int | None = None
    velocity_reuse: str = REUSE_CACHED
    velocity_extrapolation_damping: float = 1.0
    step_cache_dit_solver_aware: bool = False

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str | None) -> DiffusionCacheConfig:
        """Build from a mapping, a JSON object string, or ``None`` (the defaults). An empty string is
        an error: it is what ``"$(cat missing.json)"`` gives, never a deliberate choice."""
        if data is None:
            return cls()
        if isinstance(data, str):
            if not data.strip():
                raise ValueError(
                    "cache config is an empty string; give a JSON object (\"{}\" for the defaults), a path to "
                    "a JSON file, a preset name, or None"
                )
            try:
                data = json.loads(data)
            except json.JSONDecodeError as err:
                raise ValueError(f"cache config is not valid JSON ({err}): {shown(data)}") from None
        if not isinstance(data, Mapping):
            raise ValueError(
                f"cache config must be a JSON object / dict of fields, got {type(data).__name__}: {shown(data)}"
            )
        valid = cls.field_names()
        unknown = sorted(str(key) for key in data if key not in valid)
        if unknown:
            raise ValueError(f"unknown cache config key(s) {shown(unknown)}; valid keys are {valid}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DiffusionCacheConfig:
        """Read a config saved as JSON (``save``, ``stepcache calibrate``). A missing, empty or malformed
        file, or one with a bad value, is an error that names the path."""
        path = Path(path)
        data = read_json_file(path, "cache config file")
        if isinstance(data, Mapping) and data.get("format") == CALIBRATION_FORMAT_NAME:
            if not isinstance(data.get("config"), Mapping):
                raise ValueError(
                    f"cache config file {str(path)!r} is a calibration file without its chosen config "
                    f"(its \"config\" is {shown(data.get('config'))}, not an object); no goal was met or the "
                    "file was cut: rerun `stepcache calibrate`, or pick a candidate's config from the file"
                )
            data = data["config"]  # a calibration report: the config it chose
        elif isinstance(data, Mapping) and isinstance(data.get("config"), Mapping):
            data = data["config"]  # a calibration report: the config it chose
        try:
            config = cls.from_dict(data)
            StepCacheConfig.from_diffusion_cache_config(config)  # a file is checked as it is read
            return config
        except (ValueError, TypeError) as err:
            raise ValueError(f"cache config file {str(path)!r}: {err}") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DiffusionCacheConfig:
        """A named preset (see :data:`PRESETS`), optionally with some fields overridden."""
        if name not in PRESETS:
            close = difflib.get_close_matches(str(name).strip().lower(), sorted(PRESETS), n=1, cutoff=0.6)
            hint = f"; did you mean {shown(close[0])}?" if close else ""
            raise ValueError(f"unknown cache config preset {shown(name)}; presets: {sorted(PRESETS)}{hint}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this config as JSON (what :meth:`from_file` and every entry point read back)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named configs for users who do not calibrate. "seed" is vLLM-Omni's defaults; "fast", "balanced" and
# "quality" compute 1/4, 3/8 and 1/2 of the steps (4, 6 and 8 of 16). docs/benchmarks.md ("choosing a
# policy") says how they were chosen (calibration inputs) and how they score (held-out inputs).
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    # A share of the steps computed where the sampler's sigma schedule says reuse costs least; skipped
    # steps extrapolate and bypass the multistep solver's memory. No signal, nothing to calibrate.
    "fast": {"step_cache_dit_policy": "planned", "step_cache_dit_forward_fraction": 0.25,
             "step_cache_dit_solver_aware": True, "velocity_reuse": "extrapolate"},
    "balanced": {"step_cache_dit_policy": "planned", "step_cache_dit_forward_fraction": 0.375,
                 "step_cache_dit_solver_aware": True, "velocity_reuse": "extrapolate"},
    "quality": {"step_cache_dit_policy": "planned", "step_cache_dit_forward_fraction": 0.5,
                "step_cache_dit_solver_aware": True, "velocity_reuse": "extrapolate"},
}
# The preset the docs recommend to users who do not calibrate.
RECOMMENDED_PRESET = "balanced"


def _looks_like_preset(value: str) -> bool:
    """A bare word (no path separator, no ``.json``): what a preset name or a typo of one looks like."""
    return os.sep not in value and "/" not in value and not value.strip().lower().endswith(".json")


def _not_a_preset_message(value: str) -> str:
    names = sorted(PRESETS)
    close = difflib.get_close_matches(value.strip().lower(), names, n=1, cutoff=0.6)
    hint = f"; did you mean {shown(close[0])}?" if close else ""
    return (
        f"cache config {shown(value)} is neither a preset (presets: {names}) nor an existing file{hint}"
    )


def as_diffusion_cache_config(
    value: DiffusionCacheConfig | StepCacheConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> DiffusionCacheConfig:
    """Accept every form a cache config may arrive in and return a :class:`DiffusionCacheConfig`.

    ``None`` (the defaults), a config object, a dict of fields, a JSON string (starts with ``{``; one
    that starts with ``[`` is rejected as not an object), a preset name (:data:`PRESETS`), or a path
    (``str`` or ``os.PathLike``) to a JSON file.
    """
    if isinstance(value, DiffusionCacheConfig):
        return value
    if isinstance(value, StepCacheConfig):
        return value.to_diffusion_cache_config()
    if isinstance(value, os.PathLike):
        return DiffusionCacheConfig.from_file(value)
    if isinstance(value, str) and value.strip() and value.lstrip()[0] not in "{[":
        if value in PRESETS:
            return DiffusionCacheConfig.preset(value)
        if not Path(value).exists() and _looks_like_preset(value):
            raise ValueError(_not_a_preset_message(value))
        return DiffusionCacheConfig.from_file(value)
    return DiffusionCacheConfig.from_dict(value)


def as_step_cache_config(
    value: StepCacheConfig | DiffusionCacheConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> StepCacheConfig:
    """The runtime config for any form :func:`as_diffusion_cache_config` accepts (or a StepCacheConfig)."""
    if isinstance(value, StepCacheConfig):
        return value
    return StepCacheConfig.from_diffusion_cache_config(as_diffusion_cache_config(value))


def describe_config(
    value: DiffusionCacheConfig | StepCacheConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> str:
    """The fields that act, in the user-facing names: one short line whose JSON is itself a valid config.

    A preset is named (``preset balanced: {...}``). Fields the chosen rule ignores (a planned config's
    thresholds, say) are left out, and so are acting fields at their defaults except the ones that say
    what the rule is (policy, its budget or thresholds, solver-aware, reuse). Full configs belong in
    JSON outputs (``to_dict()``).
    """
    config = as_step_cache_config(value)
    user = config.to_diffusion_cache_config().to_dict()
    defaults = DiffusionCacheConfig().to_dict()
    if not config.enabled:
        return json.dumps({"step_cache_dit_enabled": False}) + " (off: every step computed)"
    if config.static_run_steps is not None:
        acting = ["static_run_steps"]
    elif config.policy == SIMILARITY_POLICY:
        acting = ["policy", "sim_thresholds", "skip_countdowns", "min_history_steps", "max_history"]
    elif config.policy == ERROR_BUDGET_POLICY:
        acting = ["policy", "error_budget", "min_history_steps", "max_history"]
    else:
        acting = ["policy", "forward_budget" if config.forward_budget is not None else "forward_fraction"]
    always = {"policy", "sim_thresholds", "skip_countdowns", "error_budget", "forward_budget", "forward_fraction",
              "static_run_steps", "solver_aware", "reuse"}
    if config.static_run_steps is None:
        acting += ["warmup_steps", "final_steps", "max_skip_steps"]
    acting += ["solver_aware", "reuse"]
    if config.reuse == REUSE_EXTRAPOLATE:
        acting.append("extrapolation_damping")
    shown = {
        USER_FIELD_NAMES[name]: user[USER_FIELD_NAMES[name]]
        for name in acting
        if name in always or user[USER_FIELD_NAMES[name]] != defaults[USER_FIELD_NAMES[name]]
    }
    text = json.dumps(shown)
    preset = next((name for name, fields in PRESETS.items()
                   if StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig.preset(name)) == config), None)
    return f"preset {preset}: {text}" if preset else text
