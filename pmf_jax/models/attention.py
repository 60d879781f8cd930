"""Scaled dot-product attention behind one function, and the attention layers built on it.

Backends (`backend=`):
  * ``"xla"``   — einsum reference; logits and softmax in fp32 whatever the input dtype.
  * ``"cudnn"`` — ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on NVIDIA GPUs;
                  needs fp16/bf16 inputs).
  * ``"flash"`` — Pallas flash attention for TPU (``jax.experimental.pallas.ops.tpu.flash_attention``) where it
                  tiles the shapes (:func:`flash_supported`), XLA elsewhere; checked on the CPU in Pallas interpret
                  mode.
  * ``"auto"``  — picks by platform, dtype and sequence length (see :func:`resolve_backend`).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmf_jax.constants import ATTENTION_BACKENDS

BACKENDS = ATTENTION_BACKENDS

# cuDNN flash beats the einsum path only on long sequences (measured on an H100 with jax 0.11.2, 8 heads, bf16: 5x
# faster at 4,096 tokens, slower at 64). Below this many query tokens `auto` stays on XLA.
CUDNN_MIN_SEQ_LEN = 256
_CUDNN_HEAD_DIMS_MAX = 256


def resolve_backend(backend: str, q_len: int, head_dim: int, dtype, platform: Optional[str] = None) -> str:
    """Returns the concrete backend for ``backend`` (``auto`` resolved by platform, dtype and shape).

    ``auto``: cuDNN flash on GPU for fp16/bf16 with at least :data:`CUDNN_MIN_SEQ_LEN` query tokens, XLA otherwise
    (CPU, short sequences, fp32). On TPU ``auto`` stays on XLA until the Pallas kernel is measured there (opt in
    with ``"flash"``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {BACKENDS}")
    platform = platform or jax.default_backend()
    if backend == "cudnn" and platform != "gpu":
        raise ValueError(f"attention backend 'cudnn' needs an NVIDIA GPU (this is {platform}); use 'xla' or 'auto'")
    if backend == "flash" and platform != "tpu" and not tpu_interpret_mode():
        raise ValueError(f"attention backend 'flash' runs on TPU only (this is {platform}; or inside "
                         f"jax.experimental.pallas.tpu.force_tpu_interpret_mode()); use 'xla' or 'auto'")
    if backend != "auto":
        return backend
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if (platform == "gpu" and half and q_len >= CUDNN_MIN_SEQ_LEN and head_dim <= _CUDNN_HEAD_DIMS_MAX
            and head_dim % 8 == 0):
        return "cudnn"
    return "xla"


def _xla_attention(q, k, v, scale: float, upcast: bool, mask=None):
    # q: [B, Lq, H, D], k/v: [B, Lk, H, D]
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        # The fp32 minimum (not -inf), as transformers does: a fully masked row averages instead of giving NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def tpu_interpret_mode() -> bool:
    """True inside ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``: Pallas TPU kernels run on the CPU
    (how the tests check the ``flash`` backend without a TPU)."""
    try:
        from jax._src import config as jax_config

        return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
    except AttributeError:  # a JAX without TPU interpret mode
        return False


def flash_supported(q_len: int, k_len: int, head_dim: int) -> bool:
    """Shapes the Pallas TPU kernel tiles: keys in multiples of 128 and head dims up to 128 (or multiples of it).
    In SD1.5 that is self-attention (and the reference concat) at 16×16 latents and up with 40/80-dim heads; the
    77-token text cross-attention and the 160-dim heads of the 1280-channel blocks run on XLA instead."""
    return k_len % 128 == 0 and (head_dim <= 128 or head_dim % 128 == 0) and q_len % flash_block(q_len) == 0


def flash_block(length: int) -> int:
    """The kernel's tile along a sequence of ``length``: the largest of 512/256/128 that divides it, else the whole
    sequence (a block equal to the full dimension satisfies Mosaic's tiling rule; e.g. a 64-token query)."""
    return next((b for b in (512, 256, 128) if length % b == 0), length)


def _flash_tpu_attention(q, k, v, scale: float):
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes, flash_attention

    bq, bk = flash_block(q.shape[1]), flash_block(k.shape[1])
    blocks = BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                        block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk,
                        block_q_dq=bq)
    # The Pallas kernel takes [B, H, L, D].
    out = flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), sm_scale=scale,
                          block_sizes=blocks)
    return out.transpose(0, 2, 1, 3)


def dot_product_attention(q, k, v, *, scale: Optional[float] = None, backend: str = "auto", upcast: bool = False,
                          mask=None):
    """softmax(q kᵀ · scale) v.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (Lk may differ from Lq: cross-attention, reference concat).
      scale: logit scale, default D**-0.5.
      backend: one of :data:`BACKENDS`.
      upcast: compute q kᵀ from fp32 copies of q and k (diffusers ``upcast_attention``; the softmax is fp32 always).
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend (causal/padding masks of the text
        encoder). The ``flash`` backend takes no mask, and runs the Pallas kernel only where
        :func:`flash_supported` (XLA elsewhere).
    Returns:
      [B, Lq, H, D] in v's dtype.
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    chosen = resolve_backend(backend, q.shape[1], head_dim, q.dtype)
    if chosen == "xla":
        return _xla_attention(q, k, v, scale, upcast, mask)
    if chosen == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation="cudnn")
    if mask is not None:
        raise ValueError("attention backend 'flash' takes no mask; use 'xla' or 'auto' for masked attention")
    if not flash_supported(q.shape[1], k.shape[1], head_dim):
        return _xla_attention(q, k, v, scale, upcast, mask)
    return _flash_tpu_attention(q, k, v, scale)


class Attention(nn.Module):
    """Multi-head attention with diffusers ``Attention`` parameter names (to_q, to_k, to_v, to_out_0).

    Self-attention when ``context`` is None, else cross-attention to ``context``.
    ``kv_extra`` ([B, L2, C], same width as the query input) is concatenated after the keys/values' own input
    along the sequence axis and projected by the same to_k/to_v: the reference-attention read.
    ``ip_tokens`` ([B, N, Cc]) with ``ip_scale`` (a scalar, may be traced): IP-Adapter's decoupled cross-attention,
    ``attn(q, K, V) + ip_scale · attn(q, to_k_ip(ip), to_v_ip(ip))`` before ``to_out_0`` (same queries and heads;
    ``to_k_ip``/``to_v_ip`` have no bias).
    """

    heads: int
    dim_head: int
    out_dim: Optional[int] = None
    qkv_bias: bool = False
    upcast: bool = False
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, kv_extra=None, ip_tokens=None, ip_scale=None):
        # x: [B, L, C]; context: [B, T, Cc] or None.
        inner = self.heads * self.dim_head
        dense = functools.partial(nn.Dense, inner, use_bias=self.qkv_bias, dtype=self.dtype)
        kv_in = x if context is None else context
        if kv_extra is not None:
            kv_in = jnp.concatenate([kv_in, kv_extra.astype(kv_in.dtype)], axis=1)
        q = dense(name="to_q")(x)
        k = dense(name="to_k")(kv_in)
        v = dense(name="to_v")(kv_in)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)  # noqa: E731
        out = dot_product_attention(split(q), split(k), split(v), backend=self.backend, upcast=self.upcast)
        if ip_tokens is not None:
            ip_tokens = ip_tokens.astype(self.dtype)
            k_ip = dense(name="to_k_ip", use_bias=False)(ip_tokens)
            v_ip = dense(name="to_v_ip", use_bias=False)(ip_tokens)
            ip_out = dot_product_attention(split(q), split(k_ip), split(v_ip), backend=self.backend,
                                           upcast=self.upcast)
            out = out + jnp.asarray(ip_scale, jnp.float32).astype(ip_out.dtype) * ip_out
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return nn.Dense(self.out_dim or x.shape[-1], dtype=self.dtype, name="to_out_0")(out)
