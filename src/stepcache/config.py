"""Configuration for step-level DiT velocity caching.

Two configs describe the same choice:

- :class:`DiffusionCacheConfig` is what users write (vLLM-Omni's field names; a dict or a JSON string
  works too, via :meth:`DiffusionCacheConfig.from_dict`);
- :class:`StepCacheConfig` is the frozen runtime config the decision rule reads.

Both are validated when they are built, so a bad value fails where it was written, never deep inside
a denoise loop. Every error names the field, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The fixed 8-of-16 schedule DreamZero's released inference code uses when its adaptive rule is off.
DREAMZERO_STATIC_RUN_STEPS = (0, 1, 2, 6, 10, 13, 14, 15)


@dataclass(frozen=True)
class _FieldNames:
    """What the fields are called in the config being validated, so errors use the user's words."""

    enabled: str
    min_history: str
    max_history: str
    thresholds: str
    countdowns: str
    static_steps: str


_RUNTIME_NAMES = _FieldNames(
    enabled="enabled",
    min_history="min_history_steps",
    max_history="max_history",
    thresholds="sim_thresholds",
    countdowns="skip_countdowns",
    static_steps="static_run_steps",
)
_USER_NAMES = _FieldNames(
    enabled="step_cache_dit_enabled",
    min_history="step_cache_dit_min_history",
    max_history="step_cache_dit_max_history",
    thresholds="velocity_sim_thresholds",
    countdowns="velocity_skip_countdowns",
    static_steps="step_cache_dit_static_steps",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_sequence(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list or tuple, got {value!r} ({type(value).__name__})")
    return tuple(value)


def _validated(
    names: _FieldNames,
    enabled: Any,
    min_history: Any,
    max_history: Any,
    thresholds: Any,
    countdowns: Any,
    static_steps: Any,
) -> tuple[bool, int, int, tuple[float, ...], tuple[int, ...], tuple[int, ...] | None]:
    """Check one config's values; return them normalised (tuples, floats, ints)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"{names.enabled} must be True or False, got {enabled!r}")
    if not _is_int(min_history) or min_history < 2:
        raise ValueError(
            f"{names.min_history} must be an integer >= 2 (the similarity compares the last two "
            f"computed velocities), got {min_history!r}"
        )
    if not _is_int(max_history) or max_history < min_history:
        raise ValueError(
            f"{names.max_history} must be an integer >= {names.min_history} ({min_history}), "
            f"got {max_history!r}; a shorter history could never reach the minimum and would never skip"
        )
    thresholds = _as_sequence(names.thresholds, thresholds)
    countdowns = _as_sequence(names.countdowns, countdowns)
    if len(thresholds) != len(countdowns):
        raise ValueError(
            f"{names.thresholds} and {names.countdowns} must have the same length (one countdown per "
            f"threshold), got {len(thresholds)} thresholds {list(thresholds)} and "
            f"{len(countdowns)} countdowns {list(countdowns)}"
        )
    for i, threshold in enumerate(thresholds):
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
            raise ValueError(f"{names.thresholds}[{i}] must be a number in (-1, 1], got {threshold!r}")
        if math.isnan(threshold) or not -1.0 < threshold <= 1.0:
            raise ValueError(
                f"{names.thresholds}[{i}] must be a cosine similarity in (-1, 1], got {threshold!r}"
            )
    for i in range(1, len(thresholds)):
        if not thresholds[i] < thresholds[i - 1]:
            raise ValueError(
                f"{names.thresholds} must be strictly descending (the first threshold the similarity "
                f"exceeds picks the countdown, so a later, higher one could never fire), got {list(thresholds)}"
            )
    for i, countdown in enumerate(countdowns):
        if not _is_int(countdown) or countdown < 1:
            raise ValueError(
                f"{names.countdowns}[{i}] must be an integer >= 1 (the number of steps to skip), "
                f"got {countdown!r}"
            )
    if static_steps is not None:
        static_steps = _as_sequence(names.static_steps, static_steps)
        if not all(_is_int(step) and step >= 0 for step in static_steps):
            raise ValueError(f"{names.static_steps} must hold step indices >= 0, got {list(static_steps)}")
        if 0 not in static_steps:
            raise ValueError(
                f"{names.static_steps} must include step 0 (there is nothing to reuse before the first "
                f"computed step), got {list(static_steps)}"
            )
        static_steps = tuple(sorted({int(step) for step in static_steps}))
    return (
        enabled,
        int(min_history),
        int(max_history),
        tuple(float(t) for t in thresholds),
        tuple(int(c) for c in countdowns),
        static_steps,
    )


@dataclass(frozen=True)
class StepCacheConfig:
    """Runtime config for velocity-based step skipping (DreamZero's ``should_run_model`` rule).

    At a step with at least ``min_history_steps`` computed velocities and no countdown running, the
    cosine similarity ``s`` of the last two is compared with ``sim_thresholds`` in order; at the
    first ``s > sim_thresholds[i]`` the current step and the next ``skip_countdowns[i] - 1`` are
    skipped, then one step is forced to run.

    Args:
        enabled: False makes every step run (bit-identical to no cache).
        min_history_steps: computed velocities needed before any skip (>= 2).
        max_history: computed velocities kept in the history (>= ``min_history_steps``).
        sim_thresholds: strictly descending cosine thresholds in (-1, 1]. The similarity is clamped
            to [-1, 1], so a threshold of 1.0 can never fire.
        skip_countdowns: steps skipped when the matching threshold fires (>= 1 each).
        static_run_steps: not in the seed; None (the default) uses the rule above. A set of step
            indices (including 0) replaces the rule with a fixed schedule: exactly those steps run,
            every other step reuses the last computed velocity (DreamZero's released code ships
            the mask (0, 1, 2, 6, 10, 13, 14, 15) for 16 steps).

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

    def __post_init__(self) -> None:
        values = _validated(
            _RUNTIME_NAMES,
            self.enabled,
            self.min_history_steps,
            self.max_history,
            self.sim_thresholds,
            self.skip_countdowns,
            self.static_run_steps,
        )
        for f, value in zip(dataclasses.fields(self), values, strict=True):
            object.__setattr__(self, f.name, value)

    @property
    def max_consecutive_skips(self) -> int:
        """The longest run of skipped steps the similarity rule can produce (0 when it cannot skip)."""
        return max(self.skip_countdowns, default=0) if self.enabled else 0

    @classmethod
    def from_diffusion_cache_config(cls, config: DiffusionCacheConfig) -> StepCacheConfig:
        """Translate the user-facing config (vLLM-Omni field names) into the runtime config."""
        if not isinstance(config, DiffusionCacheConfig):
            raise TypeError(f"expected a DiffusionCacheConfig, got {type(config).__name__}")
        values = _validated(
            _USER_NAMES,
            config.step_cache_dit_enabled,
            config.step_cache_dit_min_history,
            config.step_cache_dit_max_history,
            config.velocity_sim_thresholds,
            config.velocity_skip_countdowns,
            config.step_cache_dit_static_steps,
        )
        return cls(*values)

    def to_diffusion_cache_config(self) -> DiffusionCacheConfig:
        """The same choice in the user-facing field names (e.g. to write it as JSON)."""
        return DiffusionCacheConfig(
            step_cache_dit_enabled=self.enabled,
            velocity_sim_thresholds=list(self.sim_thresholds),
            velocity_skip_countdowns=list(self.skip_countdowns),
            step_cache_dit_min_history=self.min_history_steps,
            step_cache_dit_max_history=self.max_history,
            step_cache_dit_static_steps=None if self.static_run_steps is None else list(self.static_run_steps),
        )


@dataclass
class DiffusionCacheConfig:
    """User-facing cache config, with the field names vLLM-Omni uses.

    Validated at construction (errors name these fields). Build it from a dict or a JSON string
    with :meth:`from_dict`; an unknown key is an error, so a typo is never silently ignored.

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
    # Not a vLLM-Omni field: a fixed schedule instead of the rule (see StepCacheConfig.static_run_steps).
    step_cache_dit_static_steps: list[int] | None = None

    def __post_init__(self) -> None:
        _, _, _, thresholds, countdowns, static_steps = _validated(
            _USER_NAMES,
            self.step_cache_dit_enabled,
            self.step_cache_dit_min_history,
            self.step_cache_dit_max_history,
            self.velocity_sim_thresholds,
            self.velocity_skip_countdowns,
            self.step_cache_dit_static_steps,
        )
        self.velocity_sim_thresholds = list(thresholds)
        self.velocity_skip_countdowns = list(countdowns)
        self.step_cache_dit_static_steps = None if static_steps is None else list(static_steps)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str | None) -> DiffusionCacheConfig:
        """Build from a mapping, a JSON object string, or ``None`` (the defaults)."""
        if data is None:
            return cls()
        if isinstance(data, str):
            try:
                data = json.loads(data) if data.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"cache config is not valid JSON ({err}): {data!r}") from None
        if not isinstance(data, Mapping):
            raise ValueError(
                f"cache config must be a JSON object / dict of fields, got {type(data).__name__}: {data!r}"
            )
        valid = cls.field_names()
        unknown = sorted(str(key) for key in data if key not in valid)
        if unknown:
            raise ValueError(f"unknown cache config key(s) {unknown}; valid keys are {valid}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_diffusion_cache_config(
    value: DiffusionCacheConfig | StepCacheConfig | Mapping[str, Any] | str | None,
) -> DiffusionCacheConfig:
    """Accept every form a cache config may arrive in and return a :class:`DiffusionCacheConfig`."""
    if isinstance(value, DiffusionCacheConfig):
        return value
    if isinstance(value, StepCacheConfig):
        return value.to_diffusion_cache_config()
    return DiffusionCacheConfig.from_dict(value)
