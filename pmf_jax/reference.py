"""The reference bank of the Appearance Control Module (ACM): what the reference UNet writes, what readers read.

A bank is a nested dict keyed like the UNet's modules:
``{"down_blocks_0": {"attentions_0": {"transformer_blocks_0": [B, HW, C]}}, "mid_block": {...}, "up_blocks_1": {...}}``
holding, for every transformer block, the hidden states that enter its self-attention (after ``norm1``) — and, for
reference AdaIN (``ReferenceConfig.method`` "adain" or "attn+adain"), the per-channel statistics of the hidden states
after every layer of a block: ``{"down_blocks_0": {"adain_0": {"mean": [B, 1, 1, C], "var": [B, 1, 1, C]}},
"mid_block": {"adain": {...}}}`` (``adain_j`` after layer j — resnet, then transformer if any — of a down or up
block; ``adain`` after the whole middle block).
It is a plain pytree: it goes through ``jit``, ``grad`` and sharding like any activation (its batch axis is the
batch axis of the latents it was written from).

Writing: ``bank = unet.apply(v, ref_latents, t, ctx, config, method=unet.write_reference)`` (``config`` says which
entries: attention entries for "attn", AdaIN statistics for "adain").
Reading: ``unet.apply(v, x, t, ctx, reference=ReferenceRead.build(bank, cfg, batch))`` (ControlNet likewise, attention
entries only). Block i then attends with K, V = its own to_k/to_v of ``concat([norm1(x), bank[i]], axis=1)``; after a
layer with AdaIN statistics, ``x ← (x − mean(x)) / std(x) · std_ref + mean_ref`` (diffusers' reference AdaIN).

``ref_mix`` ([B] in [0, 1]) blends each sample between reading (0) and the plain model (1) — plain self-attention,
no AdaIN: it expresses the unconditional half of reference-only guidance (``style_fidelity``), the no-reference
branch of appearance guidance and reference dropout in training, all in one batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

from pmf_jax.constants import FUSION_BLOCKS, REFERENCE_METHODS, REFERENCE_TIMESTEPS
from pmf_jax.errors import PMFInputError



@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """How the reference bank is written and read.

    fusion_blocks: "full" (every transformer block reads) or "midup" (middle and decoder blocks only).
    attention_weight: diffusers reference-only "attention_auto_machine_weight": blocks sorted by channel width
      (widest first, diffusers module order breaking ties); block i of N reads only where weight > i/N.
    style_fidelity: for rows flagged unconditional (``uncond_mask``): out = sf·plain + (1 − sf)·read.
    reference_timestep: "same" (the reference UNet sees the noisy latent's t, MagicPose) or "zero" (t = 0, once per
      image, Animate Anyone).
    noise_reference: write from the reference latent noised to that timestep (else the clean latent).
    controlnet_reads_reference: the pose ControlNet reads the bank too (its attention entries: the ControlNet
      applies no AdaIN, as in diffusers' ControlNet reference pipeline).
    method: "attn" (reference attention), "adain" (reference AdaIN) or "attn+adain" (both; diffusers'
      reference_attn / reference_adain). The writer writes, and readers read, only the entries of the method.
    adain_weight: diffusers reference-only "gn_auto_machine_weight": a block applies AdaIN where
      adain_weight >= its weight (:func:`adain_block_weight`: mid block 0, down block i 2·(1 − i/n), up block i
      2·i/n for n down blocks), so 2 selects every block, 1 (the default) the middle block, the deeper half of the
      down blocks and the first half of the up blocks, 0 the middle block and the first up block.
    """

    fusion_blocks: str = "full"
    attention_weight: float = 1.0
    style_fidelity: float = 0.0
    reference_timestep: str = "same"
    noise_reference: bool = False
    controlnet_reads_reference: bool = False
    method: str = "attn"
    adain_weight: float = 1.0

    def __post_init__(self):
        if self.fusion_blocks not in FUSION_BLOCKS:
            raise PMFInputError(f"reference fusion_blocks={self.fusion_blocks!r} must be one of {FUSION_BLOCKS}")
        if self.reference_timestep not in REFERENCE_TIMESTEPS:
            raise PMFInputError(
                f"reference_timestep={self.reference_timestep!r} must be one of {REFERENCE_TIMESTEPS}")
        if not 0.0 <= self.style_fidelity <= 1.0:
            raise PMFInputError(f"style_fidelity={self.style_fidelity} must lie in [0, 1]")
        if self.method not in REFERENCE_METHODS:
            raise PMFInputError(f"reference method={self.method!r} must be one of {REFERENCE_METHODS}")
        if not 0.0 <= self.adain_weight <= 2.0:  # also refuses NaN
            raise PMFInputError(f"adain_weight={self.adain_weight} must lie in [0, 2] (2: AdaIN in every block)")

    @property
    def uses_attention(self) -> bool:
        """The method reads (and the writer writes) attention entries."""
        return self.method in ("attn", "attn+adain")

    @property
    def uses_adain(self) -> bool:
        """The method reads (and the writer writes) AdaIN statistics."""
        return self.method in ("adain", "attn+adain")


Path = Tuple[str, ...]
_GROUP_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # torch module registration order


def _module_order(path: Path):
    """Sort key reproducing diffusers' depth-first module order (down_blocks, up_blocks, mid_block)."""
    key = []
    for part in path:
        match = re.match(r"^(.*?)(?:_(\d+))?$", part)
        name, index = match.group(1), int(match.group(2) or 0)
        key.append((_GROUP_ORDER.get(name, 0), index))
    return key


def reading_blocks(entries: Iterable[Tuple[Path, int]], config: ReferenceConfig) -> set:
    """Which transformer blocks read, given (path, channel width) of every block that has a bank entry.

    Pure Python, shared by the JAX model and the PyTorch processor (pmf_jax.torch_compat).
    """
    entries = sorted(entries, key=lambda e: _module_order(e[0]))
    if config.fusion_blocks == "midup":
        entries = [e for e in entries if e[0][0] != "down_blocks" and not e[0][0].startswith("down_blocks_")]
    ranked = sorted(entries, key=lambda e: -e[1])  # stable: ties keep module order
    n = len(ranked)
    return {path for i, (path, _) in enumerate(ranked) if config.attention_weight > i / n}


ADAIN = "adain"  # the key of AdaIN statistics in a bank (``adain_j`` after layer j, ``adain`` after a mid block)


def is_adain_path(path: Path) -> bool:
    """Whether a (flattened) bank path is AdaIN statistics rather than a transformer block's attention entry."""
    return any(part == ADAIN or part.startswith(ADAIN + "_") for part in path)


def adain_block_weight(block: str, n: int) -> float:
    """diffusers' ``gn_weight`` of a block ("down_blocks_i", "mid_block", "up_blocks_i") of a UNet with n down (and n
    up) blocks, as the reference-only pipeline sets it (then doubled): mid 0, down i 2·(1 − i/n), up i 2·i/n."""
    if block == "mid_block":
        return 0.0
    kind, index = block.rsplit("_", 1)
    if kind == "down_blocks":
        weight = 1.0 - float(index) / float(n)
    elif kind == "up_blocks":
        weight = float(index) / float(n)
    else:
        raise ValueError(f"{block!r} is not a down, mid or up block")
    return weight * 2


def adain_blocks(config: ReferenceConfig, n: int) -> frozenset:
    """The blocks (names as in the bank) that apply AdaIN under ``config`` in a UNet with n down and n up blocks:
    ``config.adain_weight >= adain_block_weight(block, n)``. Pure Python (the JAX model, the PyTorch hooks)."""
    names = ["mid_block"] + [f"{kind}_{i}" for kind in ("down_blocks", "up_blocks") for i in range(n)]
    return frozenset(b for b in names if config.adain_weight >= adain_block_weight(b, n))


def adain_reading(paths: Iterable[Path], config: ReferenceConfig) -> set:
    """Which AdaIN entries (flattened bank paths, first part the block) are read under ``config``. The writer writes
    the statistics of every down block, so n is the bank's: 1 + the largest down/up block index."""
    paths = list(paths)
    indices = [int(p[0].rsplit("_", 1)[1]) for p in paths if p[0].startswith(("down_blocks_", "up_blocks_"))]
    keep = adain_blocks(config, 1 + max(indices, default=0))
    return {p for p in paths if p[0] in keep}


def select_bank(bank: dict, config: ReferenceConfig) -> dict:
    """Drops the entries that do not read under ``config``: attention entries of blocks that do not read
    (:func:`reading_blocks`; those blocks attend plainly), AdaIN statistics of blocks that do not apply AdaIN
    (:func:`adain_reading`), and every entry of a method ``config`` does not use."""
    flat = traverse_util.flatten_dict(bank)
    adain = [p for p in flat if is_adain_path(p)]
    keep = set()
    if config.uses_attention:
        keep |= reading_blocks(((path, value.shape[-1]) for path, value in flat.items() if not is_adain_path(path)),
                               config)
    if config.uses_adain:
        keep |= adain_reading(adain, config)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in keep})


@flax.struct.dataclass
class ReferenceRead:
    """What a reader (the denoising UNet, a ControlNet) gets of the bank: one frozen pytree passed through every
    block as one argument.

    bank: the selected entries, nested like the UNet's modules; at a transformer block the array [B', HW, C], at an
      AdaIN entry {"mean", "var"} [B', 1, 1, C]. B' may be smaller than the reader's batch B (one source read by many
      frames, one sample's bank read by its guidance rows): it must divide B, and rows are matched sample-major
      (:func:`pmf_jax.rows.expand_rows`).
    ref_mix: [B] in [0, 1] or None: 0 reads the bank, 1 is the plain model (see the module docstring).
    """

    bank: Any
    ref_mix: Optional[jax.Array] = None

    @classmethod
    def build(cls, bank: dict, config: Optional[ReferenceConfig] = None, batch: Optional[int] = None, ref_mix=None,
              uncond_mask=None) -> "ReferenceRead":
        """The read of ``bank`` under ``config`` for a batch of ``batch`` rows.

        config: selects the reading blocks (:func:`select_bank`) and blends ``style_fidelity`` into ``ref_mix`` for
          the rows that ``uncond_mask`` [B] (bool/0-1) flags unconditional; None: every entry is read, as is.
        ref_mix: [B] per-row blend (reference dropout, the no-reference guidance rows), or None.
        """
        if config is not None:
            bank = select_bank(bank, config)
            if uncond_mask is not None and config.style_fidelity > 0:
                style = config.style_fidelity * jnp.asarray(uncond_mask, jnp.float32)
                ref_mix = style if ref_mix is None else 1 - (1 - jnp.asarray(ref_mix, jnp.float32)) * (1 - style)
        if ref_mix is not None and batch is not None and jnp.shape(ref_mix) != (batch,):
            raise ValueError(f"ref_mix must have shape ({batch},), got {jnp.shape(ref_mix)}")
        return cls(bank, ref_mix)

    def without_adain(self) -> "ReferenceRead":
        """The same read less its AdaIN statistics (what a ControlNet reads)."""
        flat = traverse_util.flatten_dict(self.bank)
        if not any(is_adain_path(p) for p in flat):
            return self
        return ReferenceRead(traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_adain_path(p)}),
                             self.ref_mix)


def child_read(reference: Optional[ReferenceRead], name: str) -> Optional[ReferenceRead]:
    """The part of a read that module ``name`` (a child of the current reader module) sees, or None: that module
    and everything in it attends plainly."""
    if reference is None or name not in reference.bank:
        return None
    return ReferenceRead(reference.bank[name], reference.ref_mix)


def write_inputs(config: ReferenceConfig, ref_latents, timesteps, noise=None, add_noise=None):
    """The (latents, timesteps) the reference UNet writes from.

    Args:
      ref_latents: [B, h, w, C] clean latent of the source image.
      timesteps: [B] timesteps of the noisy latent being denoised.
      noise: [B, h, w, C] noise for ``noise_reference``; add_noise: ``(x0, noise, t) -> x_t`` (a scheduler's).
    """
    t = jnp.zeros_like(timesteps) if config.reference_timestep == "zero" else timesteps
    if config.noise_reference:
        if noise is None or add_noise is None:
            raise ValueError("noise_reference needs noise and add_noise")
        ref_latents = add_noise(ref_latents, noise, t)
    return ref_latents, t


def bank_paths(bank: dict) -> Sequence[Path]:
    """The bank's entry paths in diffusers module order (for display and tests)."""
    return sorted(traverse_util.flatten_dict(bank), key=_module_order)
