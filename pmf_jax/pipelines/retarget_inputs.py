"""What one :class:`~pmf_jax.pipelines.RetargetPipeline` call hands its programs: the static settings
(:class:`RetargetStatic`, one compiled program set each), the batch (:class:`RetargetBatch`, a pytree of [N, ...]
arrays) and the traced scalars (:func:`retarget_scalars`), with their abstract versions for ahead-of-time compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.pipelines.base import SamplingStatic
from pmf_jax.reference import ReferenceConfig


# The guidance layouts: each sample's rows in order (u: negative prompt, c: prompt + reference, a: prompt without
# reference), with the guided prediction (pmf_jax.pipelines.retarget's docstring).
#   text             [u, c]     u reads the reference as style_fidelity says    ε = u + g·(c − u)
#   text_appearance  [u, c, a]  u and a read no reference                         ε = u + g·(a − u) + g_a·(c − a)
# A model without a text encoder gives every row the same context, so rows that differ by the text alone are equal
# and computing them changes nothing: its layouts drop them.
#   appearance       [a, c]     text_appearance less u (= a)                      ε = a + g_a·(c − a)
#   none             [c]        text less u, when u reads the reference as c does (style_fidelity 0, or no
#                               reference at all)                                 ε = c
LAYOUTS = {"text": ("u", "c"), "text_appearance": ("u", "c", "a"), "appearance": ("a", "c"), "none": ("c",)}


def guidance_layout(appearance_guidance: bool, text_encoder: bool, reference: Optional[ReferenceConfig],
                    image_prompt: bool = False) -> str:
    """The layout (a key of :data:`LAYOUTS`) of a call: with or without appearance guidance, for a model with or
    without a text encoder, reading ``reference`` (None: no bank), with or without an IP-Adapter ``image_prompt``
    (row c reads the source's image tokens, rows u and a the zero image's: u then differs from c even without
    text)."""
    if appearance_guidance:
        return "text_appearance" if text_encoder else "appearance"
    if not text_encoder and not image_prompt and (reference is None or reference.style_fidelity == 0):
        return "none"
    return "text"


@dataclasses.dataclass(frozen=True)
class RetargetStatic(SamplingStatic):
    """:class:`~pmf_jax.pipelines.base.SamplingStatic` plus the guidance layout, the reference settings and whether
    the UNet reads an IP-Adapter image prompt."""

    guidance: str                            # the guidance layout, a key of LAYOUTS
    reference: Optional[ReferenceConfig]     # None: no reference bank (modes controlnet_only, ip_adapter)
    image_prompt: bool = False               # IP-Adapter: the source's image tokens in every attn2 (row c)

    @property
    def rows(self) -> int:
        """G guidance rows per sample (1 to 3)."""
        return len(LAYOUTS[self.guidance])


@flax.struct.dataclass
class RetargetBatch:
    """The N samples of one call (host or device arrays, or ``jax.ShapeDtypeStruct``s).

    seeds: [N] uint32 and rows: [N] int32, each image's noise key (:func:`pmf_jax.schedulers.noise.row_keys`);
    source: [N, H, W, 3] float32 in [0, 1], the person; pose: [N, H, W, 3] float32 in [0, 1], the skeleton;
    context: [N, G, T, D] float32, the text context of each guidance row; ref_context: [N, T, D] float32, the
    reference UNet's context (the prompt); latents: None, or [N, h, w, C] float32 x_T instead of seeded noise;
    clip_pixels: None, or (IP-Adapter) [N, s, s, 3] float32, the source preprocessed for the image encoder.
    """

    seeds: Any
    rows: Any
    source: Any
    pose: Any
    context: Any
    ref_context: Any
    latents: Any = None
    clip_pixels: Any = None

    @classmethod
    def abstract(cls, static: RetargetStatic, num_images: int, image_size: Tuple[int, int],
                 context_shape: Tuple[int, int], latents: bool = False,
                 clip_size: Optional[Tuple[int, int]] = None) -> "RetargetBatch":
        """The batch of ``num_images`` samples of ``image_size`` (H, W) as ShapeDtypeStructs (``context_shape``:
        [T, D]); with ``latents`` the x_T input too; with ``static.image_prompt`` the image encoder's pixels of
        ``clip_size`` (h, w)."""
        n, (h, w), f32 = num_images, image_size, jnp.float32
        image = jax.ShapeDtypeStruct((n, h, w, 3), f32)
        return cls(seeds=jax.ShapeDtypeStruct((n,), jnp.uint32), rows=jax.ShapeDtypeStruct((n,), jnp.int32),
                   source=image, pose=image,
                   context=jax.ShapeDtypeStruct((n, static.rows) + tuple(context_shape), f32),
                   ref_context=jax.ShapeDtypeStruct((n,) + tuple(context_shape), f32),
                   latents=jax.ShapeDtypeStruct((n,) + tuple(static.latent_shape), f32) if latents else None,
                   clip_pixels=(jax.ShapeDtypeStruct((n,) + tuple(clip_size) + (3,), f32)
                                if static.image_prompt else None))


SCALARS = ("guidance", "appearance", "control")


def retarget_scalars(guidance_scale: float, appearance_guidance_scale: Optional[float],
                     controlnet_conditioning_scale: float, ip_scale=None) -> Dict[str, Any]:
    """The traced scalars of a call: {"guidance", "appearance" (0 when off: unused), "control"}, and "ip_scale"
    when given (IP-Adapter: the per-layer scales written out in full, :func:`pmf_jax.models.image_prompt.expand_scale`
    — one structure per UNet, so any scale reuses the programs)."""
    scalars = {"guidance": np.float32(guidance_scale), "appearance": np.float32(appearance_guidance_scale or 0.0),
               "control": np.float32(controlnet_conditioning_scale)}
    if ip_scale is not None:
        scalars["ip_scale"] = jax.tree_util.tree_map(np.float32, ip_scale)
    return scalars


def abstract_scalars(ip_scale=None) -> Dict[str, Any]:
    """The scalars as ShapeDtypeStructs (``ip_scale``: a tree of the structure :func:`retarget_scalars` takes)."""
    scalars = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in SCALARS}
    if ip_scale is not None:
        scalars["ip_scale"] = jax.tree_util.tree_map(lambda _: jax.ShapeDtypeStruct((), jnp.float32), ip_scale)
    return scalars


__all__ = ["LAYOUTS", "RetargetBatch", "RetargetStatic", "SCALARS", "abstract_scalars", "guidance_layout",
           "retarget_scalars"]
