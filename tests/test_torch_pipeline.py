"""PMFTorchPipeline (diffusers models, diffusers' DDIM) against the JAX RetargetPipeline on the same exported folder,
the same inputs and the same initial noise: one denoising step, the final images, the reference switched off."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convert_fixtures import base_export, base_run, tiny_export, tiny_run  # noqa: F401  (fixtures)
from parity import rel_err
from tiny_sd import KEYPOINTS, tiny_sd  # noqa: F401  (fixture)
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines import RetargetPipeline
from pmf_jax.pose import render_pose
from pmf_jax.reference import ReferenceConfig
from pmf_jax.torch_compat.pipeline import PatchAutoencoder, PMFTorchPipeline

SIZE = 64
N = 2
# One step of a trailing DDIM grid is the whole model at t = 999 (the x0 prediction, unclipped): a model-output check.
ONE_STEP = {"timestep_spacing": "trailing", "clip_sample": False}
STEP_REFERENCE = ReferenceConfig(style_fidelity=0.5, attention_weight=0.6)  # u-row blending, block selection


@pytest.fixture(scope="module")
def inputs():
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    source = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1)
    source[20:44, 24:40] = (0.9, 0.2, 0.2)
    pose = render_pose(KEYPOINTS, SIZE, SIZE, stick_width=1, radius=1)
    latents = np.random.default_rng(0).standard_normal((N, SIZE // 4, SIZE // 4, 48)).astype(np.float32)  # NHWC
    return Image.fromarray((source * 255).astype(np.uint8)), Image.fromarray(pose), latents


def _jax(pipe, inputs, steps, **kwargs):
    source, pose, latents = inputs
    return np.asarray(pipe(source, pose, num_inference_steps=steps, scheduler="ddim", height=SIZE, width=SIZE,
                           num_images=N, latents=latents, pose_kind="skeleton", **kwargs))


def _torch(pipe, inputs, steps, **kwargs):
    source, pose, latents = inputs
    out = pipe(source, pose, num_inference_steps=steps, num_images=N,
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), **kwargs)
    return out.permute(0, 2, 3, 1).numpy() if isinstance(out, torch.Tensor) else out


def _pair(export, mode, one_step: bool):
    jax_pipe = RetargetPipeline.from_pretrained(export, controlnet=export, reference_unet=export if mode == "acm"
                                                else None, mode=mode)
    torch_pipe = PMFTorchPipeline.from_pretrained(export, mode=mode)
    if one_step:
        jax_pipe.scheduler_config.update(ONE_STEP)
        torch_pipe.scheduler = type(torch_pipe.scheduler).from_config(torch_pipe.scheduler.config, **ONE_STEP)
    return jax_pipe, torch_pipe


@pytest.fixture(scope="module")
def one_step(tiny_export, inputs):
    """{"on"/"off": (jax latents, torch latents)} after one DDIM step (fp32), with appearance guidance (3 rows:
    u and a without the reference, c with it). The prompts are empty, so u = a and ε = a + g_a·(c − a): g_a = 0 is
    the model with the reference bank off, g_a = 1.5 guides towards the reference (one compiled program for both)."""
    jax_pipe, torch_pipe = _pair(tiny_export, "acm", one_step=True)
    out = {}
    for name, scale in (("on", 1.5), ("off", 0.0)):
        kw = dict(guidance_scale=2.0, appearance_guidance_scale=scale, reference_config=STEP_REFERENCE,
                  output_type="latent")
        out[name] = (_jax(jax_pipe, inputs, 1, **kw), _torch(torch_pipe, inputs, 1, **kw))
    # the torch "off" is exactly the torch pipeline without a reference bank (mode controlnet_only)
    plain = PMFTorchPipeline.from_pretrained(tiny_export, mode="controlnet_only")
    plain.scheduler = torch_pipe.scheduler
    out["controlnet_only"] = _torch(plain, inputs, 1, guidance_scale=2.0, output_type="latent")
    return out


def test_one_step_matches(one_step):
    for name in ("on", "off"):
        ours, theirs = one_step[name]
        assert rel_err(ours, theirs) <= 1e-4, name  # measured 1.1e-6 (on), 8.7e-7 (off)
    assert rel_err(one_step["off"][1], one_step["controlnet_only"]) <= 1e-6


def test_reference_on_and_off_differ_in_both(one_step, inputs):
    (jax_on, torch_on), (jax_off, torch_off) = one_step["on"], one_step["off"]
    assert rel_err(jax_on, jax_off) > 0.05 and rel_err(torch_on, torch_off) > 0.05
    assert rel_err(jax_on, inputs[2]) > 0.5  # the step did move the latents


def test_final_images_match(tiny_export, inputs):
    """8 DDIM steps (leading grid, x0 clipped, as the export's scheduler config says), text guidance rows [u, c] with
    style fidelity 0.5 on u, the ControlNet reading the bank, the reference written once at t = 0: the images agree
    within 1e-4 (max abs, [0, 1] scale)."""
    jax_pipe, torch_pipe = _pair(tiny_export, "acm", one_step=False)
    reference = ReferenceConfig(style_fidelity=0.5, controlnet_reads_reference=True, reference_timestep="zero")
    kw = dict(guidance_scale=2.0, reference_config=reference, output_type="np")
    ours, theirs = _jax(jax_pipe, inputs, 8, **kw), _torch(torch_pipe, inputs, 8, **kw)
    assert ours.shape == theirs.shape == (N, SIZE, SIZE, 3)
    # measured: max abs 7.7e-6, relative 2.6e-6
    assert np.abs(ours - theirs).max() <= 1e-4 and rel_err(ours, theirs) <= 1e-4
    assert np.abs(ours[0] - ours[1]).mean() > 0.01  # two different noises, two different images
    pil = torch_pipe(inputs[0], inputs[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(pil) == 1 and pil[0].size == (SIZE, SIZE)


def test_sd_base_export_step_matches(base_export, inputs):
    """An SD export (VAE, CLIP text encoder and tokenizer, the base's PNDM scheduler config read as DDIM): one step
    with a prompt, decoded to images by the VAE, agrees between torch and JAX."""
    jax_pipe, torch_pipe = _pair(base_export, "acm", one_step=True)
    source, pose, _ = inputs
    latents = np.random.default_rng(2).standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    kw = dict(prompt="a man", negative_prompt="an", guidance_scale=3.0, output_type="np")
    ours = np.asarray(jax_pipe(source, pose, num_inference_steps=1, scheduler="ddim", height=SIZE, width=SIZE,
                               latents=latents, pose_kind="skeleton", **kw))
    theirs = torch_pipe(source, pose, num_inference_steps=1,
                        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), **kw)
    assert rel_err(ours, theirs) <= 1e-4 and np.abs(ours - theirs).max() <= 1e-4  # measured 1.5e-6, 6.7e-6


def test_jax_pipeline_takes_the_exports_parts_and_settings(tiny_export, inputs, tmp_path):
    """``RetargetPipeline.from_pretrained(export)`` alone: the export's ControlNet, reference UNet, mode and reference
    settings (pmf_config.json) — the same images as passing them explicitly; other settings give other images."""
    import json
    import shutil

    from pmf_jax.convert import read_pmf_config

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    config = read_pmf_config(export)
    assert config["mode"] == "acm"
    trained = dict(config["reference"], fusion_blocks="midup", style_fidelity=0.5)
    (export / "pmf_config.json").write_text(json.dumps(dict(config, reference=trained)))
    pipe = RetargetPipeline.from_pretrained(export)
    assert pipe.mode == "acm" and pipe.reference_config == ReferenceConfig(**trained)
    explicit, _ = _pair(tiny_export, "acm", one_step=False)
    ours = _jax(pipe, inputs, 2, output_type="latent")
    np.testing.assert_array_equal(ours, _jax(explicit, inputs, 2, output_type="latent",
                                             reference_config=ReferenceConfig(**trained)))
    assert rel_err(ours, _jax(explicit, inputs, 2, output_type="latent")) > 1e-3  # the defaults differ
    assert RetargetPipeline.from_pretrained(export, mode="controlnet_only").mode == \
        "controlnet_only"


def test_patch_autoencoder_matches_jax():
    from pmf_jax.models.identity_vae import IdentityAutoencoder

    x = np.random.default_rng(1).standard_normal((2, 8, 12, 3)).astype(np.float32)
    ae = IdentityAutoencoder(patch_size=4)
    ours = np.asarray(ae.apply({}, x, method=ae.encode)[0])
    theirs = PatchAutoencoder(4).encode(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, theirs)
    back = PatchAutoencoder(4).decode(torch.from_numpy(theirs).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, x)


def test_errors(tiny_export, inputs, tmp_path):
    with pytest.raises(PMFInputError, match="not an exported PMF folder"):
        PMFTorchPipeline.from_pretrained(tmp_path)
    pipe = PMFTorchPipeline.from_pretrained(tiny_export, mode="reference_only")
    with pytest.raises(PMFInputError, match="no text encoder"):
        pipe(inputs[0], inputs[1], prompt="a person", num_inference_steps=1)
    with pytest.raises(PMFInputError, match="latents have shape"):
        pipe(inputs[0], inputs[1], num_inference_steps=1, latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(PMFInputError, match="multiples"):
        pipe(inputs[0], inputs[1], num_inference_steps=1, height=62, width=62)


def test_export_sampling_defaults(tiny_export):
    """Without arguments the PyTorch pipeline samples as `pmf retarget` does: the export's scheduler, steps and
    guidance scale (pmf_config.json "sampling"); an explicit scheduler= still wins."""
    import json

    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    given = json.loads((Path(tiny_export) / "pmf_config.json").read_text())["sampling"]
    pipe = PMFTorchPipeline.from_pretrained(tiny_export)
    assert pipe.sampling == {"steps": given["steps"], "guidance_scale": given["guidance_scale"]}
    assert given["scheduler"] == "ddim" and isinstance(pipe.scheduler, DDIMScheduler)
    assert (given["steps"], given["guidance_scale"]) != (20, 7.5)  # the built-in defaults would not pass
    assert isinstance(PMFTorchPipeline.from_pretrained(tiny_export, scheduler="euler").scheduler,
                      EulerDiscreteScheduler)
