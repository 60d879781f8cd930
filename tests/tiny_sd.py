"""Tiny random Stable Diffusion folders written by diffusers/transformers, for pipeline, CLI, eval and conversion
tests. Reuse the session fixture from any test module::

    from tiny_sd import tiny_sd  # noqa: F401  (the pytest fixture)

    def test_x(tiny_sd):
        RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet, ...)

Layout under one temporary folder (64x64 images, 8x8x4 latents; the tokenizer knows lower-case letters only):
  sd/            StableDiffusionPipeline.save_pretrained: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (PNDM config,
                 as SD1.5 ships) model_index.json
  controlnet/    ControlNetModel (OpenPose-style, conditioning 64x64 -> 8x8)
  reference_unet/  a second UNet2DConditionModel (the ACM), other random weights
  ip2p/          StableDiffusionInstructPix2PixPipeline (8-channel UNet; same VAE, text encoder, tokenizer)
  source.png     64x64 RGB picture;  pose.png: OpenPose skeleton 64x64;  pose.json: the same keypoints
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pmf_jax.models.letter_tokenizer import letter_tokenizer

SIZE = 64
CLIP_DIM = 32
UNET = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=CLIP_DIM)
CONTROLNET = dict({k: v for k, v in UNET.items() if k not in ("up_block_types", "sample_size")},
                  conditioning_embedding_out_channels=(4, 8, 8, 8))
VAE = dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
           sample_size=SIZE)
# A standing person, in pixels of the 64x64 canvas (x, y, confidence); two joints missing.
KEYPOINTS = np.array([
    [32, 10, 1], [32, 18, 1], [26, 18, 1], [22, 28, 1], [20, 38, 1], [38, 18, 1], [42, 28, 1], [44, 38, 1],
    [28, 38, 1], [27, 50, 1], [26, 60, 1], [36, 38, 1], [37, 50, 1], [38, 60, 1], [30, 8, 1], [34, 8, 1],
    [0, 0, 0], [0, 0, 0]], np.float32)


@dataclasses.dataclass(frozen=True)
class TinySD:
    root: Path
    sd: Path
    controlnet: Path
    reference_unet: Path
    ip2p: Path
    source: Path
    pose: Path
    pose_json: Path


def _randomize(model, seed: int, scale: float):
    """Random weights everywhere (ControlNet zero convs included), biases and norms around their usual values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise * scale / max(1.0, (p[0].numel() / 9) ** 0.5))
    return model.eval()


def build_tiny_sd(root: Path) -> TinySD:
    import torch
    import transformers
    from diffusers import (AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from PIL import Image

    from pmf_jax.constants import SD15_SCHEDULER_CONFIG
    from pmf_jax.pose import render_pose, write_openpose_json

    root = Path(root)
    torch.manual_seed(0)
    tokenizer = letter_tokenizer(root / "_tokenizer")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=CLIP_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=16, bos_token_id=53, eos_token_id=54, pad_token_id=54)).eval()
    vae = _randomize(AutoencoderKL(**VAE), seed=1, scale=0.6)
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    StableDiffusionPipeline(unet=_randomize(UNet2DConditionModel(**UNET), seed=2, scale=0.5), **common
                            ).save_pretrained(root / "sd")
    _randomize(UNet2DConditionModel(**UNET), seed=3, scale=0.5).save_pretrained(root / "reference_unet")
    _randomize(ControlNetModel(**CONTROLNET), seed=4, scale=0.5).save_pretrained(root / "controlnet")
    StableDiffusionInstructPix2PixPipeline(
        unet=_randomize(UNet2DConditionModel(**dict(UNET, in_channels=8)), seed=5, scale=0.5), **common
    ).save_pretrained(root / "ip2p")

    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    picture = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1)
    picture[20:44, 24:40] = (0.9, 0.2, 0.2)  # a "person"
    Image.fromarray((picture * 255).astype(np.uint8)).save(root / "source.png")
    Image.fromarray(render_pose(KEYPOINTS, SIZE, SIZE, stick_width=1, radius=1)).save(root / "pose.png")
    write_openpose_json(root / "pose.json", KEYPOINTS, height=SIZE, width=SIZE)
    return TinySD(root, root / "sd", root / "controlnet", root / "reference_unet", root / "ip2p", root / "source.png",
                  root / "pose.png", root / "pose.json")


_BUILT = {}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> TinySD:
    """The tiny folders, built once per test session (shared by every module that imports this fixture)."""
    if "sd" not in _BUILT:
        _BUILT["sd"] = build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
    return _BUILT["sd"]
