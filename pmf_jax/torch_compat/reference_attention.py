"""Reference attention and reference AdaIN for diffusers PyTorch models: the same write/read semantics as
:mod:`pmf_jax.reference`.

Install processors on the self-attention (``attn1``) of every transformer block of a UNet or ControlNet; a shared
:class:`ReferenceState` says whether they write (store ``norm1(x)``, the processor's input) or read
(K, V from ``cat([norm1(x), bank], dim=1)``, projected by the block's own to_k/to_v). Reference AdaIN
(:func:`install_reference_adain`, UNets only): forward hooks after every layer of the down and up blocks (the
transformer of a cross-attention block's layer, else its resnet) and after the mid block write the per-channel mean
and variance of the hidden states, or renormalise them to the written ones.

    state = ReferenceState()
    for model in (reference_unet, unet):
        install_reference_attention(model, state)
        install_reference_adain(model, state)
    state.write(); reference_unet(ref_latents, t, ctx)
    state.read(config, ref_mix=None); unet(x, t, ctx)
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from pmf_jax.reference import ADAIN, ReferenceConfig, adain_reading, reading_blocks

ADAIN_EPS = 1e-6  # as pmf_jax.models.unet_blocks.ADAIN_EPS (diffusers' reference AdaIN)


@dataclasses.dataclass
class ReferenceState:
    """Shared by every processor and hook: the mode, the bank {block path: [B, HW, C]}, the AdaIN statistics
    {(block, "adain_j" | "adain"): (mean, var) [B, C, 1, 1]} and the read settings."""

    mode: str = "off"  # "off" | "write" | "read"
    bank: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    reading: Optional[set] = None  # block paths that read; None = every block with a bank entry
    ref_mix: Optional[torch.Tensor] = None  # [B]: 1 = plain model, 0 = read
    adain: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    adain_reading: Optional[set] = None  # AdaIN keys applied; None = every written one

    def write(self):
        self.mode, self.bank, self.adain = "write", {}, {}

    def read(self, config: Optional[ReferenceConfig] = None, ref_mix=None, uncond_mask=None):
        """Read mode; ``config`` selects the reading blocks and AdaIN places as :func:`pmf_jax.reference.select_bank`
        does (None: every written entry)."""
        self.mode = "read"
        self.reading = self.adain_reading = None
        if config is not None:
            paths = {_flax_path(name): name for name in self.bank}
            entries = [(path, self.bank[name].shape[-1]) for path, name in paths.items()]
            self.reading = {paths[p] for p in reading_blocks(entries, config)} if config.uses_attention else set()
            self.adain_reading = adain_reading(self.adain, config) if config.uses_adain else set()
            if uncond_mask is not None and config.style_fidelity > 0:
                style = config.style_fidelity * torch.as_tensor(uncond_mask, dtype=torch.float32)
                ref_mix = style if ref_mix is None else 1 - (1 - torch.as_tensor(ref_mix).float()) * (1 - style)
        self.ref_mix = None if ref_mix is None else torch.as_tensor(ref_mix, dtype=torch.float32)

    def off(self):
        self.mode = "off"


def _flax_path(dotted: str):
    """``down_blocks.0.attentions.1.transformer_blocks.0`` -> ("down_blocks_0", "attentions_1", "transformer_blocks_0")."""
    out = []
    for part in dotted.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _attend(attn, hidden, kv):
    b = hidden.shape[0]
    q, k, v = attn.to_q(hidden), attn.to_k(kv), attn.to_v(kv)
    split = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1])
    return attn.to_out[1](attn.to_out[0](out))


class ReferenceAttnProcessor:
    """Processor for one block's ``attn1``; ``name`` is the block's dotted module path (bank key)."""

    def __init__(self, name: str, state: ReferenceState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        if state.mode == "write":
            state.bank[self.name] = hidden_states
        if encoder_hidden_states is not None:  # only_cross_attention block: no self-attention to extend
            return _attend(attn, hidden_states, encoder_hidden_states)
        plain = lambda: _attend(attn, hidden_states, hidden_states)  # noqa: E731
        ref = state.bank.get(self.name) if state.mode == "read" else None
        if ref is None or (state.reading is not None and self.name not in state.reading):
            return plain()
        if ref.shape[0] != hidden_states.shape[0]:  # sample-major rows, as pmf_jax.rows.expand_rows
            ref = ref.repeat_interleave(hidden_states.shape[0] // ref.shape[0], dim=0)
        out = _attend(attn, hidden_states, torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1))
        if state.ref_mix is not None:
            w = state.ref_mix.to(out.dtype).view(-1, 1, 1)
            out = w * plain() + (1 - w) * out
        return out


def _adain(hidden, mean_ref, var_ref, ref_mix):
    """Reference AdaIN of hidden [B, C, H, W] to the statistics [B', C, 1, 1] (B' dividing B, sample-major rows);
    ref_mix [B] or None blends the plain hidden states back in."""
    if mean_ref.shape[0] != hidden.shape[0]:
        repeat = hidden.shape[0] // mean_ref.shape[0]
        mean_ref, var_ref = (r.repeat_interleave(repeat, dim=0) for r in (mean_ref, var_ref))
    x = hidden.float()
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    std, std_ref = (torch.clamp(v.float(), min=ADAIN_EPS).sqrt() for v in (var, var_ref))
    out = (x - mean) / std * std_ref + mean_ref.float()
    if ref_mix is not None:
        w = ref_mix.to(out.dtype).view(-1, 1, 1, 1)
        out = w * x + (1 - w) * out
    return out.to(hidden.dtype)


def _adain_hook(key: Tuple[str, str], state: ReferenceState):
    """A forward hook for the module whose output is AdaIN place ``key``: records or renormalises that output
    (a tensor, or a diffusers output tuple whose first element is the hidden states)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if state.mode == "write":
            var, mean = torch.var_mean(hidden.float(), dim=(2, 3), keepdim=True, correction=0)
            state.adain[key] = (mean, var)
            return None
        stats = state.adain.get(key) if state.mode == "read" else None
        if stats is None or (state.adain_reading is not None and key not in state.adain_reading):
            return None
        hidden = _adain(hidden, *stats, state.ref_mix)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    return hook


def install_reference_adain(unet, state: ReferenceState) -> int:
    """Forward hooks for reference AdaIN on a diffusers UNet2DConditionModel: after layer j of every down and up block
    (``attentions[j]`` in a cross-attention block, else ``resnets[j]``; key ``(block, "adain_j")``) and after the mid
    block (``("mid_block", "adain")``). Returns the number of places hooked."""
    if not hasattr(unet, "up_blocks"):
        raise TypeError(f"reference AdaIN hooks a UNet (down, mid and up blocks), not a {type(unet).__name__}")
    count = 0
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind)):
            layers = getattr(block, "attentions", None) or block.resnets
            for j, layer in enumerate(layers):
                layer.register_forward_hook(_adain_hook((f"{kind}_{i}", f"{ADAIN}_{j}"), state))
                count += 1
    unet.mid_block.register_forward_hook(_adain_hook(("mid_block", ADAIN), state))
    return count + 1


def install_reference_attention(model, state: ReferenceState) -> int:
    """Sets a :class:`ReferenceAttnProcessor` on every transformer block's attn1 of a diffusers UNet/ControlNet;
    the other attention layers keep their processors. Returns the number of blocks hooked."""
    processors = {}
    count = 0
    for name, proc in model.attn_processors.items():
        if name.endswith(".attn1.processor"):
            processors[name] = ReferenceAttnProcessor(name[: -len(".attn1.processor")], state)
            count += 1
        else:
            processors[name] = proc
    model.set_attn_processor(processors)
    return count
