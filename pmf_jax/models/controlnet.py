"""``ControlNetModel`` (the pose ControlNet, ``lllyasviel/control_v11p_sd15_openpose`` layout) in Flax linen, NHWC.

A copy of the UNet encoder and middle block, a small conditioning-image encoder, and zero-initialised 1x1 convs
that turn every skip connection and the middle output into residuals for the UNet.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmf_jax.errors import PMFInputError
from pmf_jax.models.blocks import conv1x1, conv3x3
from pmf_jax.models.configurable import PretrainedMixin
from pmf_jax.models.unet import UNET_DEFAULT_ONLY, UNet2DConditionModel
from pmf_jax.models.unet_encoder import EncoderFields, UNetEncoder, context_dim
from pmf_jax.reference import ReferenceRead


class ControlNetConditioningEmbedding(nn.Module):
    """cond [B, 8h, 8w, Cc] -> [B, h, w, out_channels]: conv_in, (conv, stride-2 conv) pairs with SiLU, zero conv_out."""

    out_channels: int
    block_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cond):
        h = nn.silu(conv3x3(self.block_out_channels[0], self.dtype, "conv_in")(cond))
        for i in range(len(self.block_out_channels) - 1):
            h = nn.silu(conv3x3(self.block_out_channels[i], self.dtype, f"blocks_{2 * i}")(h))
            h = nn.silu(conv3x3(self.block_out_channels[i + 1], self.dtype, f"blocks_{2 * i + 1}", stride=2)(h))
        return conv3x3(self.out_channels, self.dtype, "conv_out", kernel_init=nn.initializers.zeros)(h)


class ControlNetModel(EncoderFields, PretrainedMixin):
    """Call: ``apply({"params": p}, sample [B,h,w,Cin], timesteps, encoder_hidden_states [B,T,D],
    controlnet_cond [B,8h,8w,3] in [0,1], conditioning_scale=1.0, guess_mode=False, reference=None)`` →
    ``(down_residuals, mid_residual)``: one [B, ., ., C] residual per UNet skip connection (conv_in, every down-block
    layer and downsampler) and one for the middle block, already multiplied by ``conditioning_scale``.
    ``reference`` (a :class:`~pmf_jax.reference.ReferenceRead`) reads a reference bank's attention entries exactly as
    the UNet does (its AdaIN statistics are not applied, as in diffusers' ControlNet reference pipeline): the
    ControlNet's encoder is the UNet's (:class:`~pmf_jax.models.unet_encoder.UNetEncoder`), with the same names.
    """

    CONFIG_KEYS = ("in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
                   "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
                   "mid_block_scale_factor", "norm_num_groups", "norm_eps", "cross_attention_dim",
                   "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                   "use_linear_projection", "upcast_attention", "controlnet_conditioning_channel_order",
                   "conditioning_embedding_out_channels", "global_pool_conditions")
    DEFAULT_ONLY = {k: v for k, v in UNET_DEFAULT_ONLY.items() if k in (
        "encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type", "addition_embed_type",
        "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
        "act_fn", "mid_block_type")}
    IGNORED_KEYS = ("addition_embed_type_num_heads",)

    # the encoder's fields come from EncoderFields; the ControlNet's own:
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def dummy_inputs(self):
        size = 2 ** (len(self.down_block_types) - 1)
        f = 2 ** (len(self.conditioning_embedding_out_channels) - 1)  # 8 for the default (16, 32, 96, 256)
        return (jnp.zeros((1, size, size, self.in_channels), self.dtype), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, context_dim(self)), self.dtype),
                jnp.zeros((1, size * f, size * f, self.conditioning_channels), self.dtype))

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode: bool = False, reference: Optional[ReferenceRead] = None):
        if reference is not None and not isinstance(reference, ReferenceRead):
            raise TypeError(f"reference must be a pmf_jax.reference.ReferenceRead, got {type(reference).__name__}")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise PMFInputError(f"controlnet_conditioning_channel_order={self.controlnet_conditioning_channel_order!r}"
                                f" must be 'rgb' or 'bgr'")
        encoder = UNetEncoder.shared_by(self)
        context = encoder_hidden_states.astype(self.dtype)
        cond = controlnet_cond.astype(self.dtype)
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        cond = ControlNetConditioningEmbedding(self.block_out_channels[0], self.conditioning_embedding_out_channels,
                                               self.dtype, name="controlnet_cond_embedding")(cond)
        if reference is not None:
            reference = reference.without_adain()
        h, skips, _, _ = encoder(sample.astype(self.dtype), timesteps, context, reference, False, cond)
        down = [conv1x1(s.shape[-1], self.dtype, f"controlnet_down_blocks_{i}", zero_init=True)(s)
                for i, s in enumerate(skips)]
        mid = conv1x1(h.shape[-1], self.dtype, "controlnet_mid_block", zero_init=True)(h)
        scale = jnp.asarray(conditioning_scale, self.dtype)
        if guess_mode and not self.global_pool_conditions:
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32).astype(self.dtype) * scale
            down = [d * scales[i] for i, d in enumerate(down)]
            mid = mid * scales[-1]
        else:
            down = [d * scale for d in down]
            mid = mid * scale
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid

    def to_config(self):
        config = super().to_config()
        config["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        return config


# Parameters a ControlNet shares with the UNet it is initialised from.
SHARED_WITH_UNET = ("conv_in", "time_embedding", "down_blocks_", "mid_block")


def controlnet_from_unet(unet: UNet2DConditionModel, unet_params, rng, *, conditioning_channels: int = 3,
                         conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256),
                         controlnet_conditioning_channel_order: str = "rgb"):
    """diffusers ``ControlNetModel.from_unet``: the UNet's encoder + middle weights copied, the conditioning
    embedding freshly initialised (its conv_out zero) and every zero conv zero.

    Returns ``(controlnet_module, controlnet_params)``.
    """
    config = {k: getattr(unet, k) for k in ControlNetModel.CONFIG_KEYS if hasattr(unet, k)
              and k not in ("conditioning_channels", "controlnet_conditioning_channel_order",
                            "conditioning_embedding_out_channels", "global_pool_conditions")}
    module = ControlNetModel(**config, conditioning_channels=conditioning_channels,
                             conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                             controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                             dtype=unet.dtype, attention_backend=unet.attention_backend)
    params = dict(jax.jit(module.init_params)(rng))
    for name in list(params):
        if name.startswith(SHARED_WITH_UNET):
            params[name] = jax.tree_util.tree_map(jnp.array, unet_params[name])
    return module, params



# What a ControlNet's residuals must share with the UNet they are added to.
FITS_UNET = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def check_controlnet_fits(unet, controlnet, *, autoencoder_factor: Optional[int] = None, where: str = "ControlNet"):
    """A one-line :class:`PMFInputError` (naming ``where``, e.g. the folder) when ``controlnet``'s residuals cannot be
    added to ``unet`` (channels, blocks, layers, text dims differ) or when its conditioning embedding does not bring
    the pose image down to the latent size (``autoencoder_factor``: pixels per latent; None: not checked)."""
    differ = [f"{key} {getattr(controlnet, key)!r} vs the UNet's {getattr(unet, key)!r}" for key in FITS_UNET
              if _as_tuple(getattr(controlnet, key)) != _as_tuple(getattr(unet, key))]
    if len(controlnet.down_block_types) != len(unet.down_block_types):
        differ.append(f"{len(controlnet.down_block_types)} down blocks vs the UNet's {len(unet.down_block_types)}")
    downscale = 2 ** (len(controlnet.conditioning_embedding_out_channels) - 1)
    if autoencoder_factor is not None and downscale != autoencoder_factor:
        differ.append(f"its conditioning embedding downscales the pose image {downscale}x but the autoencoder's "
                      f"latents are {autoencoder_factor}x smaller")
    if differ:
        raise PMFInputError(f"{where} does not fit this UNet: {'; '.join(differ)}")


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
