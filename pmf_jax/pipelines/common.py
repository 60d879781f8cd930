"""What the sampling pipelines share: the compute dtype, VAE encode/decode, prompt encoding, guidance, seeds and
batch sharding.

Row layout of a guidance batch: :mod:`pmf_jax.rows` (sample-major). Noise streams: :mod:`pmf_jax.schedulers.noise`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError

# ------------------------------------------------------------------------------------------------------- dtype

def default_dtype():
    """bfloat16 on GPU/TPU, float32 on CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def resolve_dtype(dtype) -> Any:
    """``None``/"auto" -> :func:`default_dtype`; names ("float32", "bfloat16", "float16") -> the dtype."""
    if dtype is None or dtype == "auto":
        return default_dtype()
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise PMFInputError(f"dtype {dtype!r} is not a dtype (use float32, bfloat16 or float16)") from None


# ------------------------------------------------------------------------------------------------------- the VAE

def vae_encode(vae, params, images, scaled: bool = True):
    """images [B, H, W, 3] in [-1, 1] -> latents [B, H/f, W/f, C] float32 for the UNet: the posterior mean, shifted
    and scaled as diffusers does (``(mean - shift_factor) · scaling_factor``; deterministic, no sampling).
    ``scaled=False``: the mean as is (InstructPix2Pix's image latent)."""
    mean, _ = vae.apply({"params": params}, images.astype(getattr(vae, "dtype", jnp.float32)), method=vae.encode)
    if not scaled:
        return mean.astype(jnp.float32)
    return (mean.astype(jnp.float32) - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor


def vae_decode(vae, params, latents):
    """latents [B, h, w, C] (UNet scale) -> images [B, h·f, w·f, 3] float32 in [0, 1]."""
    z = latents.astype(jnp.float32) / vae.scaling_factor + (getattr(vae, "shift_factor", None) or 0.0)
    images = vae.apply({"params": params}, z.astype(getattr(vae, "dtype", jnp.float32)), method=vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def vae_factor(vae) -> int:
    """Pixels per latent (8 for SD's VAE, the patch size for the identity autoencoder)."""
    return int(vae.downscale_factor)


# ------------------------------------------------------------------------------------------------------ prompts

class PromptEncoder:
    """Prompts -> CLIP hidden states [B, T, D], or a fixed context for prompt-free models.

    Args:
      tokenizer, text_encoder, params: the CLIP tokenizer and our Flax ``CLIPTextModel`` with its params; with
        ``text_encoder=None`` every prompt maps to ``context`` (default all zeros [1, 1, cross_attention_dim]) and a
        non-empty prompt is an error.
    Tokens are padded to ``tokenizer.model_max_length`` (77 for SD) so the encoder compiles once per batch size.
    """

    def __init__(self, tokenizer=None, text_encoder=None, params=None, *, context=None,
                 cross_attention_dim: Optional[int] = None):
        if text_encoder is not None and tokenizer is None:
            raise PMFInputError("a text encoder needs its tokenizer")
        self.tokenizer, self.text_encoder, self.params = tokenizer, text_encoder, params
        if text_encoder is None:
            if context is None:
                if cross_attention_dim is None:
                    raise ValueError("without a text encoder give context or cross_attention_dim")
                context = np.zeros((1, 1, cross_attention_dim), np.float32)
            self.context = np.asarray(context, np.float32).reshape((1,) + np.shape(context)[-2:])
        self._encode = jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids)) if text_encoder else None

    @property
    def context_shape(self) -> Tuple[int, int]:
        """[T, D] of one prompt's context."""
        if self.text_encoder is None:
            return tuple(self.context.shape[1:])
        ids = jax.ShapeDtypeStruct((1, self.tokenizer.model_max_length), jnp.int32)
        return tuple(jax.eval_shape(lambda p, i: self.text_encoder.apply({"params": p}, i), self.params, ids).shape[1:])

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts: B strings -> float32 [B, T, D] (host array)."""
        prompts = list(prompts)
        if self.text_encoder is None:
            used = [p for p in prompts if p]
            if used:
                raise PMFInputError(f"this pipeline has no text encoder, so it takes no prompt (got {used[0]!r})")
            return np.repeat(self.context, len(prompts), axis=0)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        return np.asarray(self._encode(self.params, jnp.asarray(ids, jnp.int32)), np.float32)


def as_prompt_list(prompt: Union[str, Sequence[str]], n: int, name: str) -> list:
    """One prompt per sample: a string is repeated, a list must have ``n`` entries."""
    if isinstance(prompt, str):
        return [prompt] * n
    prompt = list(prompt)
    if len(prompt) != n or not all(isinstance(p, str) for p in prompt):
        raise PMFInputError(f"{name}: give one string or a list of {n} strings (one per image)")
    return prompt


# ------------------------------------------------------------------------------------------------------ guidance

def cfg(uncond, cond, scale):
    """Classifier-free guidance: ``uncond + scale · (cond − uncond)``."""
    return uncond + scale * (cond - uncond)


def nested_guidance(uncond, middle, full, scale_middle, scale_full):
    """Two-condition guidance: ``uncond + scale_middle · (middle − uncond) + scale_full · (full − middle)``.

    ``middle`` adds one condition to ``uncond`` and ``full`` adds the second one to ``middle``; each scale weighs
    its condition. InstructPix2Pix: middle = image only, full = text + image, scale_middle = image_guidance_scale,
    scale_full = guidance_scale. Retargeting: middle = text without reference, full = text + reference,
    scale_middle = guidance_scale (text), scale_full = appearance_guidance_scale.
    """
    return uncond + scale_middle * (middle - uncond) + scale_full * (full - middle)


def as_seed_list(seed, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(seeds [n] uint32, rows [n] int32)`` from one seed (rows 0..n-1) or a list of n seeds (rows all 0)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2 ** 32:
            raise PMFInputError(f"seed={value!r} must be an integer in [0, 2**32)")
        return int(value)

    if isinstance(seed, (list, tuple, np.ndarray)):
        seeds = [check(v) for v in seed]
        if len(seeds) != n:
            raise PMFInputError(f"seed: got {len(seeds)} seeds for {n} images (give one seed, or one per image)")
        return np.asarray(seeds, np.uint32), np.zeros(n, np.int32)
    return np.full(n, check(seed), np.uint32), np.arange(n, dtype=np.int32)


# ------------------------------------------------------------------------------------------------------ sharding

@functools.lru_cache(maxsize=None)
def batch_mesh():
    """The ("data", "fsdp", "tensor") mesh with every local device on "data": inference is data parallel, and in a
    multi-process run each process samples its own images on its own devices (no cross-process collective)."""
    from pmf_jax.parallel import make_mesh

    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())


def pad_batch(tree, multiple: int):
    """Pads every [N, ...] leaf to a multiple of ``multiple`` rows by repeating the last row. Returns (tree, N)."""
    n = len(jax.tree_util.tree_leaves(tree)[0])
    pad = (-n) % multiple
    if pad:
        tree = jax.tree_util.tree_map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]), tree)
    return tree, n


def jit_on_mesh(fn, mesh):
    """``jax.jit(fn)`` traced with ``mesh`` as the abstract mesh (the models pin the reference bank's batch axis with
    logical constraints). Shardings follow the inputs: place them with :func:`place_batch` /
    :func:`place_replicated`."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return jax.jit(traced)


def place_replicated(tree, mesh):
    from pmf_jax.parallel import replicated

    return jax.device_put(tree, replicated(mesh))


def place_batch(tree, mesh):
    """Every [N, ...] leaf split over the mesh's batch axes ("data", "fsdp")."""
    from pmf_jax.parallel import batch_sharding

    return jax.device_put(tree, batch_sharding(mesh))
