"""UNet down / mid / up blocks (diffusers CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
CrossAttnUpBlock2D, UpBlock2D). A block is "cross-attention" when it is given ``AttentionSettings``.

Every block takes the reference plumbing of :mod:`pmf_jax.models.transformer` and returns what its transformers
wrote as a dict keyed by child name (``{"attentions_j": {"transformer_blocks_k": [B, HW, C]}}``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pmf_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from pmf_jax.models.transformer import Transformer2DModel


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """The spatial-transformer settings of one block. heads: attention heads (head dim = channels // heads)."""

    heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    backend: str = "auto"


def _child(reference, name):
    return None if reference is None else reference.get(name)


def _resnet(remat: bool):
    # Rematerialised in the backward pass when training with gradient checkpointing (memory for compute).
    return nn.remat(ResnetBlock2D) if remat else ResnetBlock2D


def _transformer(attn: AttentionSettings, channels: int, groups: int, dtype, name: str,
                 remat: bool = False) -> Transformer2DModel:
    cls = nn.remat(Transformer2DModel, static_argnums=(5,)) if remat else Transformer2DModel  # write is static
    return cls(heads=attn.heads, dim_head=channels // attn.heads, num_layers=attn.num_layers,
                              groups=groups, use_linear_projection=attn.use_linear_projection,
                              only_cross_attention=attn.only_cross_attention, upcast_attention=attn.upcast_attention,
                              attention_backend=attn.backend, dtype=dtype, name=name)


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
    def __call__(self, h, temb, context, reference=None, ref_mix=None, write: bool = False):
        skips, written = (), {}
        for i in range(self.num_layers):
            h = _resnet(self.remat)(self.out_channels, self.groups, eps=self.eps, dtype=self.dtype,
                                    name=f"resnets_{i}")(h, temb)
            if self.attn is not None:
                name = f"attentions_{i}"
                h, w = _transformer(self.attn, self.out_channels, self.groups, self.dtype, name, self.remat)(
                    h, context, _child(reference, name), ref_mix, write)
                if write:
                    written[name] = w
            skips += (h,)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(h)
            skips += (h,)
        return h, skips, written


class MidBlock(nn.Module):
    """resnets_0, then (attentions_i, resnets_{i+1}) x num_layers. h: [B, H, W, C] -> same."""

    attn: AttentionSettings
    num_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, temb, context, reference=None, ref_mix=None, write: bool = False):
        channels = h.shape[-1]
        resnet = lambda i: _resnet(self.remat)(channels, self.groups, eps=self.eps,  # noqa: E731
                                         output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                                         name=f"resnets_{i}")
        h = resnet(0)(h, temb)
        written = {}
        for i in range(self.num_layers):
            name = f"attentions_{i}"
            h, w = _transformer(self.attn, channels, self.groups, self.dtype, name, self.remat)(
                h, context, _child(reference, name), ref_mix, write)
            if write:
                written[name] = w
            h = resnet(i + 1)(h, temb)
        return h, written


class UpBlock(nn.Module):
    """(concat skip, resnet (+ transformer)) x num_layers, then an optional 2x upsampler.

    skips: the matching down-path outputs, consumed from the end. ``upsample_size``: output (H, W) of the
    upsampler when the input size is not a multiple of the UNet's total downsampling.
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
    def __call__(self, h, skips: Sequence, temb, context, reference=None, ref_mix=None, write: bool = False,
                 upsample_size: Optional[Tuple[int, int]] = None, stop_after_attention: bool = False):
        skips = list(skips)
        written = {}
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _resnet(self.remat)(self.out_channels, self.groups, eps=self.eps, dtype=self.dtype,
                                    name=f"resnets_{i}")(h, temb)
            if self.attn is not None:
                name = f"attentions_{i}"
                h, w = _transformer(self.attn, self.out_channels, self.groups, self.dtype, name, self.remat)(
                    h, context, _child(reference, name), ref_mix, write)
                if write:
                    written[name] = w
        if self.add_upsample and not stop_after_attention:
            h = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(h, upsample_size)
        return h, written
