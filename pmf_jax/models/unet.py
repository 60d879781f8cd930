"""``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, InstructPix2Pix) in Flax linen, NHWC.

Config keys and semantics are diffusers' (``attention_head_dim`` is the number of heads when
``num_attention_heads`` is unset, as in diffusers). Also the reference UNet of the Appearance Control Module:
:meth:`~UNet2DConditionModel.write_reference` returns the reference bank, ``reference=`` (a
:class:`~pmf_jax.reference.ReferenceRead`) reads one (see :mod:`pmf_jax.reference`). With ``ip_tokens=`` its
cross-attentions also read IP-Adapter image tokens (:mod:`pmf_jax.models.image_prompt`; the ``to_k_ip``/``to_v_ip``
kernels of :meth:`pmf_jax.io.ip_adapter.IPAdapterWeights.merge_into`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pmf_jax.errors import PMFInputError
from pmf_jax.models.blocks import conv3x3, group_norm
from pmf_jax.models.configurable import PretrainedMixin
from pmf_jax.models.image_prompt import ImagePrompt, check_tokens, child_prompt, module_scales
from pmf_jax.models.unet_blocks import UpBlock, per_block
from pmf_jax.models.unet_encoder import (ENCODER_CONFIG_KEYS, EncoderFields, IntOrSeq, UNetEncoder,
                                         attention_settings, context_dim)
from pmf_jax.reference import ReferenceConfig, ReferenceRead, adain_blocks, child_read

UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

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


class UNet2DConditionModel(EncoderFields, PretrainedMixin):
    """The denoising UNet (and, through :meth:`write_reference`, the reference UNet that writes the bank).

    Call: ``apply({"params": p}, sample [B,H,W,Cin], timesteps [B] or scalar, encoder_hidden_states [B,T,D],
    down_block_additional_residuals=None, mid_block_additional_residual=None, reference=None)``
    → [B, H, W, out_channels]. ControlNet residuals are NHWC arrays matching the skip connections; ``reference`` is a
    :class:`~pmf_jax.reference.ReferenceRead` of a bank (None: plain self-attention).
    """

    CONFIG_KEYS = ("in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
                   "down_block_types", "up_block_types", "only_cross_attention", "block_out_channels",
                   "layers_per_block", "downsample_padding", "mid_block_scale_factor", "norm_num_groups", "norm_eps",
                   "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                   "num_attention_heads", "use_linear_projection", "upcast_attention", "sample_size")
    assert set(ENCODER_CONFIG_KEYS) <= set(CONFIG_KEYS)
    DEFAULT_ONLY = UNET_DEFAULT_ONLY
    # No effect on our forward pass: dropout (inference; training uses none), options of blocks we do not have.
    IGNORED_KEYS = ("dropout", "addition_embed_type_num_heads", "mid_block_only_cross_attention")

    # the encoder's fields come from EncoderFields (gradient_checkpointing: rematerialise resnets and transformers
    # in the backward pass); the decoder's:
    sample_size: Optional[IntOrSeq] = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

    def dummy_inputs(self):
        size = 2 ** (len(self.down_block_types) - 1)
        return (jnp.zeros((1, size, size, self.in_channels), self.dtype), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, context_dim(self)), self.dtype))

    def __call__(self, sample, timesteps, encoder_hidden_states, down_block_additional_residuals=None,
                 mid_block_additional_residual=None, reference: Optional[ReferenceRead] = None, ip_tokens=None,
                 ip_scale=1.0):
        if reference is not None and not isinstance(reference, ReferenceRead):
            raise TypeError(f"reference must be a pmf_jax.reference.ReferenceRead, got {type(reference).__name__} "
                            f"(wrap a bank with ReferenceRead.build(bank, config, batch))")
        prompt = None
        if ip_tokens is not None:
            check_tokens(ip_tokens, context_dim(self))
            prompt = ImagePrompt(ip_tokens, module_scales(self, ip_scale))
        return self.forward(sample, timesteps, encoder_hidden_states, down_block_additional_residuals,
                            mid_block_additional_residual, reference, None, prompt)

    def write_reference(self, sample, timesteps, encoder_hidden_states, config: Optional[ReferenceConfig] = None):
        """The write path of the reference UNet: returns the reference bank (:mod:`pmf_jax.reference`), a nested dict
        ``{"down_blocks_i": {"attentions_j": {"transformer_blocks_k": [B, HW, C]}}, "mid_block": ..., "up_blocks_i": ...}``
        of the hidden states entering each self-attention (after norm1) when ``config.method`` uses attention (None:
        ``ReferenceConfig()``, attention only), plus, when it uses AdaIN, ``"adain_j"``/``"adain"`` statistics
        {"mean", "var"} [B, 1, 1, C] of every down block, the mid block and the up blocks ``config.adain_weight``
        selects. It stops after the last block it needs (for attention, the last transformer block).
        """
        return self.forward(sample, timesteps, encoder_hidden_states, None, None, None, config or ReferenceConfig())

    @nn.compact
    def forward(self, sample, timesteps, encoder_hidden_states, down_residuals, mid_residual,
                reference: Optional[ReferenceRead], write: Optional[ReferenceConfig],
                image_prompt: Optional[ImagePrompt] = None):
        """The one network both paths run: the noise prediction [B, H, W, out_channels], or (``write``: the config
        of the entries to write) the bank. ``image_prompt``: IP-Adapter's tokens and per-module scales."""
        bad = [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if bad:
            raise PMFInputError(f"{type(self).__name__}: unsupported up block types {bad}; supported {UP_BLOCK_TYPES}")
        if len(self.up_block_types) != len(self.down_block_types):
            raise PMFInputError(f"{type(self).__name__}: up_block_types and down_block_types differ in length")
        encoder = UNetEncoder.shared_by(self)
        n = len(self.down_block_types)
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        factor = 2 ** (n - 1)
        odd_size = sample.shape[1] % factor or sample.shape[2] % factor
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        writing = write is not None
        write_attn, write_adain = writing and write.uses_attention, writing and write.uses_adain
        h, skips, temb, written = encoder(sample, timesteps, context, reference, write_attn, write_adain=write_adain,
                                          image_prompt=image_prompt)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"got {len(down_residuals)} down residuals, need {len(skips)}")
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_residuals))
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)

        up_attn = attention_settings(self, self.up_block_types, reverse=True)
        layers = per_block(self.layers_per_block, n, "layers_per_block")[::-1]
        channels = self.block_out_channels[::-1]
        # the write path runs the up blocks up to the last one it writes from, and skips that one's upsampler
        last = -1
        if write_attn:
            last = max([i for i, a in enumerate(up_attn) if a is not None], default=-1)
        if write_adain:
            selected = adain_blocks(write, n)
            last = max([last] + [i for i in range(n) if f"up_blocks_{i}" in selected])
        if writing and last < 0:
            return written
        for i in range(n):
            name = f"up_blocks_{i}"
            count = layers[i] + 1
            block_skips, skips = skips[-count:], skips[:-count]
            size = skips[-1].shape[1:3] if (odd_size and i < n - 1) else None
            h, w = UpBlock(channels[i], count, up_attn[i], add_upsample=i < n - 1, groups=self.norm_num_groups,
                           eps=self.norm_eps, dtype=self.dtype, remat=self.gradient_checkpointing, name=name)(
                h, block_skips, temb, context, child_read(reference, name), write_attn, size,
                stop_after_layers=writing and i == last, write_adain=write_adain,
                image_prompt=child_prompt(image_prompt, name))
            if writing:
                written[name] = w
                if i == last:
                    return written  # the reference UNet needs nothing after the last block it writes from
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(h)
