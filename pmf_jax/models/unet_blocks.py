"""UNet down / mid / up blocks (diffusers CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
CrossAttnUpBlock2D, UpBlock2D). A block is "cross-attention" when it is given ``AttentionSettings``.

Every block takes an optional :class:`~pmf_jax.reference.ReferenceRead` and static ``write`` / ``write_adain`` flags
(the reference UNet's write path, :meth:`UNet2DConditionModel.write_reference`), and returns what it wrote as a dict
keyed by child name: ``{"attentions_j": {"transformer_blocks_k": [B, HW, C]}}`` when ``write`` (its transformers'
attention entries), ``{"adain_j": {"mean", "var": [B, 1, 1, C]}}`` when ``write_adain`` (reference AdaIN: the
statistics after layer j of a down/up block, ``"adain"`` after a whole middle block); empty otherwise. A block whose
read holds such statistics applies them at the same places (:func:`apply_adain`). Blocks also take an optional
``image_prompt`` (:class:`~pmf_jax.models.image_prompt.ImagePrompt`, IP-Adapter) and hand each ``attentions_j`` its
part (:func:`~pmf_jax.models.image_prompt.child_prompt`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pmf_jax.errors import PMFInputError
from pmf_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from pmf_jax.models.image_prompt import ImagePrompt, child_prompt
from pmf_jax.models.transformer import Transformer2DModel
from pmf_jax.parallel.rules import with_logical_constraint
from pmf_jax.reference import ADAIN, ReferenceRead, child_read
from pmf_jax.rows import expand_rows

ADAIN_EPS = 1e-6  # the variance floor of diffusers' reference AdaIN
_STATS_AXES = ("batch", None, None, None)  # AdaIN statistics stay with their batch shard, as the bank does


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """The spatial-transformer settings of one block. heads: attention heads (head dim = channels // heads)."""

    heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    backend: str = "auto"


def per_block(value, n: int, name: str) -> tuple:
    """Broadcasts an int/bool config value to one per block; checks list lengths."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise PMFInputError(f"config {name}={list(value)} needs {n} entries, one per down block")
        return tuple(value)
    return (value,) * n


def remat_module(cls, static: Sequence[str] = ()):
    """``nn.remat(cls)`` with the ``__call__`` arguments named in ``static`` marked static (looked up by name, so a
    signature change cannot silently make the wrong argument static). Static arguments must be passed
    positionally."""
    names = list(inspect.signature(cls.__call__).parameters)  # includes self, as remat's static_argnums count it
    missing = [s for s in static if s not in names]
    if missing:
        raise TypeError(f"{cls.__name__}.__call__ has no argument {missing}")
    return nn.remat(cls, static_argnums=tuple(names.index(s) for s in static))


def _resnet(remat: bool):
    # Rematerialised in the backward pass when training with gradient checkpointing (memory for compute).
    return remat_module(ResnetBlock2D) if remat else ResnetBlock2D


def _transformer(attn: AttentionSettings, channels: int, groups: int, dtype, name: str,
                 remat: bool = False) -> Transformer2DModel:
    cls = remat_module(Transformer2DModel, static=("write",)) if remat else Transformer2DModel
    return cls(heads=attn.heads, dim_head=channels // attn.heads, num_layers=attn.num_layers, groups=groups,
               use_linear_projection=attn.use_linear_projection, only_cross_attention=attn.only_cross_attention,
               upcast_attention=attn.upcast_attention, attention_backend=attn.backend, dtype=dtype, name=name)


def adain_statistics(h):
    """h [B, H, W, C] -> {"mean", "var"} [B, 1, 1, C] float32: per-channel mean and population variance over the
    spatial axes (diffusers' ``torch.var_mean(x, dim=(2, 3), correction=0)``)."""
    x = h.astype(jnp.float32)
    stats = {"mean": jnp.mean(x, axis=(1, 2), keepdims=True), "var": jnp.var(x, axis=(1, 2), keepdims=True)}
    return {k: with_logical_constraint(v, _STATS_AXES) for k, v in stats.items()}


def apply_adain(h, stats, ref_mix=None):
    """Reference AdaIN: h [B, H, W, C] renormalised to the reference's per-channel statistics,
    ``(h − mean(h)) / std(h) · std_ref + mean_ref`` with ``std = sqrt(max(var, 1e-6))``.

    stats: {"mean", "var"} [B', 1, 1, C], B' dividing B (rows matched sample-major, :func:`pmf_jax.rows.expand_rows`).
    ref_mix: [B] or None: ``out = ref_mix·h + (1 − ref_mix)·adain(h)`` (style_fidelity's unconditional rows, the
      no-reference rows, reference dropout).
    """
    ref = expand_rows(stats, h.shape[0])
    x = h.astype(jnp.float32)
    mean, var = jnp.mean(x, axis=(1, 2), keepdims=True), jnp.var(x, axis=(1, 2), keepdims=True)
    std, std_ref = (jnp.sqrt(jnp.maximum(v, ADAIN_EPS)) for v in (var, ref["var"]))
    out = (x - mean) / std * std_ref + ref["mean"]
    if ref_mix is not None:
        w = ref_mix.astype(jnp.float32)[:, None, None, None]
        out = w * x + (1 - w) * out
    return out.astype(h.dtype)


def _adain_point(key: str, h, reference: Optional[ReferenceRead], write_adain: bool, written: dict):
    """One place of reference AdaIN (``key``: "adain_j" after layer j, "adain" after a middle block): records h's
    statistics into ``written`` (write path), or applies the read's statistics there if it holds some."""
    if write_adain:
        written[key] = adain_statistics(h)
    if reference is not None and key in reference.bank:
        h = apply_adain(h, reference.bank[key], reference.ref_mix)
    return h


def _resnet_and_attention(block, i: int, h, temb, context, reference, write: bool, written: dict,
                          write_adain: bool = False, image_prompt: Optional[ImagePrompt] = None):
    """Layer i of a down or up block: ``resnets_i`` then, in a cross-attention block, ``attentions_i`` (whose bank
    entries go into ``written``), then the layer's AdaIN point ``adain_i``. Creates the layers in ``block``'s
    scope."""
    h = _resnet(block.remat)(block.out_channels, block.groups, eps=block.eps, dtype=block.dtype,
                             name=f"resnets_{i}")(h, temb)
    if block.attn is not None:
        name = f"attentions_{i}"
        h, w = _transformer(block.attn, block.out_channels, block.groups, block.dtype, name, block.remat)(
            h, context, child_read(reference, name), write, child_prompt(image_prompt, name))
        if write:
            written[name] = w
    return _adain_point(f"{ADAIN}_{i}", h, reference, write_adain, written)


class DownBlock(nn.Module):
    """resnet (+ transformer) x num_layers, then an optional stride-2 downsampler.

    h: [B, H, W, Cin] -> (h [B, H', W', out_channels], skips: one [B, ., ., out_channels] per layer and downsampler,
    written dict).
    """

    out_channels: int
    num_layers: int
    attn: Optional[AttentionSettings] = None
    add_downsample: bool = True
    downsample_padding: int = 1
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, temb, context, reference: Optional[ReferenceRead] = None, write: bool = False,
                 write_adain: bool = False, image_prompt: Optional[ImagePrompt] = None):
        skips, written = (), {}
        for i in range(self.num_layers):
            h = _resnet_and_attention(self, i, h, temb, context, reference, write, written, write_adain,
                                      image_prompt)
            skips += (h,)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(h)
            skips += (h,)
        return h, skips, written


class MidBlock(nn.Module):
    """resnets_0, then (attentions_i, resnets_{i+1}) x num_layers, then the AdaIN point "adain". h: [B, H, W, C] ->
    same."""

    attn: AttentionSettings
    num_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, temb, context, reference: Optional[ReferenceRead] = None, write: bool = False,
                 write_adain: bool = False, image_prompt: Optional[ImagePrompt] = None):
        channels = h.shape[-1]
        resnet = lambda i: _resnet(self.remat)(channels, self.groups, eps=self.eps,  # noqa: E731
                                               output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                                               name=f"resnets_{i}")
        h = resnet(0)(h, temb)
        written = {}
        for i in range(self.num_layers):
            name = f"attentions_{i}"
            h, w = _transformer(self.attn, channels, self.groups, self.dtype, name, self.remat)(
                h, context, child_read(reference, name), write, child_prompt(image_prompt, name))
            if write:
                written[name] = w
            h = resnet(i + 1)(h, temb)
        return _adain_point(ADAIN, h, reference, write_adain, written), written


class UpBlock(nn.Module):
    """(concat skip, resnet (+ transformer)) x num_layers, then an optional 2x upsampler.

    skips: the matching down-path outputs, consumed from the end. ``upsample_size``: output (H, W) of the
    upsampler when the input size is not a multiple of the UNet's total downsampling. ``stop_after_layers``: the
    write path's last block skips its upsampler (nothing reads it).
    """

    out_channels: int
    num_layers: int
    attn: Optional[AttentionSettings] = None
    add_upsample: bool = True
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, skips: Sequence, temb, context, reference: Optional[ReferenceRead] = None,
                 write: bool = False, upsample_size: Optional[Tuple[int, int]] = None,
                 stop_after_layers: bool = False, write_adain: bool = False,
                 image_prompt: Optional[ImagePrompt] = None):
        skips = list(skips)
        written = {}
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _resnet_and_attention(self, i, h, temb, context, reference, write, written, write_adain,
                                      image_prompt)
        if self.add_upsample and not stop_after_layers:
            h = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(h, upsample_size)
        return h, written
