"""Tiny IP-Adapters in the public key format, the tiny CLIP image encoders, and diffusers' own loader, shared by the
IP-Adapter tests. Reuse the fixture from any test module::

    from ip_adapter_fixtures import tiny_ip  # noqa: F401  (the pytest fixture)

(RECONSTRUCTED by the training helper, which overwrote this file by mistake: the functions moved here from
tests/test_ip_adapter_models.py are verbatim; ``load_into_diffusers`` returns the pipeline, and the ``tiny_ip``
fixture is a reconstruction from its uses in tests/test_ip_adapter_pipeline.py — check it.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tiny_sd import CLIP_DIM, TinySD, tiny_sd  # noqa: F401  (the pytest fixture)

EMBED = 24      # the tiny image encoder's projection_dim (IP-Adapter's input) and hidden size for Plus's input
PLUS_HIDDEN = 128  # 2 heads of 64 (diffusers reads heads = to_q rows / 64)
TOKENS = 4      # diffusers builds every (non-Plus) IP-Adapter with 4 tokens


def tiny_vision_config(**overrides):
    import transformers

    config = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=30,
                  patch_size=6, projection_dim=EMBED, hidden_act="gelu")
    config.update(overrides)
    return transformers.CLIPVisionConfig(**config)


def torch_vision(config, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # norms and biases off their init values, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rand(rng, shape, name):
    if name.endswith("weight") and len(shape) == 1:
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)  # LayerNorm scales
    fan_in = shape[-1] if len(shape) == 2 else 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def image_proj_shapes(kind, width=CLIP_DIM):
    """The public key layout of ``image_proj`` (the original IP-Adapter code's module names), torch shapes, written
    out here independently of our modules."""
    if kind == "ip_adapter":
        return {"proj.weight": (TOKENS * width, EMBED), "proj.bias": (TOKENS * width,), "norm.weight": (width,),
                "norm.bias": (width,)}
    h = PLUS_HIDDEN
    shapes = {"latents": (1, TOKENS, h), "proj_in.weight": (h, EMBED), "proj_in.bias": (h,),
              "proj_out.weight": (width, h), "proj_out.bias": (width,), "norm_out.weight": (width,),
              "norm_out.bias": (width,)}
    for i in range(4):
        for norm in ("norm1", "norm2"):
            shapes.update({f"layers.{i}.0.{norm}.weight": (h,), f"layers.{i}.0.{norm}.bias": (h,)})
        shapes.update({f"layers.{i}.0.to_q.weight": (h, h), f"layers.{i}.0.to_kv.weight": (2 * h, h),
                       f"layers.{i}.0.to_out.weight": (h, h), f"layers.{i}.1.0.weight": (h,),
                       f"layers.{i}.1.0.bias": (h,), f"layers.{i}.1.1.weight": (4 * h, h),
                       f"layers.{i}.1.3.weight": (h, 4 * h)})
    return shapes


def load_into_diffusers(unet, adapter):
    """diffusers' public loader (``pipeline.load_ip_adapter``: its file reader, key conversion, modules, processors)
    on a pipeline around ``unet``; ``adapter``: a safetensors path or a nested state dict. Returns the pipeline
    (``.unet`` is ``unet``, now with the adapter; ``set_ip_adapter_scale`` sets its scale)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
                                             safety_checker=None, feature_extractor=None, image_encoder=None,
                                             requires_safety_checker=False)
    if isinstance(adapter, dict):
        pipe.load_ip_adapter(adapter, subfolder="", weight_name="", image_encoder_folder=None, low_cpu_mem_usage=False)
    else:
        adapter = Path(adapter)
        pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None,
                             low_cpu_mem_usage=False, local_files_only=True)
    return pipe


def diffusers_cross_attentions(unet):
    """[(processor name without .processor, inner width)] of the attn2 processors, in attn_processors order."""
    return [(name[:-len(".processor")], unet.get_submodule(name[:-len(".processor")]).to_k.out_features)
            for name in unet.attn_processors if name.endswith("attn2.processor")]


def public_state(kind, unet, seed=0):
    """A random adapter in the public flat key format for ``unet``'s cross-attentions (numbered 1, 3, ...)."""
    rng = np.random.default_rng(seed)
    state = {f"image_proj.{k}": rand(rng, shape, k) for k, shape in image_proj_shapes(kind).items()}
    for i, (_, inner) in enumerate(diffusers_cross_attentions(unet)):
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{name}.weight"] = rand(rng, (inner, CLIP_DIM), name)
    return state


def nested(state):
    import torch

    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, rest = key.split(".", 1)
        out[group][rest] = torch.from_numpy(value)
    return out


@dataclasses.dataclass(frozen=True)
class TinyIP:
    """sd: the tiny SD folders; adapter: an IP-Adapter file for its UNet (4 cross-attentions) in h94/IP-Adapter's
    layout, ``<root>/models/ip-adapter_tiny.safetensors`` beside ``models/image_encoder/`` (image_encoder: a tiny
    transformers CLIPVisionModelWithProjection, 30 px, projection_dim and hidden_size EMBED); plus: an IP-Adapter
    Plus file beside it (reads the encoder's hidden_states[-2])."""

    sd: TinySD
    root: Path
    adapter: Path
    image_encoder: Path
    plus: Path


def build_tiny_ip(root: Path, sd: TinySD) -> TinyIP:
    import diffusers
    from safetensors.numpy import save_file

    models = Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    # hidden_size EMBED too: Plus's projection reads the hidden states
    torch_vision(tiny_vision_config(hidden_size=EMBED)).save_pretrained(models / "image_encoder")
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd.sd / "unet")
    adapter, plus = models / "ip-adapter_tiny.safetensors", models / "ip-adapter-plus_tiny.safetensors"
    save_file(public_state("ip_adapter", unet), str(adapter), metadata={"format": "pt"})
    save_file(public_state("plus", unet, seed=1), str(plus), metadata={"format": "pt"})
    return TinyIP(sd, Path(root), adapter, models / "image_encoder", plus)


_BUILT = {}


@pytest.fixture(scope="session")
def tiny_ip(tiny_sd, tmp_path_factory) -> TinyIP:  # noqa: F811
    """The tiny adapter and image encoder for the tiny SD folders, built once per test session."""
    if "ip" not in _BUILT:
        _BUILT["ip"] = build_tiny_ip(tmp_path_factory.mktemp("tiny_ip"), tiny_sd)
    return _BUILT["ip"]
