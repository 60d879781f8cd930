"""IP-Adapter's image projection models in Flax linen: CLIP image features -> ``num_tokens`` context tokens.

* :class:`ImageProjection` (IP-Adapter): ``image_embeds`` [B, E] -> Dense to num_tokens·D -> [B, num_tokens, D]
  -> LayerNorm. diffusers' ``ImageProjection``.
* :class:`IPAdapterPlusImageProjection` (IP-Adapter Plus, the perceiver "Resampler"): the image encoder's
  ``hidden_states[-2]`` [B, N, E] -> ``proj_in`` -> ``depth`` blocks where ``num_queries`` learned latents attend to
  [features; latents] (``norm1``/``norm2``, ``to_q``, ``to_kv``, ``to_out``, all without bias) and pass a
  LayerNorm -> Dense(ffn_ratio·H) -> GELU -> Dense(H) feed-forward (both residual) -> ``proj_out`` -> ``norm_out``
  -> [B, num_queries, D]. diffusers' ``IPAdapterPlusImageProjection`` (same arithmetic, other names).

Parameter names are the public IP-Adapter checkpoint's (``image_proj.*`` of ``ip-adapter*.safetensors``), mapped by
one rule (:mod:`pmf_jax.io.ip_adapter`): drop the ``image_proj.`` prefix, join each numeric key part to the name
before it with ``_``, ``weight`` -> ``kernel`` (Dense, transposed) / ``scale`` (LayerNorm). E.g.
``image_proj.layers.0.0.to_kv.weight`` -> ``layers_0_0/to_kv/kernel`` (the block's attention),
``image_proj.layers.0.1.3.weight`` -> ``layers_0_1_3/kernel`` (its feed-forward's second Dense: the torch
``nn.Sequential`` indices 0, 1, 3 become the names ``layers_<i>_1_0``, ``_1_1``, ``_1_3``), ``image_proj.latents``
-> ``latents``. diffusers renames these when it loads them (``_convert_ip_adapter_image_proj_to_diffusers``, which
also splits ``to_kv``); we keep the file's names, so export is the same rule backwards.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmf_jax.models.attention import dot_product_attention
from pmf_jax.models.configurable import PretrainedMixin

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, used by every norm of both models


def _layer_norm(dtype, name):
    return nn.LayerNorm(LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False, name=name)


class ImageProjection(PretrainedMixin, nn.Module):
    """image_embeds [B, image_embed_dim] -> [B, num_tokens, cross_attention_dim] (names ``proj``, ``norm``)."""

    image_embed_dim: int = 1024
    cross_attention_dim: int = 768
    num_tokens: int = 4
    dtype: jnp.dtype = jnp.float32

    CONFIG_KEYS = ("image_embed_dim", "cross_attention_dim", "num_tokens")

    @nn.compact
    def __call__(self, image_embeds):
        b = image_embeds.shape[0]
        x = nn.Dense(self.num_tokens * self.cross_attention_dim, dtype=self.dtype, name="proj")(image_embeds)
        return _layer_norm(self.dtype, "norm")(x.reshape(b, self.num_tokens, self.cross_attention_dim))

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, self.image_embed_dim), self.dtype),)


class PerceiverAttention(nn.Module):
    """latents [B, Q, dim] attend to [norm1(x); norm2(latents)] ([B, N + Q, dim]) -> [B, Q, dim] (no residual).

    heads × dim_head is the inner width; the scale is dim_head^-1/2 (the original's dim_head^-1/4 on q and on k).
    """

    dim: int
    dim_head: int
    heads: int
    backend: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, latents):
        inner = self.dim_head * self.heads
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        x = _layer_norm(self.dtype, "norm1")(x)
        latents = _layer_norm(self.dtype, "norm2")(latents)
        context = jnp.concatenate([x, latents], axis=1)
        b, q_len, k_len = latents.shape[0], latents.shape[1], context.shape[1]
        q = dense(inner, "to_q")(latents).reshape(b, q_len, self.heads, self.dim_head)
        k, v = jnp.split(dense(2 * inner, "to_kv")(context), 2, axis=-1)  # the first half is k, as torch's chunk
        k = k.reshape(b, k_len, self.heads, self.dim_head)
        v = v.reshape(b, k_len, self.heads, self.dim_head)
        out = dot_product_attention(q, k, v, backend=self.backend).reshape(b, q_len, inner)
        return dense(self.dim, "to_out")(out)


class IPAdapterPlusImageProjection(PretrainedMixin, nn.Module):
    """features [B, N, embed_dims] -> [B, num_queries, output_dims] (fields: diffusers' names and defaults).

    embed_dims: the image encoder's hidden size (1280 for ViT-H/14); hidden_dims: the resampler's width;
    output_dims: the UNet's cross_attention_dim; heads × dim_head: the attention's inner width (the public
    checkpoints: hidden_dims, with dim_head 64).
    """

    embed_dims: int = 768
    output_dims: int = 1024
    hidden_dims: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 16
    num_queries: int = 8
    ffn_ratio: float = 4
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "xla"

    CONFIG_KEYS = ("embed_dims", "output_dims", "hidden_dims", "depth", "dim_head", "heads", "num_queries",
                   "ffn_ratio")

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    @property
    def cross_attention_dim(self) -> int:
        return self.output_dims

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(self.hidden_dims ** -0.5)
        latents = self.param("latents", init, (1, self.num_queries, self.hidden_dims))
        latents = jnp.broadcast_to(jnp.asarray(latents, self.dtype), (x.shape[0],) + latents.shape[1:])
        x = nn.Dense(self.hidden_dims, dtype=self.dtype, name="proj_in")(x)
        for i in range(self.depth):
            latents = latents + PerceiverAttention(self.hidden_dims, self.dim_head, self.heads, self.attention_backend,
                                                   self.dtype, name=f"layers_{i}_0")(x, latents)
            h = _layer_norm(self.dtype, f"layers_{i}_1_0")(latents)
            h = nn.Dense(int(self.hidden_dims * self.ffn_ratio), use_bias=False, dtype=self.dtype,
                         name=f"layers_{i}_1_1")(h)
            h = nn.Dense(self.hidden_dims, use_bias=False, dtype=self.dtype,
                         name=f"layers_{i}_1_3")(jax.nn.gelu(h, approximate=False))
            latents = latents + h
        latents = nn.Dense(self.output_dims, dtype=self.dtype, name="proj_out")(latents)
        return _layer_norm(self.dtype, "norm_out")(latents)

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, 1, self.embed_dims), self.dtype),)
