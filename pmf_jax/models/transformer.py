"""Spatial transformer (diffusers ``Transformer2DModel`` + ``BasicTransformerBlock``) with the reference hooks.

Reference attention (docs/architecture.md, "The reference bank"): a block run with ``write=True`` also returns the
hidden states that enter its self-attention (after ``norm1``), [B, HW, C]. A block given a
:class:`~pmf_jax.reference.ReferenceRead` (bank [B', HW', C], B' dividing B, rows matched sample-major) computes
self-attention with K, V projected by its own to_k/to_v from ``concat([norm1(x), bank], axis=1)``. Its ``ref_mix``
([B] in [0, 1]) blends per row: ``out = ref_mix·plain + (1 − ref_mix)·read`` (reference-only's style_fidelity on the
unconditional rows, reference dropout).

Image prompt (IP-Adapter, :mod:`pmf_jax.models.image_prompt`): a block given an ``ImagePrompt`` (tokens [B', N, D],
a scalar scale) adds ``scale · attn(q, to_k_ip(tokens), to_v_ip(tokens))`` to its cross-attention ``attn2``.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmf_jax.models.attention import Attention
from pmf_jax.models.blocks import conv1x1, group_norm
from pmf_jax.models.image_prompt import ImagePrompt
from pmf_jax.parallel.rules import with_logical_constraint
from pmf_jax.reference import ReferenceRead, child_read
from pmf_jax.rows import expand_rows

# The bank keeps the batch split of the latents it came from, so the K/V concat is local to each device.
_BANK_AXES = ("batch", None, None)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net_0/proj (dim -> 2·4·dim), x·gelu(gate), net_2 (4·dim -> dim)."""

    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        inner = self.dim * self.mult
        hidden, gate = jnp.split(_GEGLU(inner, dtype=self.dtype, name="net_0")(x), 2, axis=-1)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(hidden * jax.nn.gelu(gate, approximate=False))


class _GEGLU(nn.Module):
    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.inner * 2, dtype=self.dtype, name="proj")(x)


class BasicTransformerBlock(nn.Module):
    """norm1/attn1 (self, or cross if ``only_cross_attention``), norm2/attn2 (cross), norm3/ff. x: [B, L, dim]."""

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, reference: Optional[ReferenceRead] = None, write: bool = False,
                 image_prompt: Optional[ImagePrompt] = None):
        attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast_attention,  # noqa: E731
                                      backend=self.attention_backend, dtype=self.dtype, name=name)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")(x)
        written = with_logical_constraint(h, _BANK_AXES) if write else None
        attn1 = attn("attn1")
        if self.only_cross_attention:
            a = attn1(h, context)  # no self-attention to extend: reference is not read here
        elif reference is None:
            a = attn1(h)
        else:
            a = attn1(h, kv_extra=with_logical_constraint(expand_rows(reference.bank, h.shape[0]), _BANK_AXES))
            if reference.ref_mix is not None:
                w = reference.ref_mix.astype(a.dtype)[:, None, None]
                a = w * attn1(h) + (1 - w) * a
        x = x + a
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(x)
        if image_prompt is None:
            x = x + attn("attn2")(h, context)
        else:
            x = x + attn("attn2")(h, context, ip_tokens=expand_rows(image_prompt.tokens, h.shape[0]),
                                  ip_scale=image_prompt.scales)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm3")(x)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h)
        return x, written


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks -> proj_out, plus the residual. x: [B, H, W, C] -> same.

    ``reference``: a :class:`~pmf_jax.reference.ReferenceRead` of {"transformer_blocks_k": [B', HW, C]} (missing keys:
    that block does not read). ``image_prompt``: an ``ImagePrompt`` whose scale (a scalar) every block's attn2 uses.
    Returns (x, written) with written = {"transformer_blocks_k": [B, HW, C]} when ``write`` else {}.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, reference: Optional[ReferenceRead] = None, write: bool = False,
                 image_prompt: Optional[ImagePrompt] = None):
        b, hgt, wid, channels = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, hgt * wid, channels))
        else:
            x = conv1x1(inner, self.dtype, "proj_in")(x).reshape(b, hgt * wid, inner)
        written = {}
        for k in range(self.num_layers):
            name = f"transformer_blocks_{k}"
            x, w = BasicTransformerBlock(inner, self.heads, self.dim_head, self.only_cross_attention,
                                         self.upcast_attention, self.attention_backend, self.dtype,
                                         name=name)(x, context, child_read(reference, name), write, image_prompt)
            if write:
                written[name] = w
        if self.use_linear_projection:
            x = nn.Dense(channels, dtype=self.dtype, name="proj_out")(x).reshape(b, hgt, wid, channels)
        else:
            x = conv1x1(channels, self.dtype, "proj_out")(x.reshape(b, hgt, wid, inner))
        return x + residual, written
