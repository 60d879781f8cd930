"""The row layout of every batched model call: **sample-major**.

A sampling batch holds N samples (source/pose pairs, or frames of one pose sequence). Classifier-free guidance gives
each sample G rows (``[u, c]`` or ``[u, c, a]``); row ``n·G + g`` is guidance row g of sample n. Anything written
per sample — the reference bank, the pose, the latents — reaches the N·G rows by :func:`repeat_rows`, and a tree
with fewer samples than the batch (one source bank read by many frames) by :func:`expand_rows`: row b reads sample
``b // (batch // B')``. Splitting the N samples over devices therefore splits the N·G rows the same way, so every
device combines its own rows and reads its own bank entries (no collective).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def repeat_rows(x, rows: int):
    """[N, ...] -> [N·rows, ...]: each sample's ``rows`` guidance rows next to each other (sample-major)."""
    return jnp.repeat(x, rows, axis=0)


def expand_rows(tree, batch: int):
    """Every leaf [B', ...] -> [batch, ...] sample-major (row b reads ``b // (batch // B')``); B' must divide
    ``batch``. A leaf already of ``batch`` rows is returned as is."""

    def expand(x):
        if x.shape[0] == batch:
            return x
        if x.shape[0] == 0 or batch % x.shape[0]:
            raise ValueError(f"{x.shape[0]} rows do not divide the batch of {batch} rows")
        return repeat_rows(x, batch // x.shape[0])

    return jax.tree_util.tree_map(expand, tree)


def split_rows(x, rows: int):
    """[N·rows, ...] (sample-major) -> ``rows`` arrays [N, ...], one per guidance row."""
    x = x.reshape((x.shape[0] // rows, rows) + x.shape[1:])
    return [x[:, g] for g in range(rows)]


def row_pattern(values: Sequence[float], samples: int):
    """Per-row flags [samples·len(values)]: ``values`` (one per guidance row) repeated for every sample."""
    return jnp.tile(jnp.asarray(values, jnp.float32), samples)
