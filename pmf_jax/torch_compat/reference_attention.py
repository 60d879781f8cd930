"""Reference attention for diffusers PyTorch models: the same write/read semantics as :mod:`pmf_jax.reference`.

Install processors on the self-attention (``attn1``) of every transformer block of a UNet or ControlNet; a shared
:class:`ReferenceState` says whether they write (store ``norm1(x)``, the processor's input) or read
(K, V from ``cat([norm1(x), bank], dim=1)``, projected by the block's own to_k/to_v).

    state = ReferenceState()
    install_reference_attention(reference_unet, state)
    install_reference_attention(unet, state)
    state.write(); reference_unet(ref_latents, t, ctx)
    state.read(config, ref_mix=None); unet(x, t, ctx)
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from pmf_jax.reference import ReferenceConfig, reading_blocks


@dataclasses.dataclass
class ReferenceState:
    """Shared by every processor: the mode, the bank {block path: [B, HW, C]} and the read settings."""

    mode: str = "off"  # "off" | "write" | "read"
    bank: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    reading: Optional[set] = None  # block paths that read; None = every block with a bank entry
    ref_mix: Optional[torch.Tensor] = None  # [B]: 1 = plain attention, 0 = read

    def write(self):
        self.mode, self.bank = "write", {}

    def read(self, config: Optional[ReferenceConfig] = None, ref_mix=None, uncond_mask=None):
        self.mode = "read"
        self.reading = None
        if config is not None:
            paths = {_flax_path(name): name for name in self.bank}
            entries = [(path, self.bank[name].shape[-1]) for path, name in paths.items()]
            self.reading = {paths[p] for p in reading_blocks(entries, config)}
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
