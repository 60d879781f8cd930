"""diffusers ``AutoencoderKL`` in Flax linen: pixels [B, H, W, 3] in [-1, 1] ⇄ latents [B, H/f, W/f, C].

``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD1.5). Parameter names follow the diffusers state dict
(``encoder/down_blocks_0/resnets_0/conv1/kernel``, ``encoder/mid_block/attentions_0/to_q/kernel``, ``quant_conv``),
so :mod:`pmf_jax.io` loads and saves diffusers folders, including ones with the legacy attention names
(query/key/value/proj_attn).

Pipelines scale the latents themselves: ``z = (mean - shift_factor) * scaling_factor`` before the UNet, the inverse
before :meth:`AutoencoderKL.decode`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pmf_jax.errors import PMFInputError
from pmf_jax.models.attention import Attention
from pmf_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv1x1, conv3x3, group_norm
from pmf_jax.models.configurable import PretrainedMixin

# diffusers builds every VAE norm (resnets, attention, conv_norm_out) with this epsilon.
VAE_NORM_EPS = 1e-6
# diffusers DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
_ACTIVATIONS = ("silu", "swish")


class VAEAttention(nn.Module):
    """diffusers ``Attention`` as the VAE mid block builds it: GroupNorm, one head over all channels, residual.

    x: [B, H, W, C] -> [B, H, W, C]. Parameters ``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out_0`` sit
    directly in this module's scope, as in the torch state dict.
    """

    channels: int
    groups: int
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.group_norm = group_norm(self.groups, VAE_NORM_EPS, self.dtype, "group_norm")
        self.attn = Attention(heads=1, dim_head=self.channels, qkv_bias=True, backend=self.backend, dtype=self.dtype)
        nn.share_scope(self, self.attn)  # to_q/... are siblings of group_norm in the checkpoint, not under attn/

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)  # [B, HW, C] tokens
        return x + self.attn(y).reshape(b, h, w, c)


class VAEMidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, (attention, resnet). x: [B, H, W, C]."""

    groups: int
    add_attention: bool = True
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        resnet = lambda i: ResnetBlock2D(c, groups=self.groups, eps=VAE_NORM_EPS, use_temb=False,  # noqa: E731
                                         dtype=self.dtype, name=f"resnets_{i}")
        x = resnet(0)(x)
        if self.add_attention:
            x = VAEAttention(c, self.groups, self.backend, self.dtype, name="attentions_0")(x)
        return resnet(1)(x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets, then a stride-2 conv padded right/bottom (VAE ``downsample_padding=0``)."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=VAE_NORM_EPS, use_temb=False,
                              dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets, then nearest 2x upsampling + conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=VAE_NORM_EPS, use_temb=False,
                              dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """x: [B, H, W, Cin] -> moments [B, H/f, W/f, out_channels] (the VAE asks for 2 * latent_channels)."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        chans = self.block_out_channels
        x = conv3x3(chans[0], self.dtype, "conv_in")(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(c, self.layers_per_block, self.groups, add_downsample=i < len(chans) - 1,
                                   dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = VAEMidBlock2D(self.groups, self.mid_block_add_attention, self.backend, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, VAE_NORM_EPS, self.dtype, "conv_norm_out")(x))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        chans = tuple(reversed(self.block_out_channels))
        x = conv3x3(chans[0], self.dtype, "conv_in")(z)
        x = VAEMidBlock2D(self.groups, self.mid_block_add_attention, self.backend, self.dtype, name="mid_block")(x)
        for i, c in enumerate(chans):
            # The decoder has one resnet more per block than the encoder (diffusers: layers_per_block + 1).
            x = UpDecoderBlock2D(c, self.layers_per_block + 1, self.groups, add_upsample=i < len(chans) - 1,
                                 dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, VAE_NORM_EPS, self.dtype, "conv_norm_out")(x))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(PretrainedMixin, nn.Module):
    """diffusers ``AutoencoderKL`` (fields = its config keys).

    Methods (``module.apply({"params": p}, x, method=module.encode)``):
      * :meth:`encode`: image [B, H, W, in_channels] in [-1, 1] -> ``(mean, logvar)``, each
        [B, H/f, W/f, latent_channels]; logvar clamped to [-30, 20] as diffusers does.
      * :meth:`decode`: latents [B, h, w, latent_channels] (unscaled) -> image [B, h*f, w*f, out_channels].
      * ``__call__``: encode -> mean -> decode (used for init).
    ``force_upcast``, ``sample_size`` and ``latents_mean``/``latents_std`` are stored for the pipelines and saved
    back; they do not change the computation (the compute dtype is ``dtype``).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | Tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    CONFIG_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                   "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                   "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv",
                   "use_post_quant_conv", "mid_block_add_attention")
    WEIGHTS_STEM = "diffusion_pytorch_model"

    def __post_init__(self):
        _check_config(self)
        super().__post_init__()

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      backend=self.attention_backend, dtype=self.dtype)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv1x1(2 * self.latent_channels, self.dtype, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = conv1x1(self.latent_channels, self.dtype, "post_quant_conv")

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x):
        """x: [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z: [B, h, w, latent_channels] (already divided by scaling_factor) -> [B, h*f, w*f, out_channels]."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)

    def dummy_inputs(self) -> tuple:
        size = self.downscale_factor
        return (jnp.zeros((1, size, size, self.in_channels), self.dtype),)


def _check_config(vae: AutoencoderKL) -> None:
    problems = []
    n = len(vae.block_out_channels)
    if vae.act_fn not in _ACTIVATIONS:
        problems.append(f"act_fn={vae.act_fn!r} (only {' / '.join(_ACTIVATIONS)} is implemented)")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(getattr(vae, key))
        if any(t != kind for t in types):
            problems.append(f"{key}={list(types)!r} (only {kind!r} blocks are implemented)")
        if len(types) != n:
            problems.append(f"{key} has {len(types)} entries but block_out_channels has {n}")
    bad_groups = [c for c in vae.block_out_channels if c % vae.norm_num_groups]
    if bad_groups:
        problems.append(f"block_out_channels {bad_groups} are not multiples of norm_num_groups={vae.norm_num_groups}")
    if problems:
        raise PMFInputError("AutoencoderKL config: " + "; ".join(problems))
