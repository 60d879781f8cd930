"""Refusing weights that hold NaN or Inf: such a model loads, samples, and saves black images with exit status 0.

Every loaded parameter tree goes through :func:`check_finite` while it is still on the host, before it is cast to the
model's dtype: one vectorised pass over the tree (per leaf, numpy's ``max`` and ``min``: no temporaries, no device
copy), which also catches values that the cast would turn into Inf (e.g. 1e5 in float16). Only when it fails does a
second pass name the bad tensors. (One jitted reduction over the whole tree was measured first: XLA took 1 to 30 s to
compile it for a tree of ~540 leaves, every time a model of a new structure loads; the numpy pass takes ~0.1 s for
the tiny models and is bound by memory bandwidth for SD-sized ones.)
"""

from __future__ import annotations

from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError

NAMES_SHOWN = 5  # bad tensors named in the message; the rest are counted


def _is_floating(leaf) -> bool:
    return np.issubdtype(np.asarray(leaf).dtype, np.floating) or str(np.asarray(leaf).dtype) == "bfloat16"


def in_range(leaf, dtype=None) -> bool:
    """Whether every value of ``leaf`` (an array) is finite and, cast to ``dtype`` (default: its own), stays finite.
    NaN fails both comparisons, so two vectorised reductions decide it."""
    array = np.asarray(leaf)
    if array.size == 0 or not _is_floating(array):
        return True
    limit = float(jnp.finfo(dtype if dtype is not None else array.dtype).max)
    # Python floats: comparing a float16 array with a float32 limit would warn about an overflowing cast
    return float(array.max()) <= limit and float(array.min()) >= -limit


def all_finite(tree, dtype=None) -> bool:
    """Whether every floating leaf of ``tree`` holds finite values only, also once cast to ``dtype`` (if given)."""
    return all(in_range(leaf, dtype) for leaf in jax.tree_util.tree_leaves(tree))


def nonfinite_names(tree, dtype=None) -> List[str]:
    """The ``/``-joined paths of the floating leaves of ``tree`` that fail :func:`in_range`."""
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if not in_range(leaf, dtype)]


def describe_names(names: List[str], what: str = "NaN or Inf") -> str:
    """``"tensor a holds NaN or Inf"`` / ``"tensors a, b, c (and 4 more) hold NaN or Inf"``."""
    shown = ", ".join(names[:NAMES_SHOWN]) + (f" (and {len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN
                                              else "")
    return f"tensor {shown} holds {what}" if len(names) == 1 else f"tensors {shown} hold {what}"


def check_finite(tree, source: str, dtype=None, locate: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Raises PMFInputError when a floating leaf of ``tree`` holds NaN or Inf, or values that a cast to ``dtype``
    would make Inf.

    Args:
      tree: a parameter tree of host (numpy) arrays.
      source: what the tree was read from (a folder, a checkpoint), named in the message.
      dtype: the dtype the tree is about to be cast to (None: each leaf's own).
      locate: called only on failure: where the bad values are, e.g. ``"<file>: tensor <name> holds NaN or Inf"``
        (the weight file and the tensor's name in it: :func:`describe_names`), or None to name the paths in ``tree``
        under ``source``.
    """
    if all_finite(tree, dtype):
        return
    where = locate() if locate is not None else None
    if where is None:
        names = nonfinite_names(tree)
        if names:
            where = f"{source}: {describe_names(names)}"
        else:
            beyond = f"values beyond the range of {jnp.dtype(dtype).name}"
            where = (f"{source}: {describe_names(nonfinite_names(tree, dtype), beyond)} (Inf once cast; load it in "
                     f"float32)")
    raise PMFInputError(f"{where}; refusing these weights (a model with them samples black images)")
