"""What a calibration produced: the chosen config per goal, every candidate and its measurements, the
generations spent, the inputs used; saved as one JSON file that every entry point accepts as a config.

The file layout (``format: "stepcache-calibration"``)::

    {"format": "stepcache-calibration", "version": 1,
     "config": {...},                  # the chosen config (the first goal's): what entry points read
     "choices": [{"goal": {...}, "met": true, "candidate": 0}, ...],
     "candidates": [{"label", "target_forwards", "config", "predicted_error", "verified",
                     "forwards", "fidelity_db", "input_fidelity_db"}, ...],
     "generations": {"recorded": 1, "verification": 2, "held_out": 0, "limit": 3},
     "inputs": {"calibration": [...], "held_out": [...]},
     "held_out": [{"candidate": 0, "forwards", "fidelity_db", "input_fidelity_db"}, ...],
     "num_steps": 16, "timesteps": [...], "fidelity": "...", "fits": [...], "timings_s": {...},
     "metadata": {...}}

``DiffusionCacheConfig.from_file`` reads the ``"config"`` key, so ``enable_step_cache(pipe, "cal.json")``,
``Omni(cache_config="cal.json")``, ``get_cache_backend("step_cache", "cal.json")`` and
``stepcache demo --cache-config cal.json`` all take the file as it is. Fidelities are in dB; an exact
output (infinite PSNR) is written as the string ``"inf"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepcache.config import DiffusionCacheConfig, StepCacheConfig, describe_config, read_json_file, shown

FORMAT_NAME = "stepcache-calibration"
FORMAT_VERSION = 1


@dataclass
class Candidate:
    """One config the calibration considered.

    Attributes:
        label: what it is, e.g. ``"static 0,9,12,13,14,15 solver-aware extrapolating"``.
        target_forwards: the forward budget it was built for.
        config: the config itself.
        predicted_error: the offline estimate (relative displacement of the final sample, see
            :mod:`stepcache.calibration.schedules`), before any real run.
        forwards: measured computed steps per generation, averaged (None: not verified).
        fidelity_db: measured PSNR (or the given fidelity) against the full-step output, averaged over
            the calibration inputs (None: not verified; ``inf``: exact).
        input_fidelity_db: the same, per calibration input.
    """

    label: str
    target_forwards: float
    config: DiffusionCacheConfig
    predicted_error: float
    forwards: float | None = None
    fidelity_db: float | None = None
    input_fidelity_db: list[float] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.fidelity_db is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "target_forwards": self.target_forwards,
            "config": self.config.to_dict(),
            "predicted_error": _number(self.predicted_error),
            "verified": self.verified,
            "forwards": self.forwards,
            "fidelity_db": _number(self.fidelity_db),
            "input_fidelity_db": [_number(v) for v in self.input_fidelity_db],
        }

    @classmethod
    def _read(cls, data: _Fields) -> Candidate:
        return cls(
            label=data.text("label"),
            target_forwards=data.number("target_forwards", minimum=1),
            config=data.config("config"),
            predicted_error=data.number("predicted_error", minimum=0, optional=True, infinite=True),
            forwards=data.number("forwards", minimum=0, optional=True),
            fidelity_db=data.number("fidelity_db", optional=True, infinite=True),
            input_fidelity_db=data.numbers("input_fidelity_db", infinite=True),
        )


@dataclass
class Choice:
    """The answer to one goal (``{"target_forwards": K}`` or ``{"min_psnr": X}``): the verified
    candidate picked by measurement, and whether it meets the goal (when none does, the closest one)."""

    goal: dict[str, float]
    candidate: Candidate | None
    met: bool


@dataclass
class HeldOutResult:
    """A chosen config measured on inputs the calibration never saw."""

    candidate: Candidate
    forwards: float
    fidelity_db: float
    input_fidelity_db: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the CLI's fewer-steps baseline


@dataclass
class CalibrationResult:
    """The outcome of :func:`stepcache.calibrate`. :attr:`config` is the chosen config (of the first
    goal); :meth:`save` writes a file that every entry point accepts as a config."""

    choices: list[Choice]
    candidates: list[Candidate]
    recorded_generations: int
    verification_generations: int
    generation_limit: int
    calibration_inputs: list[Any]
    num_steps: int
    timesteps: list[float]
    fidelity: str
    held_out_inputs: list[Any] = field(default_factory=list)
    held_out: list[HeldOutResult] = field(default_factory=list)
    held_out_generations: int = 0
    fits: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def generations(self) -> int:
        """Generations the calibration itself ran: recorded plus verification (held-out reporting is
        counted apart, in :attr:`held_out_generations`)."""
        return self.recorded_generations + self.verification_generations

    @property
    def chosen(self) -> Candidate:
        """The first goal's chosen candidate (raises when no verified candidate exists)."""
        choice = self.choices[0]
        if choice.candidate is None:
            raise ValueError(f"no config was verified for the goal {choice.goal}")
        return choice.candidate

    @property
    def config(self) -> DiffusionCacheConfig:
        """The chosen config of the first goal (see :meth:`config_for` for a list of budgets)."""
        return self.chosen.config

    @property
    def verified(self) -> list[Candidate]:
        return [c for c in self.candidates if c.verified]

    def config_for(self, target_forwards: float) -> DiffusionCacheConfig:
        """The config chosen for the budget ``target_forwards``."""
        for choice in self.choices:
            if choice.goal.get("target_forwards") == target_forwards and choice.candidate is not None:
                return choice.candidate.config
        budgets = [c.goal.get("target_forwards") for c in self.choices]
        raise KeyError(f"no config was chosen for target_forwards={target_forwards}; budgets: {budgets}")

    def summary(self) -> str:
        """A few lines for people: what was chosen, at what cost, measured how and on what."""
        lines = []
        for choice in self.choices:
            goal = ", ".join(f"{k}={v:g}" for k, v in choice.goal.items())
            candidate = choice.candidate
            if candidate is None:
                lines.append(f"{goal}: nothing verified")
                continue
            note = "" if choice.met else " (goal NOT met: the closest verified config)"
            lines.append(
                f"{goal}: {candidate.label}: {_format(candidate.forwards)} forwards of {self.num_steps}, "
                f"{format_db(candidate.fidelity_db)} on the calibration inputs{note}"
            )
            for held in self.held_out:
                if held.candidate is candidate:
                    lines.append(f"  held out: {_format(held.forwards)} forwards, {format_db(held.fidelity_db)}"
                                 + _baselines(held.extra))
            lines.append(f"  config: {describe_config(candidate.config)}")
        verified = ", ".join(
            f"{c.label} {format_db(c.fidelity_db)}" for c in self.candidates if c.verified
        )
        lines.append(f"verified: {verified}")
        lines.append(
            f"generations: {self.recorded_generations} recorded + {self.verification_generations} verification "
            f"= {self.generations} (limit {self.generation_limit})"
            + (f"; {self.held_out_generations} more for the held-out report" if self.held_out_generations else "")
        )
        lines.append(f"calibration inputs: {json.dumps(self.calibration_inputs)}")
        if self.held_out_inputs:
            lines.append(f"held-out inputs: {json.dumps(self.held_out_inputs)}")
        return "\n".join(lines)

    # -- files ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        index = {id(c): i for i, c in enumerate(self.candidates)}
        first = self.choices[0].candidate if self.choices else None
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": None if first is None else first.config.to_dict(),
            "choices": [
                {"goal": c.goal, "met": c.met, "candidate": None if c.candidate is None else index[id(c.candidate)]}
                for c in self.choices
            ],
            "candidates": [c.to_dict() for c in self.candidates],
            "generations": {
                "recorded": self.recorded_generations,
                "verification": self.verification_generations,
                "total": self.generations,
                "limit": self.generation_limit,
                "held_out": self.held_out_generations,
            },
            "inputs": {"calibration": self.calibration_inputs, "held_out": self.held_out_inputs},
            "held_out": [
                {
                    "candidate": index[id(h.candidate)],
                    "forwards": h.forwards,
                    "fidelity_db": _number(h.fidelity_db),
                    "input_fidelity_db": [_number(v) for v in h.input_fidelity_db],
                    "extra": _json_safe(h.extra),
                }
                for h in self.held_out
            ],
            "num_steps": self.num_steps,
            "timesteps": self.timesteps,
            "fidelity": self.fidelity,
            "fits": _json_safe(self.fits),
            "timings_s": self.timings_s,
            "metadata": _json_safe(self.metadata),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON (the chosen config under ``"config"``: every entry point reads it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationResult:
        """Read a file written by :meth:`save`. A missing, empty or malformed file is an error naming it."""
        path = Path(path)
        data = read_json_file(path, "calibration file")
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"calibration file {str(path)!r} has format {shown(found)}, expected {FORMAT_NAME!r} (a plain config "
                "file is read with DiffusionCacheConfig.from_file)"
            )
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"calibration file {str(path)!r}: version {shown(data.get('version'))} is not supported")
        return cls._read(_Fields(data, f"calibration file {str(path)!r}", ""))

    @classmethod
    def _read(cls, data: _Fields) -> CalibrationResult:
        """The whole file checked, field by field: a wrong type, range or index is an error naming the
        field, never a silently different result (a ``choice`` of -1 would be Python's last candidate)."""
        candidates = [Candidate._read(c) for c in data.items("candidates")]
        verified = {i for i, c in enumerate(candidates) if c.verified}
        choices = []
        for choice in data.items("choices"):
            index = choice.index("candidate", len(candidates), optional=True)
            met = choice.flag("met")
            if index is not None and index not in verified:
                choice.fail("candidate", f"is {index}, a candidate without a measured fidelity_db; a choice is "
                            "always a verified candidate")
            if met and index is None:
                choice.fail("met", "is true but no candidate was chosen")
            choices.append(Choice(choice.goal("goal"), None if index is None else candidates[index], met))
        held_out = [
            HeldOutResult(candidates[h.index("candidate", len(candidates))], h.number("forwards", minimum=0),
                          h.number("fidelity_db", infinite=True), h.numbers("input_fidelity_db", infinite=True),
                          h.mapping("extra", optional=True))
            for h in data.items("held_out", optional=True)
        ]
        generations = data.section("generations")
        inputs = data.section("inputs", optional=True)
        return cls(
            choices=choices,
            candidates=candidates,
            recorded_generations=generations.count("recorded"),
            verification_generations=generations.count("verification"),
            generation_limit=generations.count("limit"),
            calibration_inputs=inputs.sequence("calibration", optional=True),
            num_steps=data.count("num_steps", minimum=1),
            timesteps=data.numbers("timesteps", required=True),
            fidelity=data.text("fidelity"),
            held_out_inputs=inputs.sequence("held_out", optional=True),
            held_out=held_out,
            held_out_generations=generations.count("held_out", optional=True),
            fits=data.sequence("fits", optional=True),
            timings_s=data.mapping("timings_s", optional=True),
            metadata=data.mapping("metadata", optional=True),
        )


_MISSING = object()


class _Fields:
    """One JSON object of a calibration file, read with its types checked: JSON booleans and numbers
    only (``"false"`` is not a boolean), ``"inf"`` only where an exact output's fidelity may be."""

    def __init__(self, data: Any, file: str, where: str) -> None:
        self.file, self.where = file, where
        if not isinstance(data, Mapping):
            self._fail(f"{where or 'the file'} must be a JSON object, got {shown(data)}")
        self.data = data

    def _fail(self, message: str) -> None:
        raise ValueError(f"{self.file}: {message}")

    def fail(self, key: str, message: str) -> None:
        self._fail(f"{self._name(key)} {message}")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, optional: bool) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if not optional:
                self.fail(key, "is missing")
            return None
        return value

    def _number(self, key: str, value: Any, minimum: float | None, infinite: bool) -> float:
        if infinite and value in ("inf", "-inf"):
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            allowed = "a JSON number" + (' or "inf"' if infinite else "")
            self.fail(key, f"must be {allowed}, got {shown(value)}")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum}, got {shown(value)}")
        return float(value)

    def number(self, key: str, minimum: float | None = None, optional: bool = False, infinite: bool = False) -> Any:
        value = self._get(key, optional)
        return None if value is None and optional else self._number(key, value, minimum, infinite)

    def numbers(self, key: str, infinite: bool = False, required: bool = False) -> list[float]:
        values = self._get(key, optional=not required)
        if values is None:
            return []
        if not isinstance(values, list):
            self.fail(key, f"must be a list of numbers, got {shown(values)}")
        return [self._number(f"{key}[{i}]", v, None, infinite) for i, v in enumerate(values)]

    def count(self, key: str, minimum: int = 0, optional: bool = False) -> int:
        value = self._get(key, optional)
        if value is None and optional:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"must be an integer >= {minimum}, got {shown(value)}")
        return value

    def index(self, key: str, size: int, optional: bool = False) -> int | None:
        value = self._get(key, optional=False)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            allowed = f"0..{size - 1}" if size else "none (the file has no candidates)"
            allowed += ", or null" if optional else ""
            self.fail(key, f"must be a candidate index ({allowed}), got {shown(value)}")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key, optional=False)
        if not isinstance(value, bool):
            self.fail(key, f"must be a JSON boolean (true or false), got {shown(value)}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key, optional=False)
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {shown(value)}")
        return value

    def mapping(self, key: str, optional: bool = False) -> dict[str, Any]:
        value = self._get(key, optional)
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"must be a JSON object, got {shown(value)}")
        return dict(value)

    def sequence(self, key: str, optional: bool = False) -> list[Any]:
        value = self._get(key, optional)
        if value is None and optional:
            return []
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {shown(value)}")
        return list(value)

    def section(self, key: str, optional: bool = False) -> _Fields:
        value = self._get(key, optional)
        return _Fields({} if value is None and optional else value, self.file, self._name(key))

    def items(self, key: str, optional: bool = False) -> list[_Fields]:
        return [_Fields(v, self.file, f"{self._name(key)}[{i}]") for i, v in enumerate(self.sequence(key, optional))]

    def goal(self, key: str) -> dict[str, float]:
        goal = self.section(key)
        if set(goal.data) not in ({"target_forwards"}, {"min_psnr"}):
            self.fail(key, f'must be {{"target_forwards": K}} or {{"min_psnr": X}}, got {shown(goal.data)}')
        name = next(iter(goal.data))
        return {name: goal.number(name, minimum=1 if name == "target_forwards" else None)}

    def config(self, key: str) -> DiffusionCacheConfig:
        value = self._get(key, optional=False)
        try:
            config = DiffusionCacheConfig.from_dict(value)
            StepCacheConfig.from_diffusion_cache_config(config)  # a file's values are checked as it is read
            return config
        except (TypeError, ValueError) as err:
            self.fail(key, f"is not a valid cache config: {err}")
            raise  # unreachable: fail raises


def _number(value: float | None) -> float | str | None:
    """JSON has no infinity: an exact output's ``inf`` dB is written as the string ``"inf"``."""
    if value is None:
        return None
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None if math.isnan(value) else value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _baselines(extra: dict[str, Any]) -> str:
    """The held-out comparisons at the same forwards: fewer steps (and the planned policy where measured)."""
    if extra.get("fewer_steps_db") is None:
        return ""
    planned = "" if extra.get("planned_db") is None else f", planned policy {format_db(extra['planned_db'])}"
    return f"; at {extra['fewer_steps']} forwards: fewer steps {format_db(extra['fewer_steps_db'])}{planned}"


# Above this a PSNR only measures float rounding (float32 outputs that agree to the last bits land near
# 140-210 dB): the outputs are the same.
IDENTICAL_DB = 150.0


def format_db(value: float | None) -> str:
    """A fidelity for people: ``"identical"`` above :data:`IDENTICAL_DB` (or exact), else ``"31.2 dB"``."""
    if value is None:
        return "-"
    if value > IDENTICAL_DB:
        return "identical"
    return f"{_format(value)} dB"


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf (exact)"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
