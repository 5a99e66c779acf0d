"""The bundled DiT on several ranks: sequence parallelism, CFG parallelism, and both (torch.distributed).

Building blocks for running :class:`~stepcache.models.dreamzero.model.CausalWorldActionDiT` across the
ranks of a ``torch.distributed`` job (gloo on CPU, NCCL on GPUs); every rank holds the same weights.

- **Sequence parallelism** (``sp_group``): the video tokens are cut into equal contiguous shares, one
  per rank in rank order; a rank embeds and runs only its share, and each block completes its
  attention with one ``all_gather`` of the shares' keys and values (the queries stay local). The few
  action, state and instruction tokens are computed on every rank. A rank holds only its shard of the
  noisy video and of its velocity: rows ``video_rows`` of the video viewed as ``(B, F * S, S)``
  (:meth:`ParallelWorldActionDiT.shard_video`). Prefill cuts the observed frame's tokens the same way
  and caches the gathered keys/values of the whole frame on every rank (the KV cache is replicated).
- **CFG parallelism** (``cfg_group``, 2 ranks): the group's rank 0 runs the conditional branch, rank 1
  the unconditional one, each with its own KV cache rows; one ``all_gather`` of both predictions then
  gives both ranks the guided video velocity ``uncond + s * (cond - uncond)`` and the conditional
  action velocity, as DreamZero does.
- **Both** (4 ranks = 2 CFG x 2 SP): :meth:`ParallelGroups.create` lays the ranks out as
  ``global rank = branch * sp + sp_rank``.

Collectives per denoising forward: one ``all_gather`` per block (SP) and one of the predictions (CFG);
per prefill, one per block (SP). Every rank of the job calls the same methods in the same order.

StepCache on top: every rank of one model replica holds the same guided velocity or a shard of it,
so the decision signals are reduced over :attr:`ParallelGroups.model_group`
(``VelocityCache(config, process_group=groups.model_group)``, or the backend's
``enable(pipeline, process_group=...)``). See docs/distributed.md.

Example (under ``torchrun --nproc-per-node 2``, after ``dist.init_process_group("gloo")``)::

    groups = ParallelGroups.create(sequence_parallel=2)
    dit = ParallelWorldActionDiT(model, groups, guidance_scale=5.0)
    dit.prefill(frame, instruction, kv_cache)
    out = dit(dit.shard_video(noise), actions, state, t_video, t_action, instruction, kv_cache)
    out.video            # this rank's shard of the guided video velocity
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DiTOutput, DreamZeroMiniConfig, KVCache, KVGather

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one model replica.

    Attributes:
        model_group: every rank of the replica (``cfg_parallel * sequence_parallel`` ranks): the group
            StepCache reduces its decision signals over (and checks, with ``check_consistency``).
        sp_group: the ranks that share one branch's video tokens, or None (no sequence parallelism).
        cfg_group: the two ranks that hold the same token share of the two CFG branches (group rank 0:
            conditional), or None (both branches on one rank).
    """

    model_group: Any
    sp_group: Any = None
    cfg_group: Any = None

    @classmethod
    def create(cls, *, cfg_parallel: int = 1, sequence_parallel: int = 1) -> ParallelGroups:
        """Groups over the default (world) group, whose size must be ``cfg_parallel * sequence_parallel``;
        global rank ``branch * sequence_parallel + sp_rank``. Every rank must call this (group creation
        is collective)."""
        import torch.distributed as dist

        if cfg_parallel not in (1, 2):
            raise ValueError(f"cfg_parallel must be 1 or 2 (one rank per CFG branch), got {cfg_parallel!r}")
        if not isinstance(sequence_parallel, int) or sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be a positive integer, got {sequence_parallel!r}")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group() first")
        world = dist.get_world_size()
        if world != cfg_parallel * sequence_parallel:
            raise ValueError(
                f"the world has {world} ranks, but cfg_parallel * sequence_parallel = {cfg_parallel} * "
                f"{sequence_parallel} = {cfg_parallel * sequence_parallel}"
            )
        rank = dist.get_rank()
        whole = dist.group.WORLD
        sp_group = cfg_group = None
        if sequence_parallel > 1:
            if cfg_parallel == 1:
                sp_group = whole
            else:  # every rank creates every group, in the same order
                for branch in range(cfg_parallel):
                    ranks = list(range(branch * sequence_parallel, (branch + 1) * sequence_parallel))
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        sp_group = group
        if cfg_parallel > 1:
            if sequence_parallel == 1:
                cfg_group = whole
            else:
                for sp_rank in range(sequence_parallel):
                    ranks = [sp_rank, sequence_parallel + sp_rank]
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        cfg_group = group
        return cls(model_group=whole, sp_group=sp_group, cfg_group=cfg_group)


class ParallelWorldActionDiT:
    """Runs a :class:`CausalWorldActionDiT` across the ranks of ``groups``; one instance per rank.

    Calls return what the sampler steps with: the guided video velocity (this rank's shard under
    sequence parallelism) and the conditional action velocity (whole, on every rank).

    Args:
        model: the DiT, with the same weights on every rank.
        groups: the process groups (:meth:`ParallelGroups.create`).
        guidance_scale: CFG scale on the video velocity; 1 means no CFG (then no ``cfg_group``).

    Raises:
        ValueError: a ``cfg_group`` without guidance, or a token count that the ranks cannot share
            equally.
    """

    def __init__(self, model: CausalWorldActionDiT, groups: ParallelGroups, *, guidance_scale: float = 5.0) -> None:
        import torch.distributed as dist

        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no CFG), got {guidance_scale}")
        if groups.cfg_group is not None:
            if guidance_scale == 1.0:
                raise ValueError("a cfg_group needs CFG: guidance_scale is 1.0 (no unconditional branch to run)")
            if dist.get_world_size(groups.cfg_group) != 2:
                raise ValueError(f"a cfg_group must have 2 ranks, got {dist.get_world_size(groups.cfg_group)}")
        self.model = model
        self.groups = groups
        self.guidance_scale = float(guidance_scale)
        cfg = model.config
        self.grid = cfg.frame_size // cfg.patch_size
        if groups.sp_group is not None:
            self.sp_size = dist.get_world_size(groups.sp_group)
            self.sp_rank = dist.get_rank(groups.sp_group)
        else:
            self.sp_size, self.sp_rank = 1, 0
        if self.grid % self.sp_size:
            raise ValueError(
                f"sequence parallelism over {self.sp_size} ranks cuts each frame's {self.grid} rows of patches "
                f"(frame_size {cfg.frame_size} / patch_size {cfg.patch_size}) into equal shares: use a rank count "
                f"that divides {self.grid}"
            )
        self.branch = 0 if groups.cfg_group is None else dist.get_rank(groups.cfg_group)  # 0: conditional
        # This rank's share: an equal run of the F * grid rows of patches of the video (and of the grid
        # rows of a prefilled frame), in rank order.
        video_rows = cfg.future_frames * self.grid // self.sp_size
        frame_rows = self.grid // self.sp_size
        self._video_tokens = self._share(video_rows * self.grid)
        self._frame_tokens = self._share(frame_rows * self.grid)
        self.video_rows = self._share(video_rows * cfg.patch_size)  # pixel rows of the (B, F * S, S) view

    def _share(self, per_rank: int) -> slice:
        return slice(self.sp_rank * per_rank, (self.sp_rank + 1) * per_rank)

    @property
    def config(self) -> DreamZeroMiniConfig:
        return self.model.config

    @property
    def decision_group(self) -> Any:
        """The group to give StepCache (``process_group``): every rank of this model replica."""
        return self.groups.model_group

    # -- the video shard ------------------------------------------------------------------------

    def shard_video(self, video: torch.Tensor) -> torch.Tensor:
        """This rank's shard ``(B, rows, S)`` of a whole video ``(B, F, S, S)`` (the whole video, copied,
        without sequence parallelism)."""
        if self.groups.sp_group is None:
            return video.clone()
        return video.flatten(1, 2)[:, self.video_rows].clone()

    def gather_video(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole video ``(B, F, S, S)`` from every rank's shard (one ``all_gather``; every rank of the
        sequence-parallel group calls it)."""
        cfg = self.config
        if self.groups.sp_group is None:
            return shard
        import torch.distributed as dist

        parts = [torch.empty_like(shard) for _ in range(self.sp_size)]
        dist.all_gather(parts, shard.contiguous(), group=self.groups.sp_group)
        return torch.cat(parts, dim=1).unflatten(1, (cfg.future_frames, cfg.frame_size))

    # -- forwards -------------------------------------------------------------------------------

    def branch_instructions(self, instruction: torch.Tensor) -> torch.Tensor:
        """The instruction rows this rank runs, for conditional instructions ``(B,)``: the conditional
        ones, the null instruction (the unconditional CFG rank), or both ``[cond; uncond]`` (CFG on
        one rank)."""
        null = torch.full_like(instruction, self.config.null_instruction)
        if self.groups.cfg_group is not None:
            return instruction if self.branch == 0 else null
        if self.guidance_scale != 1.0:
            return torch.cat([instruction, null])
        return instruction

    def prefill(self, frames: torch.Tensor, instruction: torch.Tensor, cache: KVCache) -> None:
        """Write the clean observed frames ``(B, S, S)`` (latent units, the same on every rank) into
        ``cache`` for this rank's branch rows (see :meth:`branch_instructions`)."""
        rows = self.branch_instructions(instruction)
        frames = frames.repeat(rows.shape[0] // frames.shape[0], 1, 1)
        if self.groups.sp_group is None:
            self.model.prefill(frames, rows, cache)
            return
        tokens = self._frame_tokens
        gather = self._kv_gather(tokens.stop - tokens.start)
        self.model.prefill(frames, rows, cache, patch_tokens=tokens, gather_kv=gather)

    def __call__(
        self,
        video: torch.Tensor,
        actions: torch.Tensor,
        state: torch.Tensor,
        video_timestep: torch.Tensor,
        action_timestep: torch.Tensor,
        instruction: torch.Tensor,
        cache: KVCache | None,
    ) -> DiTOutput:
        """One denoising forward. ``video``: this rank's shard ``(B, rows, S)`` (sequence parallelism)
        or the whole ``(B, F, S, S)``; the other inputs as :meth:`CausalWorldActionDiT.forward` takes them
        for the conditional batch ``(B, ...)``. Returns the guided video velocity (in ``video``'s
        layout) and the conditional action velocity; ``goal_position`` is None."""
        rows = self.branch_instructions(instruction)
        branches = rows.shape[0] // instruction.shape[0]
        video_velocity, action_velocity = self._forward(
            video.repeat(branches, *([1] * (video.dim() - 1))),
            actions.repeat(branches, 1, 1),
            state.repeat(branches, 1),
            video_timestep.repeat(branches),
            action_timestep.repeat(branches),
            rows,
            cache,
        )
        batch = instruction.shape[0]
        if self.groups.cfg_group is not None:
            (cond, uncond), action_velocity = self._exchange_branches(video_velocity, action_velocity)
        elif branches == 2:
            cond, uncond = video_velocity[:batch], video_velocity[batch:]
            action_velocity = action_velocity[:batch]  # actions follow the conditional branch only
        else:
            return DiTOutput(video=video_velocity, action=action_velocity)
        return DiTOutput(video=uncond + self.guidance_scale * (cond - uncond), action=action_velocity)

    def _forward(
        self, video: torch.Tensor, actions: torch.Tensor, state: torch.Tensor, video_timestep: torch.Tensor,
        action_timestep: torch.Tensor, instruction: torch.Tensor, cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw (unguided) velocities of this rank's rows and token share."""
        if self.groups.sp_group is None:
            out = self.model(video, actions, state, video_timestep, action_timestep, instruction, cache)
            return out.video, out.action
        expected = (self.video_rows.stop - self.video_rows.start, self.config.frame_size)
        if video.dim() != 3 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"under sequence parallelism the video is this rank's shard (B, {expected[0]}, {expected[1]}) "
                f"(see shard_video), got {tuple(video.shape)}"
            )
        tokens = self._video_tokens
        patches, action_velocity, _ = self.model.forward_patches(
            self._patchify_rows(video), actions, state, video_timestep, action_timestep, instruction, cache,
            patch_tokens=tokens, gather_kv=self._kv_gather(tokens.stop - tokens.start),
        )
        return self._unpatchify_rows(patches), action_velocity

    def _exchange_branches(
        self, video_velocity: torch.Tensor, action_velocity: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``((cond, uncond), conditional action)`` from this rank's branch and its CFG peer's (one
        ``all_gather``; both ranks then hold the same bits)."""
        import torch.distributed as dist

        packed = torch.cat([video_velocity.flatten(), action_velocity.flatten()])
        parts = [torch.empty_like(packed) for _ in range(2)]
        dist.all_gather(parts, packed, group=self.groups.cfg_group)
        split = video_velocity.numel()
        cond, uncond = (part[:split].view_as(video_velocity) for part in parts)
        return (cond, uncond), parts[0][split:].view_as(action_velocity)

    def _kv_gather(self, local_tokens: int) -> KVGather:
        """Completes a block's keys/values: the first ``local_tokens`` are this rank's share of the
        patch tokens, gathered from every rank in token order; the rest (action, state, instruction
        tokens, the same on every rank) follow, as in the single-process sequence."""
        import torch.distributed as dist

        group, size = self.groups.sp_group, self.sp_size

        def gather(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mine = torch.stack([keys[:, :, :local_tokens], values[:, :, :local_tokens]])  # one collective for both
            parts = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(parts, mine, group=group)
            shared = torch.cat(parts, dim=3)
            return (torch.cat([shared[0], keys[:, :, local_tokens:]], dim=2),
                    torch.cat([shared[1], values[:, :, local_tokens:]], dim=2))

        return gather

    def _patchify_rows(self, shard: torch.Tensor) -> torch.Tensor:
        """``(B, R * p, S)`` rows of the stacked frames -> ``(B, R * grid, p * p)`` tokens, in the order
        of :meth:`CausalWorldActionDiT.patchify`."""
        p = self.config.patch_size
        batch, height, _ = shard.shape
        x = shard.reshape(batch, height // p, p, self.grid, p).permute(0, 1, 3, 2, 4)
        return x.reshape(batch, (height // p) * self.grid, p * p)

    def _unpatchify_rows(self, patches: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        batch, tokens, _ = patches.shape
        rows = tokens // self.grid
        x = patches.reshape(batch, rows, self.grid, p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(batch, rows * p, self.grid * p)
