"""A small causal world-action DiT in the DreamZero mould.

One forward denoises, jointly, the next ``future_frames`` video-latent frames and an
``action_horizon``-step action chunk, given the robot state, an instruction and the clean past frames.

Tokens (in this order): the noisy video-latent patches (a frame is its own latent, patchified
``patch_size`` x ``patch_size``), one token per noisy action step (an MLP over the action), one
robot-state token and one instruction token. Every token carries its own timestep: its adaLN
shift/scale/gate come from the token's timestep embedding (plus the instruction embedding), so the
video and the actions may sit at different noise levels. The modulation projection is shared by
all blocks, each block adding a learned offset (Wan's "adaLN-single"). The instruction (or a learned
null instruction, for classifier-free guidance) enters through that modulation, and also modulates
the patch embedding (FiLM), so that "this patch shows the named target" is readable from a patch
token directly.

Three choices make the model learn its task within a CPU budget of minutes (see the training notes in
docs/benchmarks.md; the first two remove plateaus measured in isolated probes, where the model
ignores the instruction for hundreds of steps):

- grey levels enter the patch embedding through fixed radial basis features, so a pixel's level (and
  so the target kind it belongs to) is linear in its features;
- the instruction FiLM starts random at unit scale rather than at zero;
- residual gates start at ``initial_gate`` (0.1) rather than adaLN-zero's 0, so attention weights get
  gradients from the first step.

Clean past frames reach the denoised tokens through a KV cache: :meth:`CausalWorldActionDiT.prefill`
runs a timestep-0 forward over one observed frame, whose tokens attend to the frames already cached
and to themselves, and appends their keys and values in every block. The denoising forward attends
to the cached keys/values plus its own tokens; it writes nothing to the cache. The instruction
modulates the cached tokens too (as DreamZero's text cross-attention reaches every token), so the
conditional and unconditional CFG branches each have their own cache rows: prefill the batch
``[cond; uncond]`` and denoise the same batch.

Convention (flow matching): ``x_sigma = (1 - sigma) * x0 + sigma * noise``, the network predicts the
velocity ``noise - x0``; timesteps are ``1000 * sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# Maps one call's attention keys and values (B, heads, N, head_dim) to those of the whole token sequence
# (sequence parallelism: see stepcache.models.dreamzero.parallel).
KVGather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DreamZeroMiniConfig:
    """Architecture and data-normalisation constants; saved as ``config.json`` next to the weights."""

    frame_size: int = 32
    patch_size: int = 8
    future_frames: int = 2  # predicted video-latent frames per chunk
    action_horizon: int = 8
    action_dim: int = 2
    state_dim: int = 2
    max_context_frames: int = 4  # KV-cache capacity, in frames
    num_instructions: int = 3  # plus one learned null instruction
    hidden_size: int = 128
    num_layers: int = 5
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pixel_channels: int = 9  # radial basis features per grey pixel (centres evenly over [-1, 1])
    timestep_frequencies: int = 64  # sinusoidal embedding size (half sine, half cosine)
    coordinate_octaves: int = 4  # Fourier octaves of the shared patch / state position features
    initial_gate: float = 0.1  # every residual branch's gate at initialisation
    modulation_init_std: float = 0.02  # initial spread of the adaLN shifts and scales (gates start at 0)
    action_scale: float = 0.06  # world action units per model unit (actions are divided by it)

    def __post_init__(self) -> None:
        positive = ("frame_size", "patch_size", "future_frames", "action_horizon", "action_dim", "state_dim",
                    "max_context_frames", "num_instructions", "hidden_size", "num_layers", "num_heads",
                    "timestep_frequencies", "coordinate_octaves", "pixel_channels")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DreamZeroMiniConfig.{name} must be a positive integer, got {value!r}")
        if self.frame_size % self.patch_size:
            raise ValueError(
                f"DreamZeroMiniConfig.frame_size ({self.frame_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DreamZeroMiniConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        if not self.mlp_ratio > 0 or not self.action_scale > 0:
            raise ValueError(
                f"DreamZeroMiniConfig.mlp_ratio and action_scale must be > 0, got {self.mlp_ratio}, "
                f"{self.action_scale}"
            )

    @property
    def patches_per_frame(self) -> int:
        return (self.frame_size // self.patch_size) ** 2

    @property
    def null_instruction(self) -> int:
        """Index of the learned null instruction (the unconditional CFG branch)."""
        return self.num_instructions

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DreamZeroMiniConfig:
        """Build from a dict (e.g. ``config.json``); unknown keys are an error."""
        if not isinstance(data, dict):
            raise ValueError(f"DreamZeroMiniConfig needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DreamZeroMiniConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def coordinate_features(xy: torch.Tensor, octaves: int) -> torch.Tensor:
    """Fourier features ``(..., 2 + 4 * octaves)`` of positions ``xy`` in [-1, 1] (model units).

    Patches and the robot state share them, so "where is the target relative to me" is a difference
    of two embeddings the network reads the same way.
    """
    scales = math.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32, device=xy.device)
    angles = xy.float()[..., None] * scales  # (..., 2, octaves)
    return torch.cat([xy.float(), torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], dim=-1)


def timestep_embedding(timesteps: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Sinusoidal embedding ``(..., frequencies)`` of timesteps in [0, 1000]."""
    half = frequencies // 2
    scale = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[..., None] * scale
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class KVCache:
    """Per-block keys and values of the clean context frames, written by prefill forwards.

    Each entry is ``(batch, heads, tokens, head_dim)``; ``num_frames`` counts the cached frames.
    ``observation`` holds the latest frame's patch embedding ``(batch, patches, hidden)``, the
    image conditioning of the denoised video (see :meth:`CausalWorldActionDiT.forward`).
    ``key_mask`` is None: every cached key is real (see :class:`StackedKVCache` for padded ones).

    Entries are replaced, never written in place, so :meth:`snapshot` is a cheap copy of references.
    """

    key_mask: torch.Tensor | None = None

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.num_frames = 0
        self.observation: torch.Tensor | None = None

    @classmethod
    def stack(cls, caches: Sequence[KVCache], rows: Sequence[int]) -> KVCache:
        """One cache over the rows of several (``rows[i]`` rows each), for one batched forward: the
        cache itself when there is one, else a :class:`StackedKVCache`."""
        if len(caches) == 1:
            return caches[0]
        return StackedKVCache(caches, rows)

    def context_slot_index(self) -> int | torch.Tensor:
        """The context slot the next prefilled frame takes (its position among the cached frames)."""
        return self.num_frames

    def commit_frame(self) -> None:
        """Count the frame a prefill has just appended in every layer."""
        self.num_frames += 1

    def snapshot(self) -> tuple:
        """The cache's contents, to :meth:`restore` after a failed chunk (references: entries are never
        modified in place)."""
        return list(self.keys), list(self.values), self.num_frames, self.observation

    def restore(self, snapshot: tuple) -> None:
        keys, values, self.num_frames, self.observation = snapshot
        self.keys, self.values = list(keys), list(values)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        tensors = [t for t in (*self.keys, *self.values, self.observation) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        self.keys, self.values, self.num_frames = [], [], 0
        self.observation = None

    @property
    def num_tokens(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else int(self.keys[0].shape[2])

    def layer(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if index < len(self.keys):
            return self.keys[index], self.values[index]
        return None, None

    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        while len(self.keys) <= index:
            self.keys.append(None)
            self.values.append(None)
        old_k, old_v = self.keys[index], self.values[index]
        self.keys[index] = keys if old_k is None else torch.cat([old_k, keys], dim=2)
        self.values[index] = values if old_v is None else torch.cat([old_v, values], dim=2)


class StackedKVCache(KVCache):
    """Several episodes' caches side by side, for one forward over all their rows.

    Each layer's keys and values are the members' concatenated along the batch, padded with zeros at
    the end to the longest member. ``key_mask`` ``(rows, tokens)`` marks the real keys; it is None when
    every member holds as many tokens (no padding: the attention takes the unmasked path). A padded
    key is masked out of the softmax, so a row attends to exactly what its own cache holds. A prefill
    through the stack writes each member's rows back into that member (the stack's own tensors stay
    as they were built, which is what the forward reads).

    Args:
        members: the caches, in row order.
        rows: the rows each member holds (needed for a member that holds no frame yet).
    """

    def __init__(self, members: Sequence[KVCache], rows: Sequence[int]) -> None:
        super().__init__()
        if len(members) != len(rows) or not members:
            raise ValueError(f"need one row count per cache, got {len(members)} caches and {len(rows)} counts")
        self.members = list(members)
        self.rows = [int(r) for r in rows]
        self.offsets = [0]
        for count in self.rows:
            self.offsets.append(self.offsets[-1] + count)
        for member, count in zip(self.members, self.rows):
            if member.keys and member.keys[0] is not None and member.keys[0].shape[0] != count:
                raise ValueError(f"a cache holds {member.keys[0].shape[0]} rows where {count} were expected")
        lengths = [member.num_tokens for member in self.members]
        longest = max(lengths)
        layers = max(len(member.keys) for member in self.members)
        template = next((member for member in self.members if member.num_tokens), None)
        for index in range(layers if template is not None else 0):
            keys, values = [], []
            for member, count, length in zip(self.members, self.rows, lengths):
                k, v = member.layer(index)
                if k is None:  # a member without frames yet: no keys, all padding
                    heads, _, head_dim = template.keys[index].shape[1:]
                    k = v = template.keys[index].new_zeros(count, heads, 0, head_dim)
                if length < longest:
                    pad = (0, 0, 0, longest - length)  # zeros after the real keys, along the tokens
                    k, v = F.pad(k, pad), F.pad(v, pad)
                keys.append(k)
                values.append(v)
            self.keys.append(torch.cat(keys))
            self.values.append(torch.cat(values))
        if len(set(lengths)) > 1:
            device = template.keys[0].device
            positions = torch.arange(longest, device=device)
            self.key_mask = torch.cat([
                (positions < length).expand(count, longest) for count, length in zip(self.rows, lengths)
            ])
        observations = [member.observation for member in self.members]
        if all(o is not None for o in observations):
            self._observation = torch.cat(observations)
        self.num_frames = max(member.num_frames for member in self.members)

    @property
    def observation(self) -> torch.Tensor | None:  # type: ignore[override]
        return getattr(self, "_observation", None)

    @observation.setter
    def observation(self, value: torch.Tensor | None) -> None:
        self._observation = value
        if value is not None:  # a prefill's new observation: each member gets its rows
            for member, start, end in zip(self.members, self.offsets, self.offsets[1:]):
                member.observation = value[start:end]

    def context_slot_index(self) -> torch.Tensor:
        """Per row: the slot of the next frame in that row's own cache."""
        return torch.cat([torch.full((count,), member.num_frames, dtype=torch.long)
                          for member, count in zip(self.members, self.rows)])

    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for member, start, end in zip(self.members, self.offsets, self.offsets[1:]):
            member.append(index, keys[start:end], values[start:end])

    def commit_frame(self) -> None:
        for member in self.members:
            member.commit_frame()
        self.num_frames = max(member.num_frames for member in self.members)

    def snapshot(self) -> tuple:
        raise TypeError("a StackedKVCache is a view for one forward: snapshot its members instead")

    def reset(self) -> None:
        raise TypeError("a StackedKVCache is a view for one forward: reset its members instead")


class DiTBlock(nn.Module):
    """Pre-norm transformer block with per-token adaLN (shift, scale, gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, initial_gate: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        # This block's offset on the shared modulation (adaLN-single).
        # Gates start small but open (not adaLN-zero's 0): with closed gates no gradient reaches the
        # attention and MLP weights until the gates themselves have grown.
        offset = torch.zeros(6, hidden_size)
        offset[[2, 5]] = initial_gate
        self.modulation_offset = nn.Parameter(offset)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        context: tuple[torch.Tensor | None, torch.Tensor | None],
        *,
        gather_kv: KVGather | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(B, N, D)``, ``modulation`` ``(B, N, 6, D)``; ``context`` cached (keys, values) or
        Nones. Returns the new ``x`` and this block's keys and values for ``x`` (with ``gather_kv``,
        for the whole sequence: ``x`` is then one rank's share of the tokens, and attends to all).

        ``key_mask`` ``(B, cached tokens)``, True for a real cached key: padded ones are left out of
        the attention (the tokens' own keys always count). None: every cached key is real, and the
        attention is exactly the unmasked one."""
        batch, tokens, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (modulation + self.modulation_offset).unbind(2)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if gather_kv is not None:
            k, v = gather_kv(k, v)
        cached_k, cached_v = context
        if cached_k is not None:
            # A cache prefilled for fewer rows than the query batch (e.g. one sample shared by
            # several noise draws) is tiled along the batch.
            repeats = batch // cached_k.shape[0]
            if repeats * cached_k.shape[0] != batch:
                raise ValueError(f"batch {batch} is not a multiple of the cached batch {cached_k.shape[0]}")
            if repeats > 1:
                cached_k, cached_v = cached_k.repeat(repeats, 1, 1, 1), cached_v.repeat(repeats, 1, 1, 1)
            keys = torch.cat([cached_k, k], dim=2)
            values = torch.cat([cached_v, v], dim=2)
        else:
            keys, values = k, v
        if key_mask is not None and cached_k is not None:
            if key_mask.shape != (batch, cached_k.shape[2]):
                raise ValueError(
                    f"key_mask must have shape {(batch, cached_k.shape[2])} (rows, cached tokens), "
                    f"got {tuple(key_mask.shape)}"
                )
            mask = torch.cat([key_mask, key_mask.new_ones(batch, k.shape[2])], dim=1)[:, None, None, :]
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            attended = F.scaled_dot_product_attention(q, keys, values)
        x = x + gate1 * self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x, k, v


@dataclass
class DiTOutput:
    """Velocities predicted by one denoising forward."""

    video: torch.Tensor  # (B, F, S, S)
    action: torch.Tensor  # (B, H, A)
    goal_position: torch.Tensor | None = None  # (B, 2) auxiliary read-out of the state token (training aid)


class CausalWorldActionDiT(nn.Module):
    """The DreamZero-mini DiT. See the module docstring for the token layout and the cache.

    Example:
        >>> model = CausalWorldActionDiT(DreamZeroMiniConfig(hidden_size=32, num_layers=1))
        >>> cache = KVCache()
        >>> instruction = torch.tensor([0, 3])  # [cond; uncond]: instruction 0 and the null instruction
        >>> model.prefill(torch.zeros(2, 32, 32), instruction, cache)
        >>> out = model(torch.randn(2, 2, 32, 32), torch.randn(2, 8, 2), torch.zeros(2, 2),
        ...             torch.full((2,), 999.0), torch.full((2,), 999.0), instruction, cache)
        >>> out.video.shape, out.action.shape
        (torch.Size([2, 2, 32, 32]), torch.Size([2, 8, 2]))
    """

    def __init__(self, config: DreamZeroMiniConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DreamZeroMiniConfig()
        d = config.hidden_size
        patch_dim = config.patch_size**2
        # Non-linear patch encoder: which target kind a patch shows is a non-linear function of its pixels.
        # Its hidden features are modulated by the instruction (FiLM), so "this patch shows the named
        # target" is linear in a patch token from the start, before any attention.
        # Grey levels in [-1, 1] through fixed radial basis functions (plus the raw value): which level a
        # pixel holds, and so which target kind it belongs to, is then linear in its features. A learned
        # per-pixel encoder gets there too, but only after a long plateau.
        self.register_buffer("level_centres", torch.linspace(-1.0, 1.0, config.pixel_channels), persistent=False)
        self.patch_hidden = nn.Sequential(
            nn.Linear(patch_dim * (config.pixel_channels + 1), d), nn.GELU(approximate="tanh")
        )
        self.patch_film = nn.Embedding(config.num_instructions + 1, 2 * d)
        self.patch_out = nn.Linear(d, d)
        # Image conditioning, as Wan's image-to-video models concatenate the conditioning frame's latent
        # to the noisy latents channel-wise: each denoised video patch also sees the co-located patch of
        # the latest observed frame (concatenation followed by a linear map = a sum of linear maps).
        self.observation_embed = nn.Linear(patch_dim * (config.pixel_channels + 1), d)
        self.patch_position = nn.Parameter(torch.randn(config.patches_per_frame, d) * 0.02)
        self.coordinate_embed = nn.Linear(2 + 4 * config.coordinate_octaves, d)
        # Patch centres in the state's units (x = column, y = row, both mapped to [-1, 1]).
        grid = config.frame_size // config.patch_size
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
        rows, cols = torch.meshgrid(centres, centres, indexing="ij")
        patch_xy = torch.stack([cols.flatten(), rows.flatten()], dim=-1)
        self.register_buffer("patch_coordinates", coordinate_features(patch_xy, config.coordinate_octaves),
                             persistent=False)
        self.context_slot = nn.Parameter(torch.randn(config.max_context_frames, d) * 0.02)
        self.future_slot = nn.Parameter(torch.randn(config.future_frames, d) * 0.02)
        self.action_embed = nn.Sequential(nn.Linear(config.action_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.action_position = nn.Parameter(torch.randn(config.action_horizon, d) * 0.02)
        self.state_embed = nn.Sequential(nn.Linear(config.state_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_embed = nn.Sequential(nn.Linear(config.timestep_frequencies, d), nn.SiLU(), nn.Linear(d, d))
        self.instruction_embed = nn.Embedding(config.num_instructions + 1, d)  # last row: null instruction
        # The instruction is also a token of the denoised block: its query depends on the instruction
        # alone, so it can look the named target up in the context and hand it to the other tokens.
        self.instruction_token = nn.Embedding(config.num_instructions + 1, d)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio, config.initial_gate) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.video_head = nn.Linear(d, patch_dim)
        self.action_head = nn.Linear(d, config.action_dim)
        # Auxiliary read-outs used only by the training loss (see training.py): which context patches
        # show the instructed target, and where that target is, read from the state token.
        self.goal_patch_head = nn.Linear(d, 1)
        self.goal_position_head = nn.Linear(d, 2)
        # adaLN-zero: every residual branch (its gate) and both heads start at zero.
        # A zero start would leave the instruction without any effect on the patches, and a long plateau
        # before the model picks it up; a unit-scale random start lets it steer them from step one.
        nn.init.normal_(self.patch_film.weight, 0.0, 1.0)
        for layer in (self.modulation[-1], self.final_modulation[-1], self.video_head, self.action_head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # ...but the shifts and scales start small and random, so the instruction and the timestep
        # shape the attention queries and keys from the first step (a zero start leaves a long plateau
        # before the model begins to use the instruction).
        with torch.no_grad():
            rows = self.modulation[-1].weight.view(6, d, d)
            for chunk in (0, 1, 3, 4):  # shift1, scale1, shift2, scale2
                rows[chunk].normal_(0.0, config.modulation_init_std)

    # -- tokens ---------------------------------------------------------------------------------

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, F, S, S)`` -> ``(B, F * P, patch_size**2)`` (row-major patches)."""
        batch, num_frames, size, _ = frames.shape
        p = self.config.patch_size
        grid = size // p
        x = frames.reshape(batch, num_frames, grid, p, grid, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(batch, num_frames * grid * grid, p * p)

    def unpatchify(self, patches: torch.Tensor, num_frames: int) -> torch.Tensor:
        batch = patches.shape[0]
        p = self.config.patch_size
        grid = self.config.frame_size // p
        x = patches.reshape(batch, num_frames, grid, grid, p, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(batch, num_frames, grid * p, grid * p)

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(...)`` grey values in [-1, 1] -> ``(..., pixel_channels + 1)``: the value and its RBF features."""
        width = 2.0 / (self.config.pixel_channels - 1)
        bumps = torch.exp(-(((pixels[..., None] - self.level_centres) / (0.5 * width)) ** 2))
        return torch.cat([pixels[..., None], bumps], dim=-1)

    def patch_embed(self, patches: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """Embed patches ``(B, N, p*p)`` under instructions ``(B,)``."""
        scale, shift = self.patch_film(instruction)[:, None, :].chunk(2, dim=-1)
        pixels = self.pixel_features(patches).flatten(-2)
        return self.patch_out(self.patch_hidden(pixels) * (1 + scale) + shift)

    def _patch_positions(self) -> torch.Tensor:
        return self.patch_position + self.coordinate_embed(self.patch_coordinates)

    def _condition(self, timesteps: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """Per-group conditioning ``(B, G, D)`` from timesteps ``(B, G)`` and instructions ``(B,)``."""
        cond = self.time_embed(timestep_embedding(timesteps, self.config.timestep_frequencies))
        return cond + self.instruction_embed(instruction)[:, None, :]

    @property
    def grounding_layer(self) -> int:
        """Index of the block whose output the goal-patch read-out sees (early, so later blocks use it)."""
        return min(1, self.config.num_layers - 1)

    def _run_blocks(
        self, x: torch.Tensor, cond: torch.Tensor, cache: KVCache | None, write_cache: bool,
        gather_kv: KVGather | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the final tokens and the tokens after block ``grounding_layer``."""
        modulation = self.modulation(cond).unflatten(-1, (6, self.config.hidden_size))
        grounding = x
        key_mask = cache.key_mask if cache is not None else None  # padded rows of a StackedKVCache
        for index, block in enumerate(self.blocks):
            context = cache.layer(index) if cache is not None else (None, None)
            x, k, v = block(x, modulation, context, gather_kv=gather_kv, key_mask=key_mask)
            if write_cache:
                cache.append(index, k, v)
            if index == self.grounding_layer:
                grounding = x
        return x, grounding

    # -- forwards -------------------------------------------------------------------------------

    def prefill(
        self, frames: torch.Tensor, instruction: torch.Tensor, cache: KVCache, *, return_goal_logits: bool = False,
        patch_tokens: slice | None = None, gather_kv: KVGather | None = None,
    ) -> torch.Tensor | None:
        """Timestep-0 forward over clean observed frames ``(B, S, S)`` (latent units) under
        ``instruction`` ``(B,)``; appends their keys/values to ``cache``. Their tokens attend to the
        cached frames and to themselves. With ``return_goal_logits``, returns the auxiliary per-patch
        logits ``(B, P)`` that the patch shows the instructed target (training only).

        Sequence parallelism: ``patch_tokens`` selects the frame's patch tokens this call computes, and
        ``gather_kv`` completes their keys/values with the other ranks' (the whole frame's are cached).
        """
        if frames.dim() != 3 or frames.shape[-1] != self.config.frame_size:
            raise ValueError(
                f"prefill needs frames of shape (B, {self.config.frame_size}, {self.config.frame_size}), "
                f"got {tuple(frames.shape)}"
            )
        if cache.num_frames >= self.config.max_context_frames:
            raise ValueError(
                f"KV cache is full ({cache.num_frames} of max_context_frames="
                f"{self.config.max_context_frames} frames); reset it first"
            )
        patches = self.patchify(frames[:, None])
        cache.observation = self.observation_embed(self.pixel_features(patches).flatten(-2))
        positions = self._patch_positions()
        if patch_tokens is not None:
            patches, positions = patches[:, patch_tokens], positions[patch_tokens]
        tokens = self.patch_embed(patches, instruction) + positions
        index = cache.context_slot_index()  # an int, or one per row for a stack of caches
        if isinstance(index, torch.Tensor):
            index = index.to(self.context_slot.device)
        slot = self.context_slot[index]  # (D,) or (B, D)
        tokens = tokens + (slot[:, None, :] if slot.dim() == 2 else slot)
        zero = torch.zeros(frames.shape[0], 1, device=frames.device)
        cond = self._condition(zero, instruction)  # clean tokens: timestep 0
        _, grounding = self._run_blocks(tokens, cond.expand(-1, tokens.shape[1], -1), cache, write_cache=True,
                                        gather_kv=gather_kv)
        cache.commit_frame()
        return self.goal_patch_head(grounding).squeeze(-1) if return_goal_logits else None

    def forward(
        self,
        video: torch.Tensor,
        actions: torch.Tensor,
        state: torch.Tensor,
        video_timestep: torch.Tensor,
        action_timestep: torch.Tensor,
        instruction: torch.Tensor,
        cache: KVCache | None,
    ) -> DiTOutput:
        """Velocities for noisy ``video`` ``(B, F, S, S)`` and ``actions`` ``(B, H, A)`` (model units)
        at per-sample timesteps ``(B,)`` (0..1000), given ``state`` ``(B, state_dim)``,
        ``instruction`` indices ``(B,)`` (``config.null_instruction`` = unconditional) and the cache."""
        cfg = self.config
        num_frames = video.shape[1]
        if num_frames != cfg.future_frames or actions.shape[1:] != (cfg.action_horizon, cfg.action_dim):
            raise ValueError(
                f"expected video (B, {cfg.future_frames}, {cfg.frame_size}, {cfg.frame_size}) and actions "
                f"(B, {cfg.action_horizon}, {cfg.action_dim}), got {tuple(video.shape)}, {tuple(actions.shape)}"
            )
        video_patches, action_velocity, goal_position = self.forward_patches(
            self.patchify(video), actions, state, video_timestep, action_timestep, instruction, cache
        )
        video_velocity = self.unpatchify(video_patches, num_frames)
        return DiTOutput(video=video_velocity, action=action_velocity, goal_position=goal_position)

    def forward_patches(
        self,
        video_patches: torch.Tensor,
        actions: torch.Tensor,
        state: torch.Tensor,
        video_timestep: torch.Tensor,
        action_timestep: torch.Tensor,
        instruction: torch.Tensor,
        cache: KVCache | None,
        *,
        patch_tokens: slice | None = None,
        gather_kv: KVGather | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` on patchified video ``(B, N, patch_size**2)``: returns the video velocity per
        patch ``(B, N, patch_size**2)``, the action velocity and the goal read-out.

        Sequence parallelism: the patches are the ``patch_tokens`` of the video's
        ``future_frames * patches_per_frame`` tokens (None: all of them), and ``gather_kv`` completes
        their keys/values with the other ranks'; the action and state tokens are computed in full.
        """
        cfg = self.config
        num_frames = cfg.future_frames
        tokens = slice(None) if patch_tokens is None else patch_tokens
        video_tokens = self.patch_embed(video_patches, instruction)
        video_tokens = video_tokens + self._patch_positions().repeat(num_frames, 1)[tokens]
        video_tokens = video_tokens + self.future_slot.repeat_interleave(cfg.patches_per_frame, dim=0)[tokens]
        if cache is not None and cache.observation is not None:
            observation = cache.observation
            if observation.shape[0] != video_patches.shape[0]:  # a cache shared by several noise draws
                observation = observation.repeat(video_patches.shape[0] // observation.shape[0], 1, 1)
            video_tokens = video_tokens + observation.repeat(1, num_frames, 1)[:, tokens]
        action_tokens = self.action_embed(actions) + self.action_position
        state_features = coordinate_features(state, cfg.coordinate_octaves)
        state_token = (self.state_embed(state) + self.coordinate_embed(state_features))[:, None, :]
        instruction_token = self.instruction_token(instruction)[:, None, :]
        x = torch.cat([video_tokens, action_tokens, state_token, instruction_token], dim=1)

        # One conditioning vector per token group (video, action, clean), expanded per token.
        group_timesteps = torch.stack(
            [video_timestep.float(), action_timestep.float(), torch.zeros_like(video_timestep, dtype=torch.float32)],
            dim=1,
        )
        cond = self._condition(group_timesteps, instruction)
        n_video, n_action = video_tokens.shape[1], cfg.action_horizon
        group_of_token = torch.cat([
            torch.zeros(n_video, dtype=torch.long),
            torch.ones(n_action, dtype=torch.long),
            torch.full((2,), 2, dtype=torch.long),
        ]).to(x.device)
        cond = cond[:, group_of_token]
        x, _ = self._run_blocks(x, cond, cache, write_cache=False, gather_kv=gather_kv)

        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        x = self.final_norm(x) * (1 + scale) + shift
        video_velocity = self.video_head(x[:, :n_video])
        action_velocity = self.action_head(x[:, n_video : n_video + n_action])
        goal_position = self.goal_position_head(x[:, n_video + n_action])
        return video_velocity, action_velocity, goal_position
