"""Quality against compute, on one model, in one process: the benchmark's model-agnostic part.

A :class:`BenchTarget` knows one model: how to sample it under a :class:`Method` (a step count plus
an optional StepCache config or peer cache), how many transformer forwards that cost, and how to
score outputs. :func:`run_benchmark` runs every method on the same seeds and inputs, compares each
with the full-step reference, and times them with interleaved repeats (so slow drift of the machine
spreads over all methods instead of biasing the last ones).
"""

from __future__ import annotations

import abc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stepcache.config import StepCacheConfig

logger = logging.getLogger(__name__)

# Method families (the `method` field of a result row).
FULL = "full"
FEWER_STEPS = "fewer_steps"
STEP_CACHE = "step_cache"  # the seed's similarity rule, its defaults and a sweep
PLANNED = "planned"  # policy "planned": a forward budget placed on the sigma schedule (the presets)
ERROR_BUDGET = "error_budget"  # policy "error_budget": the adaptive accumulated-error rule
CALIBRATED = "calibrated"  # stepcache.calibrate on the calibration inputs, evaluated on the others
STATIC_MASK = "static_mask"
ORACLE = "oracle"
# A row's cost counted as on a 40-block DiT, for peers that compute some blocks of a cached step
# (cache-dit); reported beside ``nfe`` and as its own frontier column.
NFE_40_BLOCKS = "nfe_40_blocks"


@dataclass(frozen=True)
class PeerCache:
    """Another cache the target can enable (one of diffusers' hooks, or cache-dit).

    ``build()`` returns a fresh config object each time: several hold callbacks or state. ``library``
    says who applies it: ``"diffusers"`` (``transformer.enable_cache(build())``) or ``"cache_dit"``
    (``cache_dit.enable_cache(pipe, **build())``).
    """

    name: str
    settings: dict[str, Any]
    build: Callable[[], Any]
    library: str = "diffusers"


@dataclass(frozen=True)
class Method:
    """One benchmark row: how the sampler runs.

    Args:
        method: the family (``full``, ``fewer_steps``, ``step_cache``, ``static_mask``, ``oracle``, or a
            peer cache's name).
        config: JSON-able settings, as reported.
        num_steps: scheduler steps.
        step_cache: StepCache config to apply (a static schedule for ``static_mask`` and ``oracle``).
        peer: a peer cache to enable instead.
    """

    method: str
    config: dict[str, Any]
    num_steps: int
    step_cache: StepCacheConfig | None = None
    peer: PeerCache | None = None

    @property
    def label(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.method}({settings})" if settings else self.method


@dataclass
class Sample:
    """What one sampling run produced.

    Attributes:
        outputs: named output tensors, compared with the reference's of the same name.
        nfe: transformer forwards in units of one full-model step (fractional for partial caches).
        run_steps: the steps whose forward ran, for step-level methods (None otherwise).
        nfe_40_blocks: for a cache that computes some blocks of a cached step, ``nfe`` as it would be
            on a 40-block model (None otherwise).
    """

    outputs: dict[str, torch.Tensor]
    nfe: float
    run_steps: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    nfe_40_blocks: float | None = None


class BenchTarget(abc.ABC):
    """One model under test, with fixed seeds and inputs."""

    #: the bundled model's name, as in the report
    name: str
    #: the reference step count
    num_steps: int

    @abc.abstractmethod
    def sample(self, method: Method, *, measure: bool = True) -> Sample:
        """Run the sampler once under ``method``, on the target's fixed seeds and inputs.

        With ``measure=False`` (the timed repeats) only the sampling itself may run: no counting,
        no extra bookkeeping; the returned ``nfe`` may then be NaN.
        """

    @abc.abstractmethod
    def fidelity(self, sample: Sample, reference: Sample) -> dict[str, float | None]:
        """Full-reference scores against the full-step output: at least ``psnr_db`` and ``ssim``."""

    def quality(self, sample: Sample) -> dict[str, float | None]:
        """No-reference scores of the output (classifier accuracy, success rate...)."""
        return {}

    def oracle_objective(self, fidelity: dict[str, float | None]) -> float:
        """What the oracle maximises; by default PSNR against the full-step output."""
        psnr = fidelity.get("psnr_db")
        return float("inf") if psnr is None else float(psnr)

    def peer_caches(self) -> tuple[list[PeerCache], dict[str, str]]:
        """Peer caches that apply to this model, and for each that does not, why."""
        return [], {}


@dataclass
class Row:
    """One line of the report."""

    method: Method
    nfe: float
    wall_s: float
    speedup: float
    fidelity: dict[str, float | None]
    quality: dict[str, float | None]
    run_steps: list[int] | None
    wall_samples: list[float] = field(default_factory=list)
    nfe_40_blocks: float | None = None

    def as_json(self) -> dict[str, Any]:
        row = {
            "method": self.method.method,
            "config": self.method.config,
            "num_steps": self.method.num_steps,
            "nfe": round(self.nfe, 4),
            "wall_s": round(self.wall_s, 5),
            "speedup": round(self.speedup, 4),
        }
        row.update(self.fidelity)
        row.update(self.quality)
        if self.nfe_40_blocks is not None:
            row[NFE_40_BLOCKS] = round(self.nfe_40_blocks, 4)
        row["run_steps"] = self.run_steps
        return row


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def evaluate(
    target: BenchTarget,
    methods: Sequence[Method],
    *,
    repeats: int = 3,
    samples: Sequence[Sample] = (),
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Score and time ``methods`` (the first must be the full-step reference).

    Each method runs once for its outputs and forwards (``samples`` may hold those of the first
    methods already), then ``repeats`` more times for the clock, interleaved across methods;
    ``wall_s`` is the median.
    """
    if not methods or methods[0].method != FULL:
        raise ValueError("the first method must be the full-step reference")
    samples = list(samples)
    for method in methods[len(samples) :]:
        if progress:
            progress(f"sampling {method.label}")
        samples.append(target.sample(method))
    reference = samples[0]

    walls: list[list[float]] = [[] for _ in methods]
    for repeat in range(repeats):
        for i, method in enumerate(methods):
            if progress:
                progress(f"timing {repeat + 1}/{repeats} {method.label}")
            walls[i].append(time_call(lambda m=method: target.sample(m, measure=False)))

    full_wall = statistics.median(walls[0]) if repeats else float("nan")
    rows = []
    for method, sample, wall in zip(methods, samples, walls):
        median = statistics.median(wall) if wall else float("nan")
        fidelity = (
            {key: None for key in target.fidelity(reference, reference)}
            if method.method == FULL
            else target.fidelity(sample, reference)
        )
        rows.append(
            Row(
                method=method,
                nfe=sample.nfe,
                wall_s=median,
                speedup=full_wall / median if median > 0 else float("nan"),
                fidelity=fidelity,
                quality=target.quality(sample),
                run_steps=sample.run_steps,
                wall_samples=wall,
                nfe_40_blocks=sample.nfe_40_blocks,
            )
        )
    return rows
