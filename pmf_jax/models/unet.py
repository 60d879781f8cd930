"""``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, InstructPix2Pix) in Flax linen, NHWC.

Config keys and semantics are diffusers' (``attention_head_dim`` is the number of heads when
``num_attention_heads`` is unset, as in diffusers). Also the reference UNet of the Appearance Control Module:
``write_reference`` returns the reference bank, ``reference=`` reads one (see :mod:`pmf_jax.reference`).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from pmf_jax.errors import PMFInputError
from pmf_jax.models.blocks import conv3x3, group_norm
from pmf_jax.models.configurable import PretrainedMixin
from pmf_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from pmf_jax.models.unet_blocks import AttentionSettings, DownBlock, MidBlock, UpBlock

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

IntOrSeq = Union[int, Tuple[int, ...]]

# Options of diffusers' config that change the network and that we implement at their default value only.
UNET_DEFAULT_ONLY = {
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def per_block(value, n: int, name: str) -> tuple:
    """Broadcasts an int/bool config value to one per block; checks list lengths."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise PMFInputError(f"config {name}={list(value)} needs {n} entries, one per down block")
        return tuple(value)
    return (value,) * n


class UNet2DConditionModel(nn.Module, PretrainedMixin):
    """The denoising UNet.

    Call: ``apply({"params": p}, sample [B,H,W,Cin], timesteps [B] or scalar, encoder_hidden_states [B,T,D],
    down_block_additional_residuals=None, mid_block_additional_residual=None, reference=None, ref_mix=None)``
    → [B, H, W, out_channels]. ControlNet residuals are NHWC arrays matching the skip connections.
    """

    CONFIG_KEYS = ("in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
                   "down_block_types", "up_block_types", "only_cross_attention", "block_out_channels",
                   "layers_per_block", "downsample_padding", "mid_block_scale_factor", "norm_num_groups", "norm_eps",
                   "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                   "num_attention_heads", "use_linear_projection", "upcast_attention", "sample_size")
    DEFAULT_ONLY = UNET_DEFAULT_ONLY
    # No effect on our forward pass: dropout (inference; training uses none), options of blocks we do not have.
    IGNORED_KEYS = ("dropout", "addition_embed_type_num_heads", "mid_block_only_cross_attention")

    sample_size: Optional[IntOrSeq] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
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
    gradient_checkpointing: bool = False  # rematerialise resnets and transformers in the backward pass

    # ---- configuration helpers (static, no params) ----
    def _check(self):
        self._check_encoder()
        bad = [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if bad:
            raise PMFInputError(f"{type(self).__name__}: unsupported up block types {bad}; supported {UP_BLOCK_TYPES}")
        if len(self.up_block_types) != len(self.down_block_types):
            raise PMFInputError(f"{type(self).__name__}: up_block_types and down_block_types differ in length")

    def _check_encoder(self):
        n = len(self.down_block_types)
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        if bad:
            raise PMFInputError(f"{type(self).__name__}: unsupported down block types {bad}; "
                                f"supported {DOWN_BLOCK_TYPES}")
        if len(self.block_out_channels) != n:
            raise PMFInputError(f"{type(self).__name__}: down_block_types and block_out_channels differ in length")
        dims = set(per_block(self.cross_attention_dim, n, "cross_attention_dim"))
        if len(dims) != 1:
            raise PMFInputError(f"per-block cross_attention_dim {self.cross_attention_dim} is not supported "
                                f"(all blocks read the same encoder_hidden_states)")

    def attention_settings(self) -> Tuple[Tuple[Optional[AttentionSettings], ...], AttentionSettings]:
        """(per down block settings or None for plain blocks, mid block settings)."""
        n = len(self.down_block_types)
        heads = per_block(self.num_attention_heads or self.attention_head_dim, n, "attention_head_dim")
        layers = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        only_cross = per_block(self.only_cross_attention, n, "only_cross_attention")
        settings = tuple(
            AttentionSettings(heads[i], layers[i], self.use_linear_projection, bool(only_cross[i]),
                              self.upcast_attention, self.attention_backend)
            if self.down_block_types[i].startswith("CrossAttn") else None for i in range(n))
        mid = AttentionSettings(heads[-1], layers[-1], self.use_linear_projection, False, self.upcast_attention,
                                self.attention_backend)
        return settings, mid

    def up_attention_settings(self) -> Tuple[Optional[AttentionSettings], ...]:
        n = len(self.up_block_types)
        heads = per_block(self.num_attention_heads or self.attention_head_dim, n, "attention_head_dim")[::-1]
        layers = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")[::-1]
        only_cross = per_block(self.only_cross_attention, n, "only_cross_attention")[::-1]
        return tuple(
            AttentionSettings(heads[i], layers[i], self.use_linear_projection, bool(only_cross[i]),
                              self.upcast_attention, self.attention_backend)
            if self.up_block_types[i].startswith("CrossAttn") else None for i in range(n))

    def dummy_inputs(self):
        n = len(self.down_block_types)
        size = 2 ** (n - 1)
        ctx_dim = per_block(self.cross_attention_dim, n, "cross_attention_dim")[0]
        return (jnp.zeros((1, size, size, self.in_channels), self.dtype), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, ctx_dim), self.dtype))

    # ---- shared pieces (used by ControlNetModel too) ----
    def embed_time(self, timesteps, batch: int):
        """timesteps: scalar or [B] -> temb [B, 4·C0]."""
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t = timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        return TimestepEmbedding(self.block_out_channels[0] * 4, dtype=self.dtype, name="time_embedding")(
            t.astype(self.dtype))

    def encode_down(self, h, temb, context, reference, ref_mix, write):
        """conv_in output h -> (h, skips, written) through the down blocks (names down_blocks_i)."""
        down_attn, _ = self.attention_settings()
        n = len(self.down_block_types)
        layers = per_block(self.layers_per_block, n, "layers_per_block")
        skips, written = (h,), {}
        for i in range(n):
            name = f"down_blocks_{i}"
            h, res, w = DownBlock(self.block_out_channels[i], layers[i], down_attn[i], add_downsample=i < n - 1,
                                  downsample_padding=self.downsample_padding, groups=self.norm_num_groups,
                                  eps=self.norm_eps, dtype=self.dtype, remat=self.gradient_checkpointing, name=name)(
                h, temb, context, _child(reference, name), ref_mix, write)
            skips += res
            if write:
                written[name] = w
        return h, skips, written

    def middle(self, h, temb, context, reference, ref_mix, write):
        _, mid_attn = self.attention_settings()
        h, w = MidBlock(mid_attn, groups=self.norm_num_groups, eps=self.norm_eps,
                        output_scale_factor=self.mid_block_scale_factor, dtype=self.dtype,
                        remat=self.gradient_checkpointing, name="mid_block")(
            h, temb, context, _child(reference, "mid_block"), ref_mix, write)
        return h, w

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, down_block_additional_residuals=None,
                 mid_block_additional_residual=None, reference=None, reference_config=None, ref_mix=None, uncond_mask=None,
                 write_reference: bool = False):
        self._check()
        if reference is not None and reference_config is not None:
            from pmf_jax.reference import prepare_read

            reference, ref_mix = prepare_read(reference, reference_config, sample.shape[0], ref_mix, uncond_mask)
        n = len(self.down_block_types)
        batch = sample.shape[0]
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        factor = 2 ** (n - 1)
        odd_size = sample.shape[1] % factor or sample.shape[2] % factor
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.embed_time(timesteps, batch)
        h = conv3x3(self.block_out_channels[0], self.dtype, "conv_in")(sample)
        h, skips, written = self.encode_down(h, temb, context, reference, ref_mix, write_reference)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"got {len(down_block_additional_residuals)} down residuals, need {len(skips)}")
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals))
        h, w = self.middle(h, temb, context, reference, ref_mix, write_reference)
        if write_reference:
            written["mid_block"] = w
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)

        up_attn = self.up_attention_settings()
        layers = per_block(self.layers_per_block, n, "layers_per_block")[::-1]
        channels = self.block_out_channels[::-1]
        last_attn_block = max([i for i, a in enumerate(up_attn) if a is not None], default=-1)
        for i in range(n):
            name = f"up_blocks_{i}"
            count = layers[i] + 1
            block_skips, skips = skips[-count:], skips[:-count]
            size = skips[-1].shape[1:3] if (odd_size and i < n - 1) else None
            h, w = UpBlock(channels[i], count, up_attn[i], add_upsample=i < n - 1, groups=self.norm_num_groups,
                           eps=self.norm_eps, dtype=self.dtype, remat=self.gradient_checkpointing, name=name)(
                h, block_skips, temb, context, _child(reference, name), ref_mix, write_reference, size,
                stop_after_attention=write_reference and i == last_attn_block)
            if write_reference:
                written[name] = w
                if i == last_attn_block:
                    return written  # the reference UNet needs nothing after its last transformer block
        if write_reference:
            return written
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(h)

    def write_reference(self, sample, timesteps, encoder_hidden_states):
        """Runs the UNet in write mode: returns the reference bank, a nested dict
        ``{"down_blocks_i": {"attentions_j": {"transformer_blocks_k": [B, HW, C]}}, "mid_block": ..., "up_blocks_i": ...}``
        of the hidden states entering each self-attention (after norm1), stopping after the last transformer block.
        """
        return self(sample, timesteps, encoder_hidden_states, write_reference=True)


def _child(reference, name):
    return None if reference is None else reference.get(name)
