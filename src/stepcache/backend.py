"""StepCache backend: attaches the config and state to a supported pipeline.

The pipeline's denoise loop reads them back (:func:`get_stepcache_state`) and calls
:meth:`StepCacheState.should_run_step` to decide whether to run its DiT. Pipelines are matched by
class name, so this module never imports a model.

Example:
    >>> backend = StepCacheBackend(DiffusionCacheConfig())   # doctest: +SKIP
    >>> backend.enable(pipeline)                             # once, at load
    >>> backend.refresh(pipeline, num_inference_steps=16)    # before every generation
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from typing import Any

from stepcache.config import DiffusionCacheConfig, StepCacheConfig, as_diffusion_cache_config, describe_config
from stepcache.state import StepCacheState

logger = logging.getLogger(__name__)

STEP_CACHE_CONFIG_ATTR = "_stepcache_config"
STEP_CACHE_STATE_ATTR = "_stepcache_state"


class CacheBackend(abc.ABC):
    """A cache that is enabled on a pipeline once and refreshed before every generation."""

    def __init__(self, config: DiffusionCacheConfig) -> None:
        self.config = config
        self.enabled = False

    @abc.abstractmethod
    def enable(self, pipeline: Any) -> None:
        """Attach the cache to ``pipeline`` (once, when the pipeline is loaded)."""

    @abc.abstractmethod
    def refresh(self, pipeline: Any, num_inference_steps: int, verbose: bool = True) -> None:
        """Prepare for a new generation of ``num_inference_steps`` steps."""

    def is_enabled(self) -> bool:
        return self.enabled


def enable_dreamzero_stepcache(
    pipeline: Any, config: DiffusionCacheConfig, *, process_group: Any = None, check_consistency: bool = False
) -> None:
    """Enable stepcache for DreamZeroPipeline: set its ``_stepcache_config`` and ``_stepcache_state``.

    ``process_group``: the ranks that hold the pipeline's guided video velocity or shards of it (for the
    bundled model, ``ParallelWorldActionDiT.decision_group``), see :class:`~stepcache.StepCacheState`;
    None: one process.
    """
    step_config = StepCacheConfig.from_diffusion_cache_config(config)
    state = StepCacheState(step_config, process_group=process_group, check_consistency=check_consistency)
    setattr(pipeline, STEP_CACHE_CONFIG_ATTR, step_config)
    setattr(pipeline, STEP_CACHE_STATE_ATTR, state)


# Pipeline class name -> function that attaches StepCache to it: ``enabler(pipeline, config)``, called
# with the keywords ``process_group`` and ``check_consistency`` too when a group is given.
CUSTOM_STEPCACHE_ENABLERS: dict[str, Callable[..., None]] = {
    "DreamZeroPipeline": enable_dreamzero_stepcache,
}


def _find_enabler(pipeline: Any) -> Callable[..., None] | None:
    # Walk the class hierarchy so a subclass of a supported pipeline is supported too.
    for cls in type(pipeline).__mro__:
        enabler = CUSTOM_STEPCACHE_ENABLERS.get(cls.__name__)
        if enabler is not None:
            return enabler
    return None


class StepCacheBackend(CacheBackend):
    """Velocity cosine step-skipping cache backend for DreamZero-style pipelines.

    Args:
        config: a :class:`DiffusionCacheConfig`, or anything
            :func:`~stepcache.config.as_diffusion_cache_config` accepts (dict, JSON string, None).
    """

    def __init__(self, config: DiffusionCacheConfig | Mapping[str, Any] | str | None = None) -> None:
        super().__init__(as_diffusion_cache_config(config))

    def enable(self, pipeline: Any, *, process_group: Any = None, check_consistency: bool = False) -> None:
        """Attach StepCache to ``pipeline`` (once, at load). The config's values are checked here, where
        vLLM-Omni checks them.

        Args:
            pipeline: a supported pipeline (see ``CUSTOM_STEPCACHE_ENABLERS``).
            process_group: a ``torch.distributed`` group across which the pipeline's velocity is sharded
                (every rank of it calls ``enable`` with the same config): the decision signals are
                reduced across it, so every rank decides alike (docs/distributed.md). None: one process;
                nothing distributed is used.
            check_consistency: with a group, check every decision across its ranks and raise on a
                mismatch (tests, debugging; two small all_gathers per step).
        """
        enabler = _find_enabler(pipeline)
        if enabler is None:
            # vLLM-Omni's own message comes first: code written against it matches on that text.
            raise ValueError(
                f"step_cache backend does not support {type(pipeline).__name__}. Supported: "
                f"{sorted(CUSTOM_STEPCACHE_ENABLERS)}. Register an enabler for it in CUSTOM_STEPCACHE_ENABLERS, "
                "or use stepcache.integrations.diffusers.enable_step_cache for a diffusers pipeline"
            )
        if check_consistency and process_group is None:
            raise ValueError("check_consistency needs a process_group")
        if process_group is None:
            enabler(pipeline, self.config)  # enablers registered for one process take (pipeline, config)
        else:
            enabler(pipeline, self.config, process_group=process_group, check_consistency=check_consistency)
        self.enabled = True
        logger.debug("stepcache enabled on %s: %s", type(pipeline).__name__, describe_config(self.config))

    def refresh(self, pipeline: Any, num_inference_steps: int, verbose: bool = True) -> None:
        state = get_stepcache_state(pipeline)
        if state is None:
            raise RuntimeError(
                f"{type(pipeline).__name__} has no StepCache state: call StepCacheBackend.enable(pipeline) first"
            )
        if state.trace and verbose:
            logger.info("%s (previous generation)", state.summary())
        state.reset(num_inference_steps)  # a fixed schedule past the end fails here, before any forward
        if verbose:
            logger.debug("stepcache refreshed for %d steps", num_inference_steps)


def get_stepcache_config(pipeline: Any) -> StepCacheConfig | None:
    """The pipeline's StepCache config, or None when absent or not a StepCacheConfig."""
    config = getattr(pipeline, STEP_CACHE_CONFIG_ATTR, None)
    return config if isinstance(config, StepCacheConfig) else None


def get_stepcache_state(pipeline: Any) -> StepCacheState | None:
    """The pipeline's StepCache state, or None when absent or not a StepCacheState."""
    state = getattr(pipeline, STEP_CACHE_STATE_ATTR, None)
    return state if isinstance(state, StepCacheState) else None


def disable_stepcache(pipeline: Any) -> None:
    """Take StepCache off ``pipeline`` (its next generation runs every step); a no-op where it is absent."""
    for attr in (STEP_CACHE_CONFIG_ATTR, STEP_CACHE_STATE_ATTR):
        if attr in vars(pipeline):
            delattr(pipeline, attr)


def is_stepcache_active(pipeline: Any) -> bool:
    """True when the pipeline carries an enabled StepCache config and its state."""
    config = get_stepcache_config(pipeline)
    return config is not None and config.enabled and get_stepcache_state(pipeline) is not None
