"""Scheduler replay: a linear scheduler's update read off once and replayed as one product per step.

Stepping a diffusers scheduler costs a few hundred microseconds of Python per call, as much as a
third of a denoising forward of a small model, and it steps one sample at a time. UniPC's update on
flow predictions is linear in the starting noise and the velocities it is given, so
:class:`SchedulerReplay` reads its coefficients off the diffusers scheduler (stepping it on basis
vectors, in float64, checked against a direct run), and :class:`ReplayCohort` steps the samples of
many chunks that started together with **one** product per stream and step: the columns of all its
chunks side by side. :class:`DirectStepper` calls the scheduler itself every step (bit for bit the
loop before the replay existed); the two agree to float32 rounding.

This is where "how steps are batched" lives for the scheduler side; the DiT side is
:meth:`stepcache.models.dreamzero.pipeline.DreamZeroPipeline.denoise_step`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stepcache.integrations.schedulers import SkipAwareStepper


class SchedulerNotLinearError(RuntimeError):
    """The scheduler's update is not a fixed linear map of its inputs: it cannot be replayed."""


def _copy_lists(values: dict[str, Any]) -> dict[str, Any]:
    # A scheduler's step replaces its tensors but edits its lists (model outputs, timesteps) in place.
    return {k: (list(v) if isinstance(v, list) else v) for k, v in values.items()}


def instance_vars(obj: Any) -> dict[str, Any]:
    """A copy of ``vars(obj)`` whose lists are copied too (for :func:`set_instance_vars`)."""
    return _copy_lists(vars(obj))


def set_instance_vars(obj: Any, values: dict[str, Any]) -> None:
    """Put back what :func:`instance_vars` took."""
    vars(obj).clear()
    vars(obj).update(_copy_lists(values))


class SchedulerReplay:
    """A diffusers scheduler's update, read off as coefficients and replayed as one product per step.

    For UniPC on flow predictions (any scheduler whose update is linear in its sample and model
    outputs), after step ``i`` the sample is ``x_{i+1} = sum_j c_ij b_j`` over
    ``b = (x_0, v_0, ..., v_i)``, ``v_j`` being the velocity given at step ``j``. Stepping the scheduler
    itself, in float64, from ``x_0 = e_0`` with ``v_j = e_{j+1}`` makes its ``prev_sample`` the row
    ``c_i``: the maths stays diffusers'. With solver-aware stepping the rows also depend on which steps
    were computed, so they are read off per prefix of that pattern (each once, then kept). The
    construction checks the replay against the scheduler on random inputs.

    Args:
        make_scheduler: returns a fresh scheduler, its timesteps (and sigmas) set.
        solver_aware: step through :class:`SkipAwareStepper` (computed flags matter).
    """

    MAX_NODES = 4096  # prefixes kept (a solver-aware table grows with the patterns seen)

    def __init__(self, make_scheduler: Callable[[], Any], solver_aware: bool) -> None:
        self._make = make_scheduler
        self.solver_aware = solver_aware
        self._probe = make_scheduler()
        self.num_steps = len(self._probe.timesteps)
        self._stepper = SkipAwareStepper(self._probe) if solver_aware else None
        root = torch.zeros(1, self.num_steps + 1, dtype=torch.float64)
        root[0, 0] = 1.0
        self._root = (self._snapshot(), root)
        self._nodes: dict[Any, tuple[Any, torch.Tensor, dict[torch.device, torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self._check()

    def row(self, flags: Sequence[bool], device: torch.device) -> torch.Tensor:
        """Coefficients ``(len(flags) + 1,)`` (float32) of the sample after step ``len(flags) - 1``
        over ``(x_0, v_0, ...)``; ``flags[j]``: step ``j`` computed."""
        key = tuple(flags) if self.solver_aware else len(flags)
        node = self._nodes.get(key)
        if node is None:
            with self._lock:
                node = self._node(tuple(flags) if self.solver_aware else (True,) * len(flags))
        rows = node[2]
        row = rows.get(device)
        if row is None:
            row = rows[device] = node[1][0, : len(flags) + 1].to(device, torch.float32)
        return row

    def _node(self, flags: tuple[bool, ...]) -> tuple[Any, torch.Tensor, dict[torch.device, torch.Tensor]]:
        key = flags if self.solver_aware else len(flags)
        node = self._nodes.get(key)
        if node is not None:
            return node
        if not flags or len(flags) > self.num_steps:
            raise ValueError(f"a generation of {self.num_steps} steps has no step {len(flags) - 1}")
        parent_state, parent_sample = self._root if len(flags) == 1 else self._node(flags[:-1])[:2]
        self._restore(parent_state)
        index = len(flags) - 1
        basis = torch.zeros_like(parent_sample)
        basis[0, index + 1] = 1.0
        timestep = self._probe.timesteps[index]
        if self._stepper is not None:
            sample = self._stepper.step(basis, timestep, parent_sample, computed=flags[-1]).prev_sample
        else:
            sample = self._probe.step(basis, timestep, parent_sample).prev_sample
        if len(self._nodes) >= self.MAX_NODES:
            self._nodes.clear()
        node = (self._snapshot(), sample, {})
        self._nodes[key] = node
        return node

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return instance_vars(self._probe), None if self._stepper is None else instance_vars(self._stepper)

    def _restore(self, snapshot: tuple[dict[str, Any], dict[str, Any] | None]) -> None:
        probe_vars, stepper_vars = snapshot
        set_instance_vars(self._probe, probe_vars)
        if stepper_vars is not None:
            set_instance_vars(self._stepper, stepper_vars)

    def _check(self) -> None:
        """Replay against the scheduler itself on random inputs (every step computed; for solver-aware
        stepping also a pattern with skips)."""
        patterns = [(True,) * self.num_steps]
        if self.solver_aware and self.num_steps > 2:
            patterns.append(tuple(i < 2 or i % 3 == 0 for i in range(self.num_steps)))
        generator = torch.Generator().manual_seed(0)
        for flags in patterns:
            scheduler = self._make()
            stepper = SkipAwareStepper(scheduler) if self.solver_aware else None
            sample = torch.randn(2, 8, generator=generator)
            inputs = [sample]
            for index, computed in enumerate(flags):
                velocity = torch.randn(2, 8, generator=generator)
                inputs.append(velocity)
                timestep = scheduler.timesteps[index]
                if stepper is not None:
                    sample = stepper.step(velocity, timestep, sample, computed=computed).prev_sample
                else:
                    sample = scheduler.step(velocity, timestep, sample).prev_sample
                with self._lock:
                    row = self._node(flags[: index + 1])[1][0, : index + 2]
                replayed = torch.tensordot(row, torch.stack(inputs).double(), dims=1)
                error = float((replayed - sample.double()).abs().max())
                if not error <= 1e-4 * max(1.0, float(sample.abs().max())):
                    raise SchedulerNotLinearError(
                        f"{type(scheduler).__name__}: the replayed step {index} differs from the scheduler's by "
                        f"{error:.3g}"
                    )


class ReplayCohort:
    """Steps the video and actions of chunks that start together (the same schedule and shapes) by
    replaying :class:`SchedulerReplay` rows: each step is one product per stream for every member.

    The inputs of all members sit side by side, ``(num_steps + 1, members, numel)``: the starting
    noise, then every velocity given so far. Without solver-aware stepping every member's row is the
    same (it depends only on the step), so a step is one vector-matrix product; with it, the rows
    depend on each member's computed flags, and a step is one batched product. Members step in
    lockstep; a member that left (its chunk failed) is simply not stepped again.

    Args:
        videos: ``(members, *video_shape)`` starting noise.
        actions: ``(members, *action_shape)`` starting noise.
        video_replay, action_replay: the tables (the same object when the two schedules coincide).
    """

    def __init__(self, videos: torch.Tensor, actions: torch.Tensor, video_replay: SchedulerReplay,
                 action_replay: SchedulerReplay) -> None:
        steps = video_replay.num_steps
        members = videos.shape[0]
        self.members = members
        self.video_shape, self.action_shape = tuple(videos.shape[1:]), tuple(actions.shape[1:])
        self.video_replay, self.action_replay = video_replay, action_replay
        self.solver_aware = video_replay.solver_aware
        self.video_inputs = videos.new_zeros(steps + 1, members, videos[0].numel())
        self.action_inputs = actions.new_zeros(steps + 1, members, actions[0].numel())
        self.video_inputs[0] = videos.reshape(members, -1)
        self.action_inputs[0] = actions.reshape(members, -1)
        self.flags: list[list[bool]] = [[] for _ in range(members)]
        self.index = 0
        self._all = list(range(members))
        self._uniform = True

    def step(self, members: Sequence[int], videos: torch.Tensor | None, actions: torch.Tensor | None,
             video_velocities: torch.Tensor, action_velocities: torch.Tensor,
             computed: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``members`` (every member still in the cohort, in any order) with their velocities
        ``(len(members), ...)``; returns their new video and action samples, in the same order.
        The current samples (``videos``, ``actions``) are not read: the replay keeps its own inputs."""
        index = self.index
        self.index += 1
        every = list(members) == self._all
        selector: slice | torch.Tensor = slice(None) if every else torch.tensor(list(members),
                                                                                 device=self.video_inputs.device)
        for member, flag in zip(members, computed):
            self.flags[member].append(flag)
        # Aligned members (every one stepping, the same computed flags so far) share one row.
        self._uniform = self._uniform and every and all(flag == computed[0] for flag in computed)
        self.video_inputs[index + 1, selector] = video_velocities.reshape(len(members), -1)
        self.action_inputs[index + 1, selector] = action_velocities.reshape(len(members), -1)
        video = self._product(self.video_replay, self.video_inputs, index, members)
        action = self._product(self.action_replay, self.action_inputs, index, members)
        if not every:
            video, action = video[selector], action[selector]
        return video.view(len(members), *self.video_shape), action.view(len(members), *self.action_shape)

    def _product(self, replay: SchedulerReplay, inputs: torch.Tensor, index: int,
                 members: Sequence[int]) -> torch.Tensor:
        """``(members_in_cohort, numel)``: every member's sample after step ``index``."""
        device = inputs.device
        known = inputs[: index + 2]
        if not self.solver_aware or self._uniform:
            row = replay.row(self.flags[members[0]], device)  # the same for every member
            return (row @ known.reshape(index + 2, -1)).view(self.members, -1)
        stepped = self.flags[members[0]]
        rows = torch.stack([replay.row(flags if len(flags) == index + 1 else stepped, device)
                            for flags in self.flags])  # a member that left takes any stepped member's row
        return torch.einsum("js,sjn->jn", rows, known)


class DirectStepper:
    """Steps one chunk's video and actions with two diffusers schedulers of its own, every step (the
    :class:`ReplayCohort` interface, for a cohort of one)."""

    def __init__(self, video_scheduler: Any, action_scheduler: Any, solver_aware: bool) -> None:
        self.video_scheduler, self.action_scheduler = video_scheduler, action_scheduler
        self.video_stepper = SkipAwareStepper(video_scheduler) if solver_aware else None
        self.action_stepper = SkipAwareStepper(action_scheduler) if solver_aware else None
        self.index = 0

    def step(self, members: Sequence[int], videos: torch.Tensor | None, actions: torch.Tensor | None,
             video_velocities: torch.Tensor, action_velocities: torch.Tensor,
             computed: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        if videos is None or actions is None or len(members) != 1:
            raise ValueError("a DirectStepper steps one chunk and needs its current samples")
        video, action, run = videos[0], actions[0], computed[0]
        t_video = self.video_scheduler.timesteps[self.index]
        t_action = self.action_scheduler.timesteps[self.index]
        self.index += 1
        if self.video_stepper is not None:
            video = self.video_stepper.step(video_velocities[0], t_video, video, computed=run).prev_sample
            action = self.action_stepper.step(action_velocities[0], t_action, action, computed=run).prev_sample
        else:
            video = self.video_scheduler.step(video_velocities[0], t_video, video).prev_sample
            action = self.action_scheduler.step(action_velocities[0], t_action, action).prev_sample
        return video[None], action[None]
