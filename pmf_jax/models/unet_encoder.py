"""The encoder half that the UNet and the ControlNet share: time embedding, ``conv_in``, the down blocks and the
middle block.

Both models compose :class:`UNetEncoder` in their own parameter scope (``nn.share_scope``), so its layers keep the
diffusers names at the top of each model's tree (``time_embedding``, ``conv_in``, ``down_blocks_i``, ``mid_block``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from pmf_jax.errors import PMFInputError
from pmf_jax.models.blocks import conv3x3
from pmf_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from pmf_jax.models.image_prompt import ImagePrompt, child_prompt
from pmf_jax.models.unet_blocks import AttentionSettings, DownBlock, MidBlock, per_block
from pmf_jax.reference import ReferenceRead, child_read

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")

IntOrSeq = Union[int, Tuple[int, ...]]

# The config keys of the encoder half (fields of UNetEncoder, and so of both models).
ENCODER_CONFIG_KEYS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                       "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                       "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
                       "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention")
# Module settings (not config keys) the encoder takes from its model (fields of EncoderFields too).
ENCODER_SETTINGS = ("dtype", "attention_backend", "gradient_checkpointing")


def attention_settings(model, block_types: Tuple[str, ...], reverse: bool = False) -> Tuple[
        Optional[AttentionSettings], ...]:
    """One ``AttentionSettings`` per block of ``block_types`` (None for blocks without attention), from a model's
    per-down-block config values (``reverse``: the up path, which lists them in reverse)."""
    n = len(block_types)
    order = slice(None, None, -1 if reverse else 1)
    heads = per_block(model.num_attention_heads or model.attention_head_dim, n, "attention_head_dim")[order]
    layers = per_block(model.transformer_layers_per_block, n, "transformer_layers_per_block")[order]
    only_cross = per_block(model.only_cross_attention, n, "only_cross_attention")[order]
    return tuple(
        AttentionSettings(heads[i], layers[i], model.use_linear_projection, bool(only_cross[i]), model.upcast_attention,
                          model.attention_backend)
        if block_types[i].startswith("CrossAttn") else None for i in range(n))


def context_dim(model) -> int:
    """The width of ``encoder_hidden_states`` (one ``cross_attention_dim`` for every block)."""
    return per_block(model.cross_attention_dim, len(model.down_block_types), "cross_attention_dim")[0]


class EncoderFields(nn.Module):
    """The encoder's settings (diffusers' config keys and defaults, plus dtype, attention backend and gradient
    checkpointing), declared once: the UNet, the ControlNet and :class:`UNetEncoder` take them from here."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrSeq = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrSeq = 1280
    transformer_layers_per_block: IntOrSeq = 1
    attention_head_dim: IntOrSeq = 8
    num_attention_heads: Optional[IntOrSeq] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False


class UNetEncoder(EncoderFields):
    """sample [B, H, W, in_channels], timesteps [B] or scalar, context [B, T, D] ->
    ``(h [B, H/2^(n-1), W/2^(n-1), C_last], skips, temb [B, 4·C0], written)``.

    ``skips``: conv_in's output and one [B, ., ., C] per down-block layer and downsampler (the UNet's skip
    connections, the ControlNet's residual taps). ``conv_in_residual`` ([B, H, W, C0], the ControlNet's conditioning
    embedding) is added to conv_in's output. ``written``: the bank entries of the down and mid blocks — attention
    entries when ``write``, AdaIN statistics (of every down block and the mid block) when ``write_adain``.
    ``image_prompt``: IP-Adapter's image tokens and scales (:mod:`pmf_jax.models.image_prompt`; the UNet's only).
    """

    @classmethod
    def shared_by(cls, model: nn.Module) -> "UNetEncoder":
        """The encoder of ``model`` (a UNet or a ControlNet: both have the encoder's fields), created inside the
        model's compact method and sharing its parameter scope. Checks the config (:meth:`check`)."""
        encoder = cls(**{k: getattr(model, k) for k in ENCODER_CONFIG_KEYS + ENCODER_SETTINGS}, name="encoder")
        encoder.check(type(model).__name__)
        nn.share_scope(model, encoder)
        return encoder

    def check(self, owner: str) -> None:
        """Raises PMFInputError for encoder configs we do not implement (``owner``: the model's class name)."""
        n = len(self.down_block_types)
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        if bad:
            raise PMFInputError(f"{owner}: unsupported down block types {bad}; supported {DOWN_BLOCK_TYPES}")
        if len(self.block_out_channels) != n:
            raise PMFInputError(f"{owner}: down_block_types and block_out_channels differ in length")
        dims = set(per_block(self.cross_attention_dim, n, "cross_attention_dim"))
        if len(dims) != 1:
            raise PMFInputError(f"per-block cross_attention_dim {self.cross_attention_dim} is not supported "
                                f"(all blocks read the same encoder_hidden_states)")

    @nn.compact
    def __call__(self, sample, timesteps, context, reference: Optional[ReferenceRead] = None, write: bool = False,
                 conv_in_residual=None, write_adain: bool = False, image_prompt: Optional[ImagePrompt] = None):
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t = timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(self.block_out_channels[0] * 4, dtype=self.dtype, name="time_embedding")(
            t.astype(self.dtype))
        h = conv3x3(self.block_out_channels[0], self.dtype, "conv_in")(sample)
        if conv_in_residual is not None:
            h = h + conv_in_residual
        down_attn = attention_settings(self, self.down_block_types)
        n = len(self.down_block_types)
        layers = per_block(self.layers_per_block, n, "layers_per_block")
        skips, written = (h,), {}
        for i in range(n):
            name = f"down_blocks_{i}"
            h, res, w = DownBlock(self.block_out_channels[i], layers[i], down_attn[i], add_downsample=i < n - 1,
                                  downsample_padding=self.downsample_padding, groups=self.norm_num_groups,
                                  eps=self.norm_eps, dtype=self.dtype, remat=self.gradient_checkpointing, name=name)(
                h, temb, context, child_read(reference, name), write, write_adain, child_prompt(image_prompt, name))
            skips += res
            if write or write_adain:
                written[name] = w
        heads = per_block(self.num_attention_heads or self.attention_head_dim, n, "attention_head_dim")
        mid_layers = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        mid_attn = AttentionSettings(heads[-1], mid_layers[-1], self.use_linear_projection, False,
                                     self.upcast_attention, self.attention_backend)
        h, w = MidBlock(mid_attn, groups=self.norm_num_groups, eps=self.norm_eps,
                        output_scale_factor=self.mid_block_scale_factor, dtype=self.dtype,
                        remat=self.gradient_checkpointing, name="mid_block")(
            h, temb, context, child_read(reference, "mid_block"), write, write_adain,
            child_prompt(image_prompt, "mid_block"))
        if write or write_adain:
            written["mid_block"] = w
        return h, skips, temb, written
