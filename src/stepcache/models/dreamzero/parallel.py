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

The bundled pipeline and ``Omni`` run on these blocks (``DreamZeroPipeline(..., parallel=groups)``,
``Omni(..., parallel=ParallelConfig(...))``); :class:`ParallelConfig` is what a user names, and
:func:`init_distributed` starts the default group from ``torchrun``'s environment.

Example (under ``torchrun --nproc-per-node 2``, after ``dist.init_process_group("gloo")``)::

    groups = ParallelGroups.create(sequence_parallel=2)
    dit = ParallelWorldActionDiT(model, groups, guidance_scale=5.0)
    dit.prefill(frame, instruction, kv_cache)
    out = dit(dit.shard_video(noise), actions, state, t_video, t_action, instruction, kv_cache)
    out.video            # this rank's shard of the guided video velocity
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DiTOutput, DreamZeroMiniConfig, KVCache, KVGather

logger = logging.getLogger(__name__)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelConfig:
    """How one model replica spreads over the ranks of a ``torchrun`` job (what ``Omni(parallel=...)``
    takes; pure data).

    Attributes:
        cfg_parallel: 1, or 2 (one CFG branch per rank; needs ``guidance_scale > 1``).
        sequence_parallel: ranks that share one branch's video tokens; None: the rest of the world
            (``world_size // cfg_parallel``). Must divide the rows of patches of a frame.
        check_consistency: compare every StepCache decision across the ranks (two small
            ``all_gather`` per step; tests and debugging).
        backend: the ``torch.distributed`` backend, used only when the default group is not yet
            initialised (:func:`init_distributed`); None: ``"nccl"`` for a CUDA device, else ``"gloo"``.
        timeout_s: the collectives' timeout when this starts the default group: a rank left waiting
            (another rank failed on its own) raises after this long instead of hanging.
    """

    cfg_parallel: int = 1
    sequence_parallel: int | None = None
    check_consistency: bool = False
    backend: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.cfg_parallel, bool) or self.cfg_parallel not in (1, 2):
            raise ValueError(f"ParallelConfig.cfg_parallel must be 1 or 2 (one rank per CFG branch), got "
                             f"{self.cfg_parallel!r}")
        sp = self.sequence_parallel
        if sp is not None and (isinstance(sp, bool) or not isinstance(sp, int) or sp < 1):
            raise ValueError(f"ParallelConfig.sequence_parallel must be a positive integer or None (the rest of "
                             f"the world), got {sp!r}")
        if not isinstance(self.check_consistency, bool):
            raise ValueError(f"ParallelConfig.check_consistency must be True or False, got "
                             f"{self.check_consistency!r}")
        if self.backend is not None and (not isinstance(self.backend, str) or not self.backend):
            raise ValueError(f"ParallelConfig.backend must be a backend name ('gloo', 'nccl') or None, got "
                             f"{self.backend!r}")
        if not (isinstance(self.timeout_s, (int, float)) and not isinstance(self.timeout_s, bool)
                and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"ParallelConfig.timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")

    @classmethod
    def coerce(cls, value: Any) -> ParallelConfig:
        """A ``ParallelConfig`` from itself or a dict of its fields (an unknown key is an error)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"unknown ParallelConfig fields {unknown}; allowed: {known}")
            return cls(**value)
        raise ValueError(f"parallel must be a ParallelConfig or a dict of its fields, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def create_groups(self) -> ParallelGroups:
        """The groups over the default group (every rank calls this; it must be initialised)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_distributed() (under torchrun) "
                               "or dist.init_process_group() first")
        sp = self.sequence_parallel
        if sp is None:
            world = dist.get_world_size()
            if world % self.cfg_parallel:
                raise ValueError(f"cfg_parallel {self.cfg_parallel} does not divide the {world} ranks")
            sp = world // self.cfg_parallel
        return ParallelGroups.create(cfg_parallel=self.cfg_parallel, sequence_parallel=sp)


def init_distributed(backend: str | None = None, *, device: torch.device | None = None,
                     timeout_s: float = 600.0) -> bool:
    """Start ``torch.distributed``'s default group from ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), unless it already runs. Returns True when this
    call started it (the caller then owns it: ``dist.destroy_process_group()`` at the end).

    ``backend`` None: ``"nccl"`` when ``device`` is a CUDA device, else ``"gloo"``."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and the environment lacks {missing}: launch with torchrun "
            "(torchrun --nproc-per-node N script.py), or call torch.distributed.init_process_group() first"
        )
    if backend is None:
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def fingerprint(value: Any) -> int:
    """A number equal on every process for equal values (CRC32 of a tensor's bytes or of ``repr``;
    Python's ``hash`` of a string is salted per process)."""
    if isinstance(value, torch.Tensor):
        return zlib.crc32(value.detach().cpu().contiguous().numpy().tobytes())
    return zlib.crc32(repr(value).encode())


def ranks_agree(values: Mapping[str, int], group: Any, what: str, *, ok: bool = True) -> None:
    """Check that every rank of ``group`` passed the same ``values`` (one ``all_gather`` of int64).

    Raises, on every rank alike: RuntimeError naming the ranks and the differing fields; or, when some
    rank passed ``ok=False`` (it failed on its own and raises its own error after this), a
    RuntimeError on the other ranks naming it, so that no rank goes on to wait for it in a collective.
    """
    import torch.distributed as dist

    from stepcache.state import _collective_device

    row = [int(ok), *(int(v) for v in values.values())]
    mine = torch.tensor(row, dtype=torch.int64, device=_collective_device(group, torch.device("cpu")))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    rows = [tuple(int(v) for v in g.cpu()) for g in gathered]
    failed = [rank for rank, other in zip(ranks, rows) if not other[0]]
    if failed:
        if not ok:
            return  # the caller raises its own error
        raise RuntimeError(f"rank(s) {failed} failed before {what} could be checked (the error is raised there); "
                           "every rank stops here rather than wait for them in a collective")
    if len(set(rows)) > 1:
        agreeing: dict[tuple[int, ...], list[int]] = {}
        for rank, other in zip(ranks, rows):
            agreeing.setdefault(other, []).append(rank)
        differing = [
            f"{name} " + ", ".join(f"rank {rank}: {other[i + 1]}" for rank, other in zip(ranks, rows))
            for i, name in enumerate(values)
            if len({other[i + 1] for other in rows}) > 1
        ]
        raise RuntimeError(
            f"ranks disagree on {what}; ranks that agree: {' | '.join(str(g) for g in agreeing.values())}; "
            f"differing: {'; '.join(differing)}. Every rank of a model replica must be given the same settings "
            "and inputs, in the same order"
        )


# A rank's outcome of one chunk, as the ranks agree on it (agree_on_outcome).
SUCCEEDED, FAILED_AFTER_COLLECTIVES, FAILED_IN_COLLECTIVES = 0, 1, 2


class GroupBrokenError(RuntimeError):
    """The ranks can no longer be trusted to pair their collectives alike: restart the group."""


class ChunkFailedOnRankError(RuntimeError):
    """A chunk failed on another rank; every rank rolled it back and the group can go on."""


@dataclass
class GroupHealth:
    """Whether a replica's groups can still run chunks (shared by every pipeline built on them)."""

    broken: str | None = None

    def check(self) -> None:
        """Refuse (before any collective) once the group is broken."""
        if self.broken is not None:
            raise GroupBrokenError(
                f"the process group cannot run chunks any more: {self.broken}. After that its ranks may pair "
                "their collectives wrongly (a hang or an abort), so every further chunk is refused: restart the "
                "group (close the Omni or pipeline on every rank and start the torchrun job again)"
            )


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one model replica.

    Attributes:
        model_group: every rank of the replica (``cfg_parallel * sequence_parallel`` ranks): the group
            StepCache reduces its decision signals over (and checks, with ``check_consistency``).
        sp_group: the ranks that share one branch's video tokens, or None (no sequence parallelism).
        cfg_group: the two ranks that hold the same token share of the two CFG branches (group rank 0:
            conditional), or None (both branches on one rank).
        agreement_group: every rank of the replica again, on gloo, with a longer timeout than the
            others: the ranks agree there on each chunk's outcome (:func:`agree_on_outcome`); a rank
            that failed mid-chunk waits there, where no forward collective of a peer can pair with it.
        health: whether these groups can still run chunks.
    """

    model_group: Any
    sp_group: Any = None
    cfg_group: Any = None
    agreement_group: Any = None
    health: GroupHealth = field(default_factory=GroupHealth, compare=False)

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
        # Longer than the other groups' timeout: a rank that failed waits here while its peers wait, up to
        # that timeout, for it in a forward's collective, and then join it here.
        agreement_s = 2 * _group_timeout_s(whole) + 30
        agreement = dist.new_group(list(range(world)), backend="gloo",
                                   timeout=datetime.timedelta(seconds=agreement_s))
        return cls(model_group=whole, sp_group=sp_group, cfg_group=cfg_group, agreement_group=agreement)


def _group_timeout_s(group: Any) -> float:
    """The collectives' timeout of ``group`` (torch keeps it on the backend's options, a private
    attribute: the default of 30 minutes when it cannot be read)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    try:
        return float(group._get_backend(device).options._timeout.total_seconds())
    except (AttributeError, RuntimeError):
        return 1800.0


def _summary(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def agree_on_outcome(groups: ParallelGroups, status: int, error: BaseException | None,
                     what: str = "the chunk") -> None:
    """Every rank's outcome of ``what`` (one ``all_gather`` of an int64 on the agreement group; the
    failures' one-line summaries gathered too when some rank failed). Returns when every rank succeeded.

    Raises, on every rank:
        GroupBrokenError: some rank failed while collectives were pending (its peers may have waited
            for it in one, and timed out), or the agreement itself failed (a rank died, hangs or left);
            the groups are marked broken, so every later chunk is refused.
        the rank's own ``error`` (with a note naming the failing ranks) on a rank that failed after all
            of its collectives, :class:`ChunkFailedOnRankError` on the others: every rank rolls back and
            the group can go on.
    """
    import torch.distributed as dist

    group = groups.agreement_group
    try:
        world = dist.get_world_size(group)
        mine = torch.tensor([status], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        statuses = [int(g) for g in gathered]
        if not any(statuses):
            return
        summaries: list[Any] = [None] * world
        dist.all_gather_object(summaries, None if error is None else _summary(error), group=group)
    except Exception as agreement_error:
        groups.health.broken = (f"the ranks could not agree on the outcome of {what} ({_summary(agreement_error)}; "
                                "a rank died, hangs or left)")
        if error is not None:
            groups.health.broken += f"; this rank had failed with {_summary(error)}"
        groups.health.check()  # raises
    ranks = dist.get_process_group_ranks(group)
    failed = [rank for rank, status_of in zip(ranks, statuses) if status_of]
    causes = "; ".join(f"rank {rank}: {summary}" for rank, summary, status_of in zip(ranks, summaries, statuses)
                       if status_of)
    if FAILED_IN_COLLECTIVES in statuses:
        groups.health.broken = f"{what} failed on rank(s) {failed} while collectives were pending ({causes})"
        try:
            groups.health.check()
        except GroupBrokenError as broken:
            raise broken from error
    message = (f"{what} failed on rank(s) {failed} ({causes}) after its collectives; every rank rolled it back (its "
               "episode is as it was before it) and the ranks can go on together: retry it on every rank")
    if error is not None:
        error.add_note(message)
        raise error
    raise ChunkFailedOnRankError(message)


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

    def branch_rows(self, batch: int) -> int:
        """The KV cache rows this rank holds for a conditional batch of ``batch`` samples: ``batch`` per
        branch it runs (both branches without a ``cfg_group`` when guided, one with it)."""
        both = self.groups.cfg_group is None and self.guidance_scale != 1.0
        return 2 * batch if both else batch

    def branch_instructions(self, instruction: torch.Tensor, batches: Sequence[int] | None = None) -> torch.Tensor:
        """The instruction rows this rank runs, for conditional instructions ``(B,)``: the conditional
        ones, the null instruction (the unconditional CFG rank), or both (CFG on one rank): ``[cond;
        uncond]``, per segment of ``batches`` when given (see :meth:`__call__`)."""
        null = torch.full_like(instruction, self.config.null_instruction)
        if self.groups.cfg_group is not None:
            return instruction if self.branch == 0 else null
        if self.guidance_scale != 1.0:
            segments = self._segments(instruction.shape[0], batches)
            if len(segments) == 1:
                return torch.cat([instruction, null])
            return torch.cat([part for seg, nul in zip(instruction.split(segments), null.split(segments))
                              for part in (seg, nul)])
        return instruction

    def prefill(self, frames: torch.Tensor, instruction: torch.Tensor, cache: KVCache,
                batches: Sequence[int] | None = None) -> None:
        """Write the clean observed frames ``(B, S, S)`` (latent units, the same on every rank) into
        ``cache`` for this rank's branch rows (see :meth:`branch_instructions`)."""
        rows = self.branch_instructions(instruction, batches)
        if rows.shape[0] != frames.shape[0]:
            frames = self._both_branches(frames, self._segments(frames.shape[0], batches))
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
        batches: Sequence[int] | None = None,
    ) -> DiTOutput:
        """One denoising forward. ``video``: this rank's shard ``(B, rows, S)`` (sequence parallelism)
        or the whole ``(B, F, S, S)``; the other inputs as :meth:`CausalWorldActionDiT.forward` takes them
        for the conditional batch ``(B, ...)``. Returns the guided video velocity (in ``video``'s
        layout) and the conditional action velocity; ``goal_position`` is None.

        ``batches``: the batch is several episodes' samples (``sum(batches) == B``) whose KV cache rows
        lie episode after episode (a :class:`~stepcache.models.dreamzero.model.StackedKVCache`): with both
        CFG branches on this rank, each episode's rows are ``[cond; uncond]``. None: one episode."""
        rows = self.branch_instructions(instruction, batches)
        batch = instruction.shape[0]
        branches = rows.shape[0] // batch
        if branches == 2:
            segments = self._segments(batch, batches)
            video, actions, state, video_timestep, action_timestep = (
                self._both_branches(x, segments) for x in (video, actions, state, video_timestep, action_timestep)
            )
        video_velocity, action_velocity = self._forward(
            video, actions, state, video_timestep, action_timestep, rows, cache
        )
        if self.groups.cfg_group is not None:
            (cond, uncond), action_velocity = self._exchange_branches(video_velocity, action_velocity)
        elif branches == 2:
            (cond, uncond), (action_velocity, _) = (self._split_branches(x, segments)
                                                    for x in (video_velocity, action_velocity))
        else:
            return DiTOutput(video=video_velocity, action=action_velocity)
        return DiTOutput(video=uncond + self.guidance_scale * (cond - uncond), action=action_velocity)

    @staticmethod
    def _segments(batch: int, batches: Sequence[int] | None) -> list[int]:
        if batches is None:
            return [batch]
        segments = [int(b) for b in batches]
        if sum(segments) != batch or min(segments) < 1:
            raise ValueError(f"batches {list(batches)} must be positive and add up to the batch {batch}")
        return segments

    @staticmethod
    def _both_branches(x: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """Each segment's rows twice, ``[x_1; x_1; x_2; x_2; ...]`` (the rows of both CFG branches)."""
        if len(segments) == 1:
            return x.repeat(2, *([1] * (x.dim() - 1)))
        return torch.cat([part for seg in x.split(segments) for part in (seg, seg)])

    @staticmethod
    def _split_branches(x: torch.Tensor, segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and unconditional rows of a :meth:`_both_branches` layout, in sample order."""
        if len(segments) == 1:
            return x[: segments[0]], x[segments[0] :]
        parts = x.split([n for seg in segments for n in (seg, seg)])
        return torch.cat(parts[0::2]), torch.cat(parts[1::2])

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
