"""stepcache: skip whole DiT forwards while successive flow-matching velocities stay aligned.

The core (this package's top level) knows tensors and numbers only:

- :mod:`stepcache.config`: :class:`StepCacheConfig` (runtime) and :class:`DiffusionCacheConfig` (user-facing);
- :mod:`stepcache.state`: :class:`StepCacheState`, the decision rule and its per-step trace;
- :mod:`stepcache.backend`: :class:`StepCacheBackend`, which attaches both to a supported pipeline;
- :mod:`stepcache.loop`: :class:`VelocityCache`, StepCache for hand-written denoise loops;
- :mod:`stepcache.selector`: :func:`get_cache_backend`.

Integrations (``stepcache.integrations``), bundled models (``stepcache.models``), :class:`Omni` and
the command-line tools (``stepcache.tools``) build on it.
"""

from __future__ import annotations

from typing import Any

from stepcache.backend import (
    CUSTOM_STEPCACHE_ENABLERS,
    STEP_CACHE_CONFIG_ATTR,
    STEP_CACHE_STATE_ATTR,
    CacheBackend,
    StepCacheBackend,
    disable_stepcache,
    enable_dreamzero_stepcache,
    get_stepcache_config,
    get_stepcache_state,
    is_stepcache_active,
)
from stepcache.config import (
    DREAMZERO_STATIC_RUN_STEPS,
    DiffusionCacheConfig,
    StepCacheConfig,
    as_diffusion_cache_config,
)
from stepcache.loop import VelocityCache
from stepcache.selector import CACHE_BACKEND_ENV, STEP_CACHE_BACKEND_NAMES, get_cache_backend
from stepcache.state import (
    StepCacheState,
    StepDecision,
    StepRecord,
    TraceSummary,
    decide,
    schedule_string,
    simulate_schedule,
    velocity_similarity,
)

__version__ = "0.1.0"

# The names vLLM-Omni also exports (its backend was first called "step_cache_dit"): the same objects.
StepCacheDiTBackend = StepCacheBackend
StepCacheDiTConfig = StepCacheConfig
StepCacheDiTState = StepCacheState
CUSTOM_STEP_CACHE_DIT_ENABLERS = CUSTOM_STEPCACHE_ENABLERS
enable_dreamzero_step_cache_dit = enable_dreamzero_stepcache
STEP_CACHE_DIT_CONFIG_ATTR = STEP_CACHE_CONFIG_ATTR
STEP_CACHE_DIT_STATE_ATTR = STEP_CACHE_STATE_ATTR
is_step_cache_dit_active = is_stepcache_active
get_step_cache_dit_config = get_stepcache_config
get_step_cache_dit_state = get_stepcache_state


def __getattr__(name: str) -> Any:
    # Omni pulls in the bundled model and diffusers' schedulers: import it only when asked for.
    if name == "Omni":
        from stepcache.omni import Omni

        return Omni
    # calibrate is not needed to run StepCache: import the calibration package only when asked for.
    if name == "calibrate":
        from stepcache.calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'stepcache' has no attribute {name!r}")


__all__ = [
    "CACHE_BACKEND_ENV",
    "CUSTOM_STEPCACHE_ENABLERS",
    "CUSTOM_STEP_CACHE_DIT_ENABLERS",
    "DREAMZERO_STATIC_RUN_STEPS",
    "STEP_CACHE_BACKEND_NAMES",
    "STEP_CACHE_CONFIG_ATTR",
    "STEP_CACHE_DIT_CONFIG_ATTR",
    "STEP_CACHE_DIT_STATE_ATTR",
    "STEP_CACHE_STATE_ATTR",
    "CacheBackend",
    "DiffusionCacheConfig",
    "StepCacheBackend",
    "StepCacheConfig",
    "StepCacheDiTBackend",
    "StepCacheDiTConfig",
    "StepCacheDiTState",
    "StepCacheState",
    "StepDecision",
    "StepRecord",
    "TraceSummary",
    "VelocityCache",
    "as_diffusion_cache_config",
    "decide",
    "disable_stepcache",
    "enable_dreamzero_step_cache_dit",
    "enable_dreamzero_stepcache",
    "get_cache_backend",
    "get_step_cache_dit_config",
    "get_step_cache_dit_state",
    "get_stepcache_config",
    "get_stepcache_state",
    "is_step_cache_dit_active",
    "is_stepcache_active",
    "schedule_string",
    "simulate_schedule",
    "velocity_similarity",
]
