"""The reference bank of the Appearance Control Module (ACM): what the reference UNet writes, what readers read.

A bank is a nested dict keyed like the UNet's modules:
``{"down_blocks_0": {"attentions_0": {"transformer_blocks_0": [B, HW, C]}}, "mid_block": {...}, "up_blocks_1": {...}}``
holding, for every transformer block, the hidden states that enter its self-attention (after ``norm1``).
It is a plain pytree: it goes through ``jit``, ``grad`` and sharding like any activation (its batch axis is the
batch axis of the latents it was written from).

Writing: ``bank = unet.apply(v, ref_latents, t, ctx, method=unet.write_reference)``.
Reading: ``unet.apply(v, x, t, ctx, reference=ReferenceRead.build(bank, cfg, batch))`` (ControlNet likewise). Block i
then attends with K, V = its own to_k/to_v of ``concat([norm1(x), bank[i]], axis=1)``.

``ref_mix`` ([B] in [0, 1]) blends each sample between reading (0) and plain self-attention (1): it expresses the
unconditional half of reference-only guidance (``style_fidelity``), the no-reference branch of appearance guidance
and reference dropout in training, all in one batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

from pmf_jax.constants import FUSION_BLOCKS, REFERENCE_TIMESTEPS
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
    controlnet_reads_reference: the pose ControlNet reads the bank too.
    """

    fusion_blocks: str = "full"
    attention_weight: float = 1.0
    style_fidelity: float = 0.0
    reference_timestep: str = "same"
    noise_reference: bool = False
    controlnet_reads_reference: bool = False

    def __post_init__(self):
        if self.fusion_blocks not in FUSION_BLOCKS:
            raise PMFInputError(f"reference fusion_blocks={self.fusion_blocks!r} must be one of {FUSION_BLOCKS}")
        if self.reference_timestep not in REFERENCE_TIMESTEPS:
            raise PMFInputError(
                f"reference_timestep={self.reference_timestep!r} must be one of {REFERENCE_TIMESTEPS}")
        if not 0.0 <= self.style_fidelity <= 1.0:
            raise PMFInputError(f"style_fidelity={self.style_fidelity} must lie in [0, 1]")


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


def select_bank(bank: dict, config: ReferenceConfig) -> dict:
    """Drops the entries of blocks that do not read under ``config`` (their blocks then attend plainly)."""
    flat = traverse_util.flatten_dict(bank)
    keep = reading_blocks(((path, value.shape[-1]) for path, value in flat.items()), config)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in keep})


@flax.struct.dataclass
class ReferenceRead:
    """What a reader (the denoising UNet, a ControlNet) gets of the bank: one frozen pytree passed through every
    block as one argument.

    bank: the selected entries, nested like the UNet's modules; at a transformer block the array [B', HW, C]. B' may
      be smaller than the reader's batch B (one source read by many frames, one sample's bank read by its guidance
      rows): it must divide B, and rows are matched sample-major (:func:`pmf_jax.rows.expand_rows`).
    ref_mix: [B] in [0, 1] or None: 0 reads the bank, 1 attends plainly (see the module docstring).
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
    """The bank's block paths in diffusers module order (for display and tests)."""
    return sorted(traverse_util.flatten_dict(bank), key=_module_order)
