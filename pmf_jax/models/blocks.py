"""Convolutional building blocks shared by the UNet, ControlNet and VAE (diffusers names, NHWC tensors)."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


def conv3x3(features: int, dtype, name: str, stride: int = 1, kernel_init=None) -> nn.Conv:
    """3x3 convolution with torch's ``padding=1``."""
    extra = {} if kernel_init is None else {"kernel_init": kernel_init, "bias_init": nn.initializers.zeros}
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=dtype, name=name, **extra)


def conv1x1(features: int, dtype, name: str, zero_init: bool = False) -> nn.Conv:
    extra = {"kernel_init": nn.initializers.zeros, "bias_init": nn.initializers.zeros} if zero_init else {}
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, name=name, **extra)


def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    # Flax computes the statistics in fp32 even for bf16 inputs.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (time_embedding_norm="default", SiLU).

    x: [B, H, W, Cin], temb: [B, Ct] or None  ->  [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-5
    use_temb: bool = True
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        if self.use_temb:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups_out or self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=1`` (UNet) pads both sides; ``padding=0`` (VAE encoder) pads right/bottom by 1."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad = "VALID"
        else:
            pad = ((self.padding, self.padding), (self.padding, self.padding))
        return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name="conv")(x)


def upsample_nearest(x, size: Optional[Sequence[int]] = None):
    """torch ``F.interpolate(mode="nearest")``: x [B, H, W, C] -> [B, 2H, 2W, C] or [B, *size, C]."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    out_h, out_w = size
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to ``size``), then a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: Optional[Sequence[int]] = None):
        return conv3x3(self.out_channels, self.dtype, "conv")(upsample_nearest(x, size))
