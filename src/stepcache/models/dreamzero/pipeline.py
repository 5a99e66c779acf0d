"""``DreamZeroPipeline``: closed-loop, chunk-by-chunk world-action denoising with optional StepCache.

Per chunk (DreamZero's loop):

1. context bookkeeping: a new instruction, or ``context_reset_chunks`` chunks since the last reset,
   clears the KV cache;
2. prefill: the clean observed frame goes into the KV cache through a timestep-0 forward (never
   skipped), for the conditional and (with CFG) the unconditional branch;
3. ``num_inference_steps`` denoising steps with two diffusers ``UniPCMultistepScheduler`` instances
   (flow sigmas, shift 5), one for the video latents and one for the actions. Each step runs the DiT
   once on the batch ``[conditional; unconditional]``; the video velocity is
   ``uncond + guidance_scale * (cond - uncond)``, the action velocity is the conditional one;
4. with StepCache active (``stepcache.is_stepcache_active(pipeline)``): the state is reset, then every
   step asks ``state.should_run_step(history)``; a run appends ``(video_velocity,)`` to the history
   and trims it, a skip reuses the last computed video *and* action velocities. The schedulers step
   either way.

Optionally ("decoupled noise") the video schedule is compressed to end at ``video_final_sigma``
(0.8) while the actions denoise fully; the predicted frames are then the video's last x0 estimate.

Units: frames are grey in [0, 1] (latent = ``2 * frame - 1``), the state is the agent position in the
unit square (model input ``2 * state - 1``), actions are world moves (model units = world /
``action_scale``). Convention: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, velocity ``noise - x0``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from stepcache import StepRecord, get_stepcache_state, is_stepcache_active, velocity_similarity
from stepcache.integrations.schedulers import SkipAwareStepper
from stepcache.models.dreamzero.model import CausalWorldActionDiT, KVCache
from stepcache.models.dreamzero.world import instruction_index

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DreamZeroPipelineConfig:
    """Sampling settings (DreamZero's defaults where they transfer)."""

    num_inference_steps: int = 16
    guidance_scale: float = 5.0  # CFG on the video velocity only
    flow_shift: float = 5.0  # sigma' = shift * s / (1 + (shift - 1) * s)
    decoupled_video_noise: bool = False
    video_final_sigma: float = 0.8  # where the video schedule ends when decoupled
    context_reset_chunks: int = 4  # the KV context is cleared after this many chunks

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
        if not 0.0 <= self.video_final_sigma < 1.0:
            raise ValueError(f"video_final_sigma must be in [0, 1), got {self.video_final_sigma}")
        if not isinstance(self.context_reset_chunks, int) or self.context_reset_chunks < 1:
            raise ValueError(f"context_reset_chunks must be a positive integer, got {self.context_reset_chunks!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChunkOutput:
    """One chunk: the actions to execute, the predicted frames, and what it cost."""

    actions: np.ndarray  # (B, H, 2) world moves
    frames: np.ndarray  # (B, F, S, S) predicted future frames in [0, 1]
    dit_forwards: int  # denoising forwards run (one per computed step; CFG branches batched)
    prefill_forwards: int
    ran: list[bool]  # per denoising step: forward computed (True) or velocity reused
    # per computed step: cosine of its video velocity and the previous computed one (None: first or reused)
    velocity_similarity: list[float | None]
    trace: list[StepRecord] = field(default_factory=list)  # StepCache decisions (empty when off)
    latency_s: float = 0.0
    context_frames: int = 0  # frames in the KV cache after the prefill
    context_reset: bool = False  # the context was cleared before this chunk


def _make_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


class DreamZeroPipeline:
    """The bundled DreamZero-style world-action pipeline (one episode at a time, batch allowed).

    Args:
        transformer: the :class:`CausalWorldActionDiT`.
        config: sampling settings.

    Example:
        >>> pipe = DreamZeroPipeline.from_pretrained("dreamzero-mini")      # doctest: +SKIP
        >>> out = pipe(frame, "reach the ring", state, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> out.actions.shape                                                # doctest: +SKIP
        (1, 8, 2)
    """

    def __init__(self, transformer: CausalWorldActionDiT, config: DreamZeroPipelineConfig | None = None) -> None:
        self.transformer = transformer.eval()
        self.config = config or DreamZeroPipelineConfig()
        self.video_scheduler = _make_scheduler(self.config.flow_shift)
        self.action_scheduler = _make_scheduler(self.config.flow_shift)
        self.kv_cache = KVCache()
        self.chunks_in_context = 0
        self.instruction: int | None = None

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "dreamzero-mini", config: DreamZeroPipelineConfig | None = None
    ) -> DreamZeroPipeline:
        """Load a bundled model by name, or a directory holding ``config.json`` + ``model.safetensors``."""
        from stepcache.models.dreamzero.weights import load_model

        return cls(load_model(model), config)

    # -- episode context ------------------------------------------------------------------------

    def reset_context(self) -> None:
        """Start a new episode: clear the KV cache and forget the instruction."""
        self.kv_cache.reset()
        self.chunks_in_context = 0
        self.instruction = None

    def _prepare_context(self, instruction: int) -> bool:
        reset = False
        if self.instruction is not None and instruction != self.instruction:
            logger.debug("new instruction: context reset")
            reset = True
        elif self.chunks_in_context >= self.config.context_reset_chunks:
            reset = True
        if reset:
            self.kv_cache.reset()
            self.chunks_in_context = 0
        self.instruction = instruction
        return reset

    # -- schedules ------------------------------------------------------------------------------

    def _set_schedules(self, num_steps: int) -> None:
        self.video_scheduler.set_timesteps(num_steps)
        self.action_scheduler.set_timesteps(num_steps)
        if self.config.decoupled_video_noise:
            # Compress the video's sigmas from [0, 1] into [video_final_sigma, 1]; the actions keep theirs.
            low = self.config.video_final_sigma
            sigmas = low + (1.0 - low) * self.video_scheduler.sigmas
            self.video_scheduler.sigmas = sigmas
            self.video_scheduler.timesteps = sigmas[:-1] * self.video_scheduler.config.num_train_timesteps

    # -- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        observation: np.ndarray | torch.Tensor,
        instruction: str | int,
        state: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
    ) -> ChunkOutput:
        """Denoise one chunk given the current observation ``(S, S)`` or ``(B, S, S)`` in [0, 1], an
        instruction (text or index, shared by the batch) and the state ``(2,)`` or ``(B, 2)``."""
        start = time.perf_counter()
        cfg = self.config
        model_cfg = self.transformer.config
        steps = cfg.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        frames = self._as_batch(observation, 3, "observation", (model_cfg.frame_size, model_cfg.frame_size))
        states = self._as_batch(state, 2, "state", (model_cfg.state_dim,))
        if frames.shape[0] != states.shape[0]:
            raise ValueError(f"observation batch {frames.shape[0]} != state batch {states.shape[0]}")
        batch = frames.shape[0]
        instruction_id = instruction_index(instruction)
        # The batch is [conditional; unconditional] with CFG: each branch has its own cache rows.
        use_cfg = cfg.guidance_scale != 1.0
        branches = 2 if use_cfg else 1
        context_reset = self._prepare_context(instruction_id)
        if self.kv_cache.num_frames and self.kv_cache.keys[0].shape[0] != batch * branches:
            raise ValueError(
                f"batch size changed within an episode (cache holds {self.kv_cache.keys[0].shape[0]} rows, "
                f"this chunk needs {batch * branches}); call reset_context() first"
            )
        instructions = torch.tensor([instruction_id] * batch + [model_cfg.null_instruction] * batch * (branches - 1))
        model_state = (states * 2.0 - 1.0).repeat(branches, 1)

        # 1. prefill: the clean observation enters the KV cache (timestep 0; never skipped).
        self.transformer.prefill((frames * 2.0 - 1.0).repeat(branches, 1, 1), instructions, self.kv_cache)
        self.chunks_in_context += 1

        # 2. denoise video latents and actions jointly.
        self._set_schedules(steps)
        video = torch.randn(
            (batch, model_cfg.future_frames, model_cfg.frame_size, model_cfg.frame_size), generator=generator
        )
        actions = torch.randn((batch, model_cfg.action_horizon, model_cfg.action_dim), generator=generator)

        caching = is_stepcache_active(self)
        cache_state = get_stepcache_state(self) if caching else None
        if cache_state is not None:
            # Every chunk is a new generation; the video's sigmas give each step's time and size.
            cache_state.reset(steps, timesteps=self.video_scheduler.sigmas.tolist())
        # Solver-aware skipping: skipped steps never enter the UniPC memory (see SkipAwareStepper).
        solver_aware = cache_state is not None and cache_state.config.solver_aware
        video_stepper = SkipAwareStepper(self.video_scheduler) if solver_aware else None
        action_stepper = SkipAwareStepper(self.action_scheduler) if solver_aware else None
        history: list[tuple[torch.Tensor, ...]] = []
        video_velocity = action_velocity = None
        ran: list[bool] = []
        computed: list[torch.Tensor | None] = []  # per step: the new video velocity, None when reused
        forwards = 0
        video_x0 = None
        for i in range(steps):
            t_video = self.video_scheduler.timesteps[i]
            t_action = self.action_scheduler.timesteps[i]
            run = cache_state.should_run_step(history) if cache_state is not None else True
            if run:
                out = self.transformer(
                    video.repeat(branches, 1, 1, 1),
                    actions.repeat(branches, 1, 1),
                    model_state,
                    t_video.float().expand(batch * branches),
                    t_action.float().expand(batch * branches),
                    instructions,
                    self.kv_cache,
                )
                forwards += 1
                # Outputs may live in buffers a compiled model reuses; keep our own copy while caching.
                raw_video = out.video.clone() if caching else out.video
                raw_action = out.action.clone() if caching else out.action
                if use_cfg:
                    cond, uncond = raw_video[:batch], raw_video[batch:]
                    video_velocity = uncond + cfg.guidance_scale * (cond - uncond)
                else:
                    video_velocity = raw_video
                action_velocity = raw_action[:batch]  # actions follow the conditional branch only
                computed.append(video_velocity)
                if cache_state is not None:
                    cache_state.push_computed(history, (video_velocity, action_velocity))
            else:
                computed.append(None)
                # skipped: the cached (or extrapolated) video and action velocities
                video_velocity, action_velocity = cache_state.reused_prediction(history)
            ran.append(run)
            if i == steps - 1:
                video_x0 = video - self.video_scheduler.sigmas[i] * video_velocity
            if solver_aware:
                video = video_stepper.step(video_velocity, t_video, video, computed=run).prev_sample
                actions = action_stepper.step(action_velocity, t_action, actions, computed=run).prev_sample
            else:
                video = self.video_scheduler.step(video_velocity, t_video, video).prev_sample
                actions = self.action_scheduler.step(action_velocity, t_action, actions).prev_sample

        final_video = video_x0 if cfg.decoupled_video_noise else video
        predicted = ((final_video + 1.0) / 2.0).clamp(0.0, 1.0)
        latency = time.perf_counter() - start
        # Diagnostics, computed after the clock stops so that they cost the uncached run nothing.
        similarities: list[float | None] = []
        previous = None
        for velocity in computed:
            similarities.append(None if velocity is None or previous is None
                                else velocity_similarity(velocity, previous))
            previous = velocity if velocity is not None else previous
        result = ChunkOutput(
            actions=(actions * model_cfg.action_scale).numpy().astype(np.float32),
            frames=predicted.numpy().astype(np.float32),
            dit_forwards=forwards,
            prefill_forwards=1,
            ran=ran,
            velocity_similarity=similarities,
            trace=list(cache_state.trace) if cache_state is not None else [],
            latency_s=latency,
            context_frames=self.kv_cache.num_frames,
            context_reset=context_reset,
        )
        logger.debug("chunk: %d/%d forwards, %.1f ms", forwards, steps, 1000 * result.latency_s)
        return result

    @staticmethod
    def _as_batch(value: Any, batched_dim: int, name: str, tail: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        tensor = tensor.float()
        if tensor.dim() == batched_dim - 1:
            tensor = tensor[None]
        if tensor.dim() != batched_dim or tuple(tensor.shape[1:]) != tail:
            raise ValueError(f"{name} must have shape {tail} or (B, *{tail}), got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} must be finite")
        return tensor
