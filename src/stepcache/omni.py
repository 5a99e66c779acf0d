"""``Omni``: the vLLM-Omni-style front door to the bundled DreamZero-style world-action model.

    omni = Omni(model="dreamzero-mini", cache_backend="step_cache", cache_config={...})
    omni.start_episode(seed=0)
    result = omni.generate(observation, "reach the ring", state)   # one chunk, closed loop
    result.actions, result.frames, result.stats.dit_forwards

Without ``cache_backend``, the ``DIFFUSION_CACHE_BACKEND`` environment variable decides (unset,
empty or "none": no cache); ``cache_backend=None`` or ``"none"`` runs every step whatever the
environment says. The backend's ``enable(pipeline)`` runs once here, its ``refresh`` before every
chunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepcache.backend import CacheBackend
from stepcache.selector import get_cache_backend
from stepcache.state import schedule_string

logger = logging.getLogger(__name__)


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()


@dataclass
class RequestStats:
    """What one ``generate`` call cost and how StepCache decided."""

    dit_forwards: int  # denoising forwards (one per computed step)
    prefill_forwards: int  # timestep-0 context forwards (never skipped)
    num_inference_steps: int
    latency_s: float  # wall clock of the request: cache refresh, prefill, denoising (diagnostics excluded)
    ran: list[bool]  # per step: forward computed or velocity reused
    velocity_similarity: list[float | None]  # per step: cosine with the previous computed velocity
    trace: list[dict[str, Any]] = field(default_factory=list)  # StepCache's per-step records (empty when off)
    chunk_index: int = 0  # chunk number within the episode (0 = first)
    context_frames: int = 0  # frames in the KV cache for this chunk
    context_reset: bool = False
    cache_backend: str = "none"

    @property
    def schedule(self) -> str:
        """``RR....R....R....``: R = forward computed, . = velocity reused."""
        return schedule_string(self.ran)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dit_forwards": self.dit_forwards,
            "prefill_forwards": self.prefill_forwards,
            "num_inference_steps": self.num_inference_steps,
            "latency_s": self.latency_s,
            "schedule": self.schedule,
            "velocity_similarity": self.velocity_similarity,
            "trace": self.trace,
            "chunk_index": self.chunk_index,
            "context_frames": self.context_frames,
            "context_reset": self.context_reset,
            "cache_backend": self.cache_backend,
        }


@dataclass
class OmniOutput:
    """One chunk: the actions to execute ``(H, 2)``, the predicted frames ``(F, S, S)`` in [0, 1] (a
    leading batch dimension when the observation had one), and the request's stats."""

    actions: np.ndarray
    frames: np.ndarray
    stats: RequestStats


class Omni:
    """Load a DreamZero-style model and generate action chunks, with or without StepCache.

    Args:
        model: ``"dreamzero-mini"`` (bundled) or a directory holding ``config.json`` and
            ``model.safetensors``.
        cache_backend: ``"step_cache"`` (or ``"stepcache"``, ``"step_cache_dit"``), ``None``/``"none"``
            for no cache; not given: the ``DIFFUSION_CACHE_BACKEND`` environment variable.
        cache_config: ``DiffusionCacheConfig``, a dict or JSON string of its fields, or None (defaults).
        pipeline_config: a :class:`DreamZeroPipelineConfig` (steps, CFG scale, decoupled noise, ...).
        seed: seeds the noise of every chunk; :meth:`start_episode` can reseed.
    """

    def __init__(
        self,
        model: str | Path = "dreamzero-mini",
        cache_backend: str | None = NOT_GIVEN,
        cache_config: Any = None,
        *,
        pipeline_config: Any = None,
        seed: int = 0,
    ) -> None:
        from stepcache.models.dreamzero.pipeline import DreamZeroPipeline

        if cache_backend is NOT_GIVEN:
            backend = get_cache_backend(None, cache_config)  # reads DIFFUSION_CACHE_BACKEND
        else:
            backend = get_cache_backend("none" if cache_backend is None else cache_backend, cache_config)
        self.model = model
        self.pipeline = DreamZeroPipeline.from_pretrained(model, pipeline_config)
        self.cache_backend: CacheBackend | None = backend
        self.cache_backend_name = "none" if backend is None else "step_cache"
        if backend is not None:
            backend.enable(self.pipeline)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.chunk_index = 0
        logger.info("Omni: model %s, cache backend %s", model, self.cache_backend_name)

    @property
    def num_inference_steps(self) -> int:
        return self.pipeline.config.num_inference_steps

    def start_episode(self, seed: int | None = None) -> None:
        """Start a new episode: clear the KV context; reseed the chunk noise when ``seed`` is given."""
        self.pipeline.reset_context()
        self.chunk_index = 0
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def generate(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> OmniOutput:
        """Continue the episode by one chunk from ``observation`` ``(S, S)`` (grey, [0, 1]), the
        instruction (text or index) and the robot state ``(2,)``; a leading batch dimension is allowed."""
        start = time.perf_counter()
        steps = self.num_inference_steps
        if self.cache_backend is not None:
            self.cache_backend.refresh(self.pipeline, steps, verbose=False)
        refresh_s = time.perf_counter() - start
        out = self.pipeline(observation, instruction, state, generator=generator or self.generator,
                            num_inference_steps=steps)
        latency = refresh_s + out.latency_s  # the pipeline's clock stops before its diagnostics
        stats = RequestStats(
            dit_forwards=out.dit_forwards,
            prefill_forwards=out.prefill_forwards,
            num_inference_steps=steps,
            latency_s=latency,
            ran=out.ran,
            velocity_similarity=out.velocity_similarity,
            trace=[
                {"step": r.step, "ran": r.ran, "reason": r.reason, "similarity": r.similarity} for r in out.trace
            ],
            chunk_index=self.chunk_index,
            context_frames=out.context_frames,
            context_reset=out.context_reset,
            cache_backend=self.cache_backend_name,
        )
        self.chunk_index += 1
        batched = np.asarray(observation).ndim == 3
        actions, frames = (out.actions, out.frames) if batched else (out.actions[0], out.frames[0])
        return OmniOutput(actions=actions, frames=frames, stats=stats)
