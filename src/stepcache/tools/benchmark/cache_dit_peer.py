"""cache-dit (the ``cache-dit`` package, optional: the ``bench`` extra) as a peer family of the benchmark.

cache-dit's DBCache computes the first ``Fn`` and the last ``Bn`` transformer blocks at every step and
skips the middle ones while the residual of the front blocks changes less than a threshold; a
TaylorSeer calibrator extrapolates the skipped blocks' residual instead of reusing it; an SCM step mask
(``cache_dit.steps_mask``) fixes which steps compute in full. It is enabled on the whole pipeline
(``cache_dit.enable_cache(pipe, ...)``) and removed with ``cache_dit.disable_cache(pipe)``.

Cost, from cache-dit's own statistics (``cache_dit.summary``): a computed step costs the whole model,
a cached step ``Fn + Bn`` of its ``L`` blocks, per transformer call (each CFG branch counts apart).
So a cached step is cheap in proportion to the model's depth: with 4 blocks (wan-digits) one front
block is a quarter of a forward, with 40 (a production DiT) a fortieth. Rows carry both: ``nfe`` as
measured here, and ``nfe_40_blocks`` (:data:`~stepcache.tools.benchmark.harness.NFE_40_BLOCKS`), the
same schedule costed on a 40-block model (``(Fn + Bn) / 40`` per cached step: the best case for
cache-dit).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

from stepcache.tools.benchmark.harness import PeerCache

CACHE_DIT = "cache_dit"
# The depth a cached step's cost is also counted against (a Wan2.1-14B-class DiT has 40 blocks).
PRODUCTION_BLOCKS = 40
NOT_INSTALLED = "cache-dit is not installed: .venv/bin/pip install -e '.[bench]' adds it"
# cache-dit's default warm-up is 8 steps (it is tuned for 28-50 step runs): on 16 steps that would cap
# caching at half the run, so every row here warms up for 2 steps, as StepCache does.
WARMUP_STEPS = 2
# DBCache: (front, back) compute blocks and residual-difference thresholds.
DBCACHE_BLOCKS = ((1, 0), (2, 0), (1, 1))
DBCACHE_THRESHOLDS = (0.08, 0.16, 0.24, 0.4)
TAYLORSEER_THRESHOLDS = (0.16, 0.24, 0.4)
# cache-dit's predefined SCM step masks (its presets, truncated to the run's steps by steps_mask).
SCM_POLICIES = ("slow", "medium", "fast", "ultra")


def is_installed() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def _cache_dit() -> Any:
    """The module, imported quiet: cache-dit logs every enable and disable to stdout (at INFO, and routine
    warnings such as "Acceleration hooks is disabled"), which would bury the bench's tables. Its level
    is read at import; a CACHE_DIT_LOG_LEVEL the user set is kept."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


def peer_caches(num_steps: int) -> list[PeerCache]:
    """The cache-dit rows, cheapest first for ``--quick`` (which keeps the first): DBCache F1B0 at 0.24."""
    rows: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []

    def dbcache(front: int, back: int, threshold: float, **more: Any) -> dict[str, Any]:
        cache_dit = _cache_dit()
        return {"cache_config": cache_dit.DBCacheConfig(
            Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=threshold,
            max_warmup_steps=WARMUP_STEPS, num_inference_steps=num_steps, **more)}

    ordered = sorted(((f, b, t) for f, b in DBCACHE_BLOCKS for t in DBCACHE_THRESHOLDS),
                     key=lambda s: (s != (1, 0, 0.24), s))
    for front, back, threshold in ordered:
        rows.append(({"cache": "DBCache", "Fn": front, "Bn": back, "threshold": threshold},
                     lambda f=front, b=back, t=threshold: dbcache(f, b, t)))
    for threshold in TAYLORSEER_THRESHOLDS:

        def taylorseer(t: float = threshold) -> dict[str, Any]:
            calibrator = _cache_dit().TaylorSeerCalibratorConfig(taylorseer_order=1)
            return {**dbcache(1, 0, t), "calibrator_config": calibrator}

        rows.append(({"cache": "DBCache+TaylorSeer", "Fn": 1, "Bn": 0, "threshold": threshold, "order": 1},
                     taylorseer))
    for policy in SCM_POLICIES:

        def scm(p: str = policy) -> dict[str, Any]:
            mask = _cache_dit().steps_mask(mask_policy=p, total_steps=num_steps)
            return dbcache(1, 0, 0.24, steps_computation_mask=mask, steps_computation_policy="static")

        rows.append(({"cache": "DBCache+SCM", "Fn": 1, "Bn": 0, "mask": policy}, scm))
    return [PeerCache(CACHE_DIT, settings, build, library=CACHE_DIT) for settings, build in rows]


def enable(pipe: Any, options: dict[str, Any]) -> None:
    _cache_dit().enable_cache(pipe, **options)


def disable(pipe: Any) -> None:
    _cache_dit().disable_cache(pipe)


def block_forwards(pipe: Any, num_steps: int) -> tuple[float, float, list[list[int]]]:
    """The last generation's cost from cache-dit's statistics: forwards in full-step units as measured
    on this model, the same on a :data:`PRODUCTION_BLOCKS`-block model, and each CFG branch's cached steps."""
    stats = next((s for s in _cache_dit().summary(pipe, logging=False) if s.cache_options.get("cache_config")), None)
    if stats is None:
        raise RuntimeError("cache-dit reported no statistics for the pipeline: was it enabled?")
    config = stats.cache_options["cache_config"]
    computed_blocks = config.Fn_compute_blocks + config.Bn_compute_blocks
    total_blocks = len(pipe.transformer.blocks)
    branches = [list(stats.cached_steps)]
    if config.enable_separate_cfg and getattr(pipe, "do_classifier_free_guidance", True):
        branches.append(list(stats.cfg_cached_steps))

    def forwards(blocks: int) -> float:
        per_branch = [num_steps - len(cached) + len(cached) * computed_blocks / blocks for cached in branches]
        return sum(per_branch) / len(per_branch)

    return forwards(total_blocks), forwards(PRODUCTION_BLOCKS), branches

