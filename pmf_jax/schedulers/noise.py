"""The one noise convention of every denoising loop (the pipelines' and :meth:`Scheduler.sample`).

Each image n has its own PRNG key; every draw for that image is ``normal(fold_in(key_n, stream))`` with

  * stream 0: the initial noise x_T (:data:`INITIAL_STREAM`);
  * stream 1 + i: the noise of step i of a stochastic sampler (DDPM) (:func:`step_stream`);
  * stream 2**20 + t: the noise that noises the reference latent to timestep t (:data:`REFERENCE_STREAM`).

So no image depends on the batch it is in, on its position in the batch or on how the batch is split over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INITIAL_STREAM = 0
REFERENCE_STREAM = 2 ** 20


def step_stream(i):
    """The stream of step i's noise (i: an int or a traced int32 scalar)."""
    return 1 + i


def row_keys(seeds, rows):
    """One PRNG key per image: ``fold_in(key(seeds[n]), rows[n])`` ([N] uint32 seeds, [N] int32 indices) -> [N] keys.

    A pipeline call with one seed numbers its images 0..N-1; a call with one seed per image uses index 0 for each,
    so image n of ``seed=[s0, s1, ...]`` equals the single image of ``seed=s_n``.
    """
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, rows)


def image_keys(key, n: int):
    """[n] per-image keys from one key (image b: ``fold_in(key, b)``, so ``key(seed)`` gives :func:`row_keys` of a
    call with that one seed), or ``key`` itself when it already holds n keys."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key (jax.random.PRNGKey)
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(n, dtype=jnp.int32))
    if key.shape[0] != n:
        raise ValueError(f"got {key.shape[0]} keys for {n} images")
    return key


def row_normal(keys, stream, shape, dtype=jnp.float32):
    """[N, *shape] standard normal noise, row n from ``fold_in(keys[n], stream)`` (stream: an int or a traced int32
    scalar)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, dtype))(keys)


__all__ = ["INITIAL_STREAM", "REFERENCE_STREAM", "image_keys", "row_keys", "row_normal", "step_stream"]
