"""Timestep embeddings (diffusers ``Timesteps`` + ``TimestepEmbedding``)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       max_period: float = 10000.0):
    """Sinusoidal embedding. timesteps: [B] (int or float) -> [B, dim] float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2. [B, Cin] -> [B, time_embed_dim]."""

    time_embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(nn.silu(x))
