"""Pick a cache backend by name, as vLLM-Omni's ``cache_backend=`` / ``DIFFUSION_CACHE_BACKEND`` do."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from stepcache.backend import StepCacheBackend
from stepcache.config import DiffusionCacheConfig, StepCacheConfig, as_diffusion_cache_config, shown

CACHE_BACKEND_ENV = "DIFFUSION_CACHE_BACKEND"
STEP_CACHE_BACKEND_NAMES = ("step_cache", "stepcache", "step_cache_dit")
NO_CACHE_NAMES = ("none", "")


def get_cache_backend(
    name: str | None = None,
    cache_config: DiffusionCacheConfig | StepCacheConfig | Mapping[str, Any] | str | None = None,
) -> StepCacheBackend | None:
    """Return the backend called ``name`` (case-insensitive), or None for no cache.

    ``name=None`` reads the ``DIFFUSION_CACHE_BACKEND`` environment variable; unset, empty or
    "none" means no cache. ``cache_config``'s form is checked here even when it is not used (a
    mapping, JSON, a file or a preset; known keys), so a misspelt key fails at once; its values are
    checked at ``enable``, where vLLM-Omni checks them (``StepCacheBackend.enable``).
    """
    config = as_diffusion_cache_config(cache_config)
    source = "cache_backend"
    if name is None:
        name, source = os.environ.get(CACHE_BACKEND_ENV, ""), CACHE_BACKEND_ENV
    if not isinstance(name, str):
        raise ValueError(f"{source} must be a string or None, got {shown(name)}")
    key = name.strip().lower()
    if key in NO_CACHE_NAMES:
        return None
    if key in STEP_CACHE_BACKEND_NAMES:
        return StepCacheBackend(config)
    raise ValueError(
        f"unknown {source} {shown(name)}; supported: {list(STEP_CACHE_BACKEND_NAMES)}, or 'none' / None for no cache"
    )
