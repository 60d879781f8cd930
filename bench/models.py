"""The models of the benchmarks: SD1.5 and tiny configs, and the same models built on both sides with random weights.

Speed does not depend on the weights' values, so both sides build their models from the same config dicts (keys are
diffusers/transformers constructor arguments; ours read them with ``from_config``) with their own random
initialisation; nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict

# ------------------------------------------------------------------------------------------------------ configs
# Stable Diffusion 1.5 (859.52M UNet, 361.28M ControlNet, 83.65M VAE, 123.06M CLIP ViT-L/14 text encoder). Keys are
# diffusers/transformers constructor arguments; our models read the same dicts with ``from_config``.
_SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                  cross_attention_dim=768, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15 = dict(
    unet=_SD15_UNET,
    controlnet=dict({k: v for k, v in _SD15_UNET.items() if k != "up_block_types"},
                    conditioning_embedding_out_channels=(16, 32, 96, 256)),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    image=512)

# Tiny models for CPU runs (the tests' tiny SD layout): 64x64 images, 8x8 latents, and 16x16 latents for the UNet.
_TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=32,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY = dict(
    unet=_TINY_UNET,
    controlnet=dict({k: v for k, v in _TINY_UNET.items() if k != "up_block_types"},
                    conditioning_embedding_out_channels=(8, 8, 16, 16)),
    vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    clip=dict(vocab_size=64, hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
    image=64)
# The token ids of the synthetic tokenizer below (both configs use them).
_TOKEN_IDS = dict(bos_token_id=53, eos_token_id=54, pad_token_id=54)


def model_configs(tiny: bool) -> Dict[str, Any]:
    cfg = dict(TINY if tiny else SD15)
    cfg["clip"] = dict(cfg["clip"], **_TOKEN_IDS)
    return cfg


# ---------------------------------------------------------------------------------------------------------- models

def jax_model(kind: str, config: Dict[str, Any], *, dtype, param_dtype=None, backend: str = "auto", seed: int = 0):
    """(module, params) of one of our models from a config dict, with random weights (see :func:`random_params`)."""
    from pmf_jax.io.registry import model_class

    cls = model_class({"unet": "UNet2DConditionModel", "controlnet": "ControlNetModel", "vae": "AutoencoderKL",
                       "clip": "CLIPTextModel"}[kind])
    module = cls.from_config(config, dtype=dtype, attention_backend=backend)
    return module, random_params(module.abstract_params(), seed, param_dtype or dtype)


def random_params(abstract, seed: int, dtype):
    """Parameters shaped like ``abstract`` (a tree of ShapeDtypeStructs): kernels and embeddings normal with
    1/sqrt(fan-in) scale, norm scales 1, biases 0 — activations stay O(1), as with the models' own init, without
    compiling an init program per model (tens of seconds on a CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "bias":
            value = np.zeros(spec.shape, np.float32)
        elif name == "scale":
            value = np.ones(spec.shape, np.float32)
        else:
            fan_in = int(np.prod(spec.shape[:-1])) if len(spec.shape) > 1 else 1
            value = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(fan_in ** -0.5)
        return jnp.asarray(value).astype(dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def torch_model(kind: str, config: Dict[str, Any], *, device, dtype):
    """The diffusers/transformers module for the same config, random weights made on ``device``, in eval mode."""
    import torch

    with torch.device(device):
        if kind == "clip":
            import transformers

            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
        else:
            import diffusers

            # the models are cast whole on purpose (as diffusers' own pipelines do with torch_dtype): no warning
            diffusers.utils.logging.set_verbosity_error()
            cls = {"unet": diffusers.UNet2DConditionModel, "controlnet": diffusers.ControlNetModel,
                   "vae": diffusers.AutoencoderKL}[kind]
            model = cls(**config)
    return model.to(device=device, dtype=dtype).eval()


def param_count(tree_or_module) -> int:
    if hasattr(tree_or_module, "parameters"):
        return sum(p.numel() for p in tree_or_module.parameters())
    import jax

    return sum(x.size for x in jax.tree_util.tree_leaves(tree_or_module))


def make_tokenizer():
    """A CLIP tokenizer with a synthetic vocabulary (lower-case letters; bos 53, eos 54), 77 tokens per prompt.

    Token ids do not change the text encoder's cost, and a synthetic vocabulary needs no download.
    """
    from pmf_jax.models.letter_tokenizer import letter_tokenizer

    return letter_tokenizer(Path(tempfile.mkdtemp(prefix="pmf_bench_tokenizer_")), model_max_length=77)
