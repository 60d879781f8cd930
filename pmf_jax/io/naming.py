"""The one mapping between PyTorch state dicts and Flax parameter trees, used for every model.

PyTorch key ``down_blocks.0.attentions.1.proj_in.weight`` ⇄ Flax path
``down_blocks_0/attentions_1/proj_in/kernel``: a numeric key part joins the name before it with ``_``; the leaf
``weight`` becomes ``kernel`` (Dense, Conv), ``scale`` (norms) or ``embedding`` (Embed), as the Flax tree says; a
parameter a module holds itself (``embeddings.class_embedding``) keeps its name.
Conv kernels are OIHW in torch and HWIO in Flax; Dense kernels are (out, in) in torch and (in, out) in Flax.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
from flax import traverse_util

from pmf_jax.errors import PMFInputError

# Flax module names that end in "_<digits>" without being a list index (diffusers ``TimestepEmbedding``).
_LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"^(.*)_(\d+)$")

# Names used by old checkpoints (the SD1.5 VAE on the Hub among them) for the VAE attention layers.
LEGACY_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

Path = Tuple[str, ...]


def torch_key_to_flax_module_path(key: str) -> Tuple[Path, str]:
    """``a.b.0.c.weight`` -> (("a", "b_0", "c"), "weight")."""
    parts = key.split(".")
    module, out = parts[:-1], []
    for part in module:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out), parts[-1]


def flax_module_path_to_torch(path: Path) -> str:
    """("a", "b_0", "c") -> ``a.b.0.c``."""
    out = []
    for part in path:
        match = _INDEXED.match(part)
        if match and part not in _LITERAL_NAMES:
            out.extend([match.group(1), match.group(2)])
        else:
            out.append(part)
    return ".".join(out)


def _torch_leaf(flax_leaf: str) -> str:
    """A layer's parameter -> ``weight``/``bias``; a module's own parameter (CLIP's ``class_embedding``) keeps its
    name."""
    return {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}.get(flax_leaf, flax_leaf)


def torch_to_flax_array(value: np.ndarray, flax_leaf: str, flax_shape: Tuple[int, ...]) -> np.ndarray:
    """Re-lays out one tensor; returns it unchanged when no layout change applies (shape checked by the caller)."""
    if flax_leaf != "kernel":
        return value
    if value.ndim == 4 and len(flax_shape) == 4:  # conv OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 4 and len(flax_shape) == 2 and value.shape[2:] == (1, 1):  # 1x1 conv stored for a Dense
        return value[:, :, 0, 0].T
    if value.ndim == 2:
        return value.T
    return value


def flax_to_torch_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
    if flax_leaf != "kernel":
        return value
    if value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:
        return value.T
    return value


def flax_path_to_torch_key(path: Path) -> str:
    return f"{flax_module_path_to_torch(path[:-1])}.{_torch_leaf(path[-1])}"


def _normalise_legacy_key(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in LEGACY_ALIASES and "attentions" in parts:
        return ".".join(parts[:-2] + [LEGACY_ALIASES[parts[-2]], parts[-1]])
    return key


class ConversionError(PMFInputError):
    """Raised when a state dict does not fit a model; the message lists every problem."""


def check_match(source: str, missing: Sequence[str], unexpected: Sequence[str], misshaped: Sequence[str],
                noun: str = "keys") -> None:
    """Raises one ConversionError ``"<source> does not match the model:"`` listing every missing, unexpected and
    mis-shaped name (``noun``: what the names are, e.g. "keys" of a state dict or "parameters" of a tree)."""
    problems = []
    if missing:
        problems.append(f"missing {noun} ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {noun} ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {noun} ({len(misshaped)}): {'; '.join(misshaped)}")
    if problems:
        raise ConversionError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params, *, source: str = "checkpoint",
                         ignore_unexpected: Tuple[str, ...] = ()) -> Dict:
    """Fills a Flax parameter tree from a torch-named state dict.

    Args:
      state_dict: torch key -> numpy array (any float dtype).
      abstract_params: the model's parameter tree (arrays or ``jax.ShapeDtypeStruct``), used for names and shapes.
      source: named in error messages.
      ignore_unexpected: torch keys (exact) that may be present and are dropped (non-persistent buffers).
    Returns:
      nested dict of numpy arrays with the Flax layout.
    Raises:
      ConversionError listing missing, unexpected and mis-shaped keys together.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    wanted = {flax_path_to_torch_key(path): path for path in flat}
    given = {_normalise_legacy_key(k): k for k in state_dict}
    missing = sorted(k for k in wanted if k not in given)
    unexpected = sorted(given[k] for k in given if k not in wanted and given[k] not in ignore_unexpected)
    out, misshaped = {}, []
    for key, path in wanted.items():
        if key not in given:
            continue
        target_shape = tuple(flat[path].shape)
        value = torch_to_flax_array(np.asarray(state_dict[given[key]]), path[-1], target_shape)
        if tuple(value.shape) != target_shape:
            misshaped.append(f"{given[key]}: {tuple(state_dict[given[key]].shape)} in {source}, model expects "
                             f"{target_shape} (Flax layout of {'/'.join(path)})")
            continue
        out[path] = value
    check_match(source, missing, unexpected, misshaped, "keys")
    return traverse_util.unflatten_dict(out)


def params_to_state_dict(params) -> Dict[str, np.ndarray]:
    """Flax parameter tree -> torch-named state dict of numpy arrays (contiguous, torch layout)."""
    flat = traverse_util.flatten_dict(params)
    return {flax_path_to_torch_key(path): np.ascontiguousarray(flax_to_torch_array(np.asarray(v), path[-1]))
            for path, v in flat.items()}
