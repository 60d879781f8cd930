"""IP-Adapter's image prompt as the UNet reads it: the decoupled cross-attention's tokens and per-layer scales.

Every cross-attention (``attn2``) given an :class:`ImagePrompt` adds a second attention of the same queries to the
image tokens, projected by its own ``to_k_ip`` / ``to_v_ip`` (Dense, no bias, [cross_attention_dim, inner]), before
``to_out``: ``out = attn(q, K_text, V_text) + scale · attn(q, K_ip, V_ip)`` (diffusers' ``IPAdapterAttnProcessor2_0``).

Scales follow diffusers' ``set_ip_adapter_scale``: a number (every layer), or a per-block dict
``{"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": {"block_0": [0.0, 1.0, 0.0]}}`` — an entry per block with
attention (``block_i`` of ``down``/``up``), a number for the whole block or one per ``attentions_j`` of it (down
blocks have ``layers_per_block`` of them, up blocks one more), ``down``/``up``/``mid`` a number for all of theirs;
what the dict leaves out is 0. :func:`expand_scale` writes any of them out in full (a dict of that same format, so
expanding twice changes nothing); its leaves may be traced (changing a scale never recompiles). All transformer
blocks of one ``attentions_j`` share its scale.

:class:`ImagePrompt` travels through the blocks like the reference read (:func:`child_prompt`): ``tokens`` [B', N, D]
(B' dividing the batch, rows matched sample-major: :func:`pmf_jax.rows.expand_rows`) and ``scales``, a nested dict
keyed like the UNet's modules down to ``attentions_j`` (``{"down_blocks_1": {"attentions_0": s}}``), a scalar inside a
spatial transformer.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError

PARTS = ("down", "mid", "up")


@flax.struct.dataclass
class ImagePrompt:
    """tokens: [B', N, D] image prompt tokens; scales: {module: ... {"attentions_j": scalar}} (or a scalar inside an
    ``attentions_j``)."""

    tokens: Any
    scales: Any


def child_prompt(prompt, name: str):
    """The part of ``prompt`` that child module ``name`` sees (None: it reads no image prompt)."""
    if prompt is None:
        return None
    if not isinstance(prompt.scales, dict):  # inside a spatial transformer: every transformer block reads
        return prompt
    if name not in prompt.scales:
        return None
    return ImagePrompt(prompt.tokens, prompt.scales[name])


def attention_layout(unet) -> Dict[str, Dict[int, int]]:
    """{"down": {block i: attentions}, "up": {...}} of the blocks with attention, from a UNet's config (the mid block
    always has one)."""
    from pmf_jax.models.unet_blocks import per_block

    n = len(unet.down_block_types)
    layers = per_block(unet.layers_per_block, n, "layers_per_block")
    return {"down": {i: layers[i] for i, t in enumerate(unet.down_block_types) if t.startswith("CrossAttn")},
            "up": {i: layers[::-1][i] + 1 for i, t in enumerate(unet.up_block_types) if t.startswith("CrossAttn")}}


def _number(value, where: str):
    if isinstance(value, (bool, str, dict, list, tuple)) or value is None:
        raise PMFInputError(f"ip_adapter_scale{where}={value!r} must be a number")
    # host numbers stay numpy (no device work, no compile); traced or device scalars stay JAX
    value = jnp.asarray(value, jnp.float32) if isinstance(value, jax.Array) else np.asarray(value, np.float32)
    if value.shape != ():
        raise PMFInputError(f"ip_adapter_scale{where} must be a scalar, got shape {value.shape}")
    return value


def expand_scale(unet, scale) -> Dict[str, Any]:
    """``scale`` (a number or diffusers' per-block dict; module docstring) written out in full for ``unet``:
    ``{"down": {"block_i": [s, ...]}, "mid": s, "up": {"block_i": [s, ...]}}`` with a float32 scalar per
    ``attentions_j``. PMFInputError for keys this UNet does not have or lists of the wrong length."""
    layout = attention_layout(unet)
    if not isinstance(scale, dict):
        s = _number(scale, "")
        return {"down": {f"block_{i}": [s] * k for i, k in layout["down"].items()}, "mid": s,
                "up": {f"block_{i}": [s] * k for i, k in layout["up"].items()}}
    unknown = sorted(set(scale) - set(PARTS), key=str)
    if unknown:
        raise PMFInputError(f"ip_adapter_scale: unknown key {unknown[0]!r} (per-block scales use {', '.join(PARTS)})")
    zero = np.zeros((), np.float32)
    mid = scale.get("mid", zero)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise PMFInputError(f"ip_adapter_scale['mid'] needs 1 scale, got {len(mid)}")
        mid = mid[0]
    out = {"mid": _number(mid, "['mid']")}
    for part in ("down", "up"):
        given = scale.get(part, zero)
        blocks = layout[part]
        if not isinstance(given, dict):
            given = {f"block_{i}": given for i in blocks}
        names = {f"block_{i}" for i in blocks}
        bad = sorted(set(given) - names, key=str)
        if bad:
            raise PMFInputError(f"ip_adapter_scale[{part!r}]: {bad[0]!r} is not a {part} block with attention "
                                f"(this UNet's: {', '.join(sorted(names)) or 'none'})")
        out[part] = {}
        for i, count in blocks.items():
            name = f"block_{i}"
            value = given.get(name, zero)
            where = f"[{part!r}][{name!r}]"
            if isinstance(value, (list, tuple)):
                if len(value) == 1:
                    value = list(value) * count
                elif len(value) != count:
                    raise PMFInputError(f"ip_adapter_scale{where} needs {count} scales (one per attention layer), "
                                        f"got {len(value)}")
                out[part][name] = [_number(v, f"{where}[{j}]") for j, v in enumerate(value)]
            else:
                out[part][name] = [_number(value, where)] * count
    return out


def module_scales(unet, scale) -> Dict[str, Any]:
    """``scale`` (as :func:`expand_scale` takes it) keyed like the UNet's modules: ``{"down_blocks_i":
    {"attentions_j": s}, "mid_block": {"attentions_0": s}, "up_blocks_i": {...}}``."""
    full = expand_scale(unet, scale)
    out = {"mid_block": {"attentions_0": full["mid"]}}
    for part in ("down", "up"):
        for name, values in full[part].items():
            out[f"{part}_blocks_{name[len('block_'):]}"] = {f"attentions_{j}": v for j, v in enumerate(values)}
    return out


def check_tokens(tokens, width: int) -> Tuple[int, int, int]:
    """PMFInputError unless ``tokens`` is [B', N, width]; returns its shape."""
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 3 or shape[-1] != width:
        raise PMFInputError(f"ip_tokens must be [B, num_tokens, {width}] (the UNet's cross_attention_dim), got "
                            f"shape {shape}")
    return shape


__all__ = ["ImagePrompt", "PARTS", "attention_layout", "check_tokens", "child_prompt", "expand_scale",
           "module_scales"]
