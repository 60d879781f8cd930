"""Where a prompt's words attend: the UNet's text cross-attention (every ``attn2``) read from one UNet call, for the
``attention`` mask of :class:`~pmf_jax.pipelines.EnhancePipeline` (prompt-to-prompt-style local blending).

No model file changes: flax's ``capture_intermediates`` keeps the outputs of the ``to_q`` and ``to_k`` Dense layers
of every module named ``attn2`` (:func:`unet_with_word_map`), and the attention probabilities are computed again from
them, as the model does: per head, ``softmax(q kᵀ · d^-1/2)`` over all the context's tokens (fp32). A layer's map is
the probability summed over the prompt's word tokens (:func:`word_weights`: not BOS, EOS or padding), averaged over
the heads, resized (bilinear) from the layer's grid to the latent grid; the maps of all layers are averaged.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError

CROSS_ATTENTION = "attn2"


def word_weights(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """float32 [N, T] (T = ``tokenizer.model_max_length``): 1 at the positions of each prompt's word tokens (after
    BOS, before EOS; truncated as the text encoder's input is), 0 at BOS, EOS and padding."""
    length = tokenizer.model_max_length
    weights = np.zeros((len(prompts), length), np.float32)
    for n, prompt in enumerate(prompts):
        words = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        weights[n, 1:1 + min(words, length - 2)] = 1.0
        if not weights[n].any():
            raise PMFInputError(f"the attention mask needs an instruction with words (got {prompt!r})")
    return weights


def unet_with_word_map(unet, params, x, t, context, words, rows: int, latent_hw: Tuple[int, int]):
    """One UNet call that also returns where the words attend.

    Args:
      x: [N·G, h, w, C] the UNet's input (rows sample-major, :mod:`pmf_jax.rows`); t: []; context: [N·G, T, D].
      words: [N, T] token weights (:func:`word_weights`) of each sample's row 0 (the row whose map is read).
      rows: G, the guidance rows per sample.
      latent_hw: (h, w) of the map.
    Returns:
      (the UNet's output [N·G, h', w', C'] — the same numbers as a plain call —, map float32 [N, h, w]).
    """
    heads: Dict[tuple, int] = {}

    def keep(module, method: str) -> bool:  # runs while tracing: records each attn2's head count by its path
        parent = module.parent
        if method != "__call__" or module.name not in ("to_q", "to_k") or getattr(parent, "name", None) != \
                CROSS_ATTENTION:
            return False
        heads[module.path[:-1]] = parent.heads
        return True

    out, state = unet.apply({"params": params}, x, t, context, capture_intermediates=keep, mutable=["intermediates"])
    maps = []
    for path, n_heads in heads.items():
        node = state["intermediates"]
        for name in path:
            node = node[name]
        q, k = node["to_q"]["__call__"][0][::rows], node["to_k"]["__call__"][0][::rows]   # row 0 of each sample
        maps.append(_layer_map(q, k, n_heads, words, latent_hw))
    if not maps:
        raise PMFInputError(f"this UNet has no cross-attention ({CROSS_ATTENTION}) to read a word map from")
    return out, jnp.mean(jnp.stack(maps), axis=0)


def _layer_map(q, k, heads: int, words, latent_hw):
    """q [N, L, heads·d], k [N, T, heads·d] -> [N, h, w]: the words' summed probability, mean over heads, resized."""
    n, length, inner = q.shape
    d = inner // heads
    q = q.astype(jnp.float32).reshape(n, length, heads, d)
    k = k.astype(jnp.float32).reshape(n, k.shape[1], heads, d)
    probs = jax.nn.softmax(jnp.einsum("nlhd,nthd->nhlt", q, k) * d ** -0.5, axis=-1)
    attended = jnp.einsum("nhlt,nt->nl", probs, words.astype(jnp.float32)) / heads
    grid = layer_grid(length, latent_hw)
    return jax.image.resize(attended.reshape((n,) + grid), (n,) + tuple(latent_hw), "bilinear")


def layer_grid(length: int, latent_hw: Tuple[int, int]) -> Tuple[int, int]:
    """(h_l, w_l) of a layer with ``length`` tokens: the latent grid halved (rounding up, as a stride-2 convolution
    with padding 1 does) until it has that many cells."""
    h, w = latent_hw
    while h * w > length:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != length:
        raise ValueError(f"a layer of {length} tokens is no downsampling of the {latent_hw} latent grid")
    return h, w


__all__ = ["CROSS_ATTENTION", "layer_grid", "unet_with_word_map", "word_weights"]
