"""Sampling pipelines: parity with diffusers' torch pipelines on the same tiny weights, guidance without
recompilation, determinism, and the host-side input handling (buckets, letterbox, poses)."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from compile_counter import CompileCounter
from parity import rel_err, to_nchw, to_nhwc
from pmf_jax.commands import options
from pmf_jax.errors import PMFInputError
from pmf_jax.pose import COLORS
from pmf_jax.pipelines import MODES, EnhancePipeline, RetargetPipeline
from pmf_jax.pipelines.common import nested_guidance
from pmf_jax.pipelines.images import bucket_size, check_resolution, content_box, fit_image, load_image
from pmf_jax.schedulers import SCHEDULERS
from tiny_sd import KEYPOINTS, tiny_sd  # noqa: F401  (fixture)

TOL = 1e-4


def _latents(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 4)).astype(np.float32)


def _ddim_trailing(pipe):
    """DDIM with "trailing" spacing: one step starts at t=999, where the guided ε dominates the result."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnet_only_step_matches_diffusers(tiny_sd):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch_pipe = _ddim_trailing(StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd.sd, controlnet=ControlNetModel.from_pretrained(tiny_sd.controlnet), safety_checker=None,
        requires_safety_checker=False))
    latents = _latents()
    with torch.no_grad():
        want = to_nhwc(torch_pipe("a man", image=Image.open(tiny_sd.pose), negative_prompt="an", num_inference_steps=1,
                                  guidance_scale=7.5, controlnet_conditioning_scale=0.8, height=64, width=64,
                                  num_images_per_prompt=2, latents=to_nchw(latents), output_type="latent").images)
    pipe = RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet, mode="controlnet_only")
    pipe.scheduler_config["timestep_spacing"] = "trailing"
    got = pipe(tiny_sd.source, tiny_sd.pose, prompt="a man", negative_prompt="an", num_inference_steps=1,
               guidance_scale=7.5, controlnet_conditioning_scale=0.8, scheduler="ddim", height=64, width=64,
               num_images=2, latents=latents, output_type="latent")
    err = rel_err(got, want)
    print(f"controlnet_only one DDIM step vs diffusers: rel err {err:.2e}")
    assert err <= TOL
    assert rel_err(latents, want) > 0.5  # the step did move the latents


def test_enhance_step_matches_diffusers(tiny_sd):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    torch_pipe = _ddim_trailing(StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_sd.ip2p, safety_checker=None, requires_safety_checker=False))
    source, latents = Image.open(tiny_sd.source), _latents(1, seed=1)
    with torch.no_grad():
        want = to_nhwc(torch_pipe("make it blue", image=source, num_inference_steps=1, guidance_scale=7.5,
                                  image_guidance_scale=1.5, latents=to_nchw(latents), output_type="latent").images)
    pipe = EnhancePipeline.from_pretrained(tiny_sd.ip2p)
    pipe.scheduler_config["timestep_spacing"] = "trailing"
    got = pipe(source, "make it blue", num_inference_steps=1, guidance_scale=7.5, image_guidance_scale=1.5,
               scheduler="ddim", latents=latents, height=64, width=64, output_type="latent")
    err = rel_err(got, want)
    print(f"InstructPix2Pix one DDIM step vs diffusers: rel err {err:.2e}")
    assert err <= TOL


def test_acm_guidance_and_seed_do_not_recompile_and_are_deterministic(tiny_sd):
    pipe = RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet,
                                            reference_unet=tiny_sd.reference_unet, mode="acm")
    kw = dict(num_inference_steps=2, height=64, width=64, num_images=2, output_type="np")
    first = pipe(tiny_sd.source, tiny_sd.pose, prompt="a man", seed=0, guidance_scale=7.5,
                 appearance_guidance_scale=2.0, **kw)
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.float32
    programs = pipe.compiled_programs()
    assert programs == 3  # prologue, loop, epilogue
    with CompileCounter() as counter:
        other = pipe(tiny_sd.source, tiny_sd.pose, prompt="a woman", negative_prompt="an", seed=1,
                     guidance_scale=3.0, appearance_guidance_scale=1.5, controlnet_conditioning_scale=0.5, **kw)
        no_reference = pipe(tiny_sd.source, tiny_sd.pose, prompt="a man", seed=0, guidance_scale=7.5,
                            appearance_guidance_scale=0.0, **kw)
        again = pipe(tiny_sd.source, tiny_sd.pose, prompt="a man", seed=0, guidance_scale=7.5,
                     appearance_guidance_scale=2.0, **kw)
        # Two pairs in one call (the same program: 2 images), one seed per image; the keypoints of the JSON are
        # drawn exactly as the skeleton image, and seed [.., 0] reproduces image 0 of the single-seed call.
        pairs = pipe([tiny_sd.source, tiny_sd.source], [tiny_sd.pose, tiny_sd.pose_json], prompt="a man",
                     seed=[5, 0], guidance_scale=7.5, appearance_guidance_scale=2.0, **dict(kw, num_images=1))
    assert counter.count == 0, "new prompts, seeds, scales or inputs must not compile anything"
    assert pipe.compiled_programs() == programs
    np.testing.assert_array_equal(again, first)           # same seed and settings: the same images
    assert np.abs(other - first).mean() > 1e-2             # another seed/prompt/scales: other images
    assert np.abs(no_reference - first).mean() > 1e-3      # appearance scale 0 drops the reference's effect
    assert np.abs(first[0] - first[1]).mean() > 1e-2       # every image gets its own noise
    np.testing.assert_array_equal(pairs[1], first[0])
    assert np.abs(pairs[0] - first[0]).mean() > 1e-2


def test_pipeline_argument_errors(tiny_sd):
    from pmf_jax.io import from_pretrained

    unet, cn = from_pretrained(tiny_sd.sd, "unet"), from_pretrained(tiny_sd.controlnet)
    with pytest.raises(PMFInputError, match="needs a reference UNet"):
        RetargetPipeline(unet, cn, mode="acm")
    with pytest.raises(PMFInputError, match="mode="):
        RetargetPipeline(unet, cn, mode="nope")
    with pytest.raises(PMFInputError, match="acm"):
        RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet, mode="acm")
    with pytest.raises(PMFInputError, match="ControlNetModel"):
        RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.reference_unet, mode="controlnet_only")
    with pytest.raises(PMFInputError, match="in_channels must be"):
        EnhancePipeline(unet)
    with pytest.raises(PMFInputError, match="does not fit this UNet: cross_attention_dim 7 vs the UNet's"):
        RetargetPipeline(unet, (cn[0].clone(cross_attention_dim=7), cn[1]), mode="controlnet_only")
    pipe = RetargetPipeline(unet, cn, mode="controlnet_only")  # no VAE, no text encoder
    args = (tiny_sd.source, tiny_sd.pose)
    with pytest.raises(PMFInputError, match="no text encoder"):
        pipe(*args, prompt="a man", height=64, width=64)
    with pytest.raises(PMFInputError, match="multiple of 8"):
        pipe(*args, height=60, width=64)
    with pytest.raises(PMFInputError, match="appearance guidance"):
        pipe(*args, appearance_guidance_scale=2.0, height=64, width=64)
    with pytest.raises(PMFInputError, match="latents have shape"):
        pipe(*args, latents=np.zeros((1, 8, 8, 4)), height=64, width=64)
    with pytest.raises(PMFInputError, match="unknown scheduler"):
        pipe(*args, scheduler="pndm", height=64, width=64)
    with pytest.raises(PMFInputError, match="seed"):
        pipe(*args, seed=-1, height=64, width=64)


def test_building_pipelines_leaves_the_compilation_cache_alone(tiny_sd):
    """Library constructors change no global state: only entry points (pmf_jax.runtime.setup) turn the persistent
    compilation cache on."""
    before = jax.config.jax_compilation_cache_dir
    RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet, mode="controlnet_only")
    EnhancePipeline.from_pretrained(tiny_sd.ip2p)
    assert jax.config.jax_compilation_cache_dir == before


def test_abstract_inputs_are_the_batch_a_call_builds(tiny_sd, monkeypatch):
    """What an ahead-of-time compile (pmf scaling) lowers with is what a call hands the programs."""
    pipe = RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet,
                                            reference_unet=tiny_sd.reference_unet, mode="acm")
    seen = {}

    def capture(static, batch, scalars, **_):  # records the call instead of running it
        seen.update(static=static, batch=batch, scalars=scalars)
        return np.zeros((2, 64, 64, 3), np.float32)

    monkeypatch.setattr(pipe, "run_programs", capture)
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)  # noqa: E731
    for appearance, rows in ((None, 2), (2.0, 3)):
        pipe(tiny_sd.source, tiny_sd.pose, prompt="a man", num_images=2, height=64, width=64,
             appearance_guidance_scale=appearance, output_type="np")
        assert seen["static"].rows == rows
        batch, scalars = pipe.abstract_inputs(seen["static"], 2)
        assert shapes(batch) == shapes(seen["batch"]) and shapes(scalars) == shapes(seen["scalars"])


def test_pipeline_from_run_on_a_config_with_model_folders(tiny_sd):
    from pmf_jax.config import load_config
    from pmf_jax.pipelines import pipeline_from_run

    folders = [f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}", "model.dtype=float32"]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    pipe = pipeline_from_run(load_config(None, folders))  # reference.mode acm, model.reference_unet null
    assert pipe.mode == "acm" and same(pipe.params["reference"], pipe.params["unet"])  # the untrained ACM
    trained = pipeline_from_run(load_config(None, folders + [f"model.reference_unet={tiny_sd.reference_unet}"]))
    assert not same(trained.params["reference"], trained.params["unet"])
    own = pipeline_from_run(load_config(None, folders + ["reference.mode=reference_only"]))
    assert own.mode == "reference_only" and "reference" not in own.params  # the denoising UNet writes its bank
    assert pipeline_from_run(load_config(None, folders), mode="controlnet_only").mode == "controlnet_only"
    with pytest.raises(PMFInputError, match="ControlNet"):
        pipeline_from_run(load_config(None, folders + ["model.controlnet=null"]))


def test_guidance_formula():
    u, mid, full = np.float32(1.0), np.float32(3.0), np.float32(4.0)
    # u + s_mid (mid - u) + s_full (full - mid)
    assert nested_guidance(u, mid, full, 2.0, 5.0) == 1.0 + 2.0 * 2.0 + 5.0 * 1.0
    # equal scales collapse to plain CFG between uncond and full
    assert nested_guidance(u, mid, full, 3.0, 3.0) == u + 3.0 * (full - u)


def test_resolution_buckets_and_fitting(tiny_sd):
    assert bucket_size(512, 512) == (512, 512)
    assert bucket_size(1024, 700) == (512, 384)   # long side to 512, 350 snapped to 384
    assert bucket_size(300, 800, long_side=768) == (256, 768)
    check_resolution(64, 128)
    for bad in [(60, 64), (64, None), (0, 64), (-8, 64)]:
        with pytest.raises(PMFInputError):
            check_resolution(*bad)
    image = np.full((20, 40, 3), 200, np.uint8)
    fitted, transform = fit_image(image, (64, 64))
    assert fitted.shape == (64, 64, 3) and fitted.min() == 200  # letterbox bars repeat the border
    assert content_box(transform) == (0, 16, 64, 48)
    with pytest.raises(PMFInputError, match="does not exist"):
        load_image(tiny_sd.root / "missing.png", "source")


def test_pose_inputs(tiny_sd):
    from pmf_jax.io import from_pretrained

    pipe = RetargetPipeline(from_pretrained(tiny_sd.sd, "unet"), from_pretrained(tiny_sd.controlnet),
                            vae=from_pretrained(tiny_sd.sd, "vae"), mode="controlnet_only")
    skeleton = np.asarray(Image.open(tiny_sd.pose))
    for pose in (tiny_sd.pose, tiny_sd.pose_json, KEYPOINTS, Image.open(tiny_sd.pose)):
        source, drawn = pipe.prepare_inputs(tiny_sd.source, pose, 64, 64)
        np.testing.assert_array_equal(drawn, skeleton)
    np.testing.assert_array_equal(source, np.asarray(Image.open(tiny_sd.source)))
    # a wider canvas: the same letterbox for keypoints and skeleton images (black bars)
    wide = pipe.prepare_inputs(tiny_sd.source, tiny_sd.pose_json, 64, 80)[1]
    np.testing.assert_array_equal(wide, pipe.prepare_inputs(tiny_sd.source, tiny_sd.pose, 64, 80)[1])
    assert wide[:, :8].max() == 0 and wide[:, 72:].max() == 0
    # a 4x larger canvas: the keypoints are scaled (pixel centres: x' = 4 (x + 0.5) - 0.5) and drawn there
    big = pipe.prepare_inputs(tiny_sd.source, tiny_sd.pose_json, 256, 256)[1]
    assert tuple(big[73, 129]) == COLORS[1] and tuple(big[153, 81]) == COLORS[4]  # neck (32, 18), r. wrist (20, 38)
    # pose_kind="skeleton" takes any image as the skeleton, as is
    np.testing.assert_array_equal(pipe.prepare_inputs(tiny_sd.source, tiny_sd.source, 64, 64, pose_kind="skeleton")[1],
                                  source)
    with pytest.raises(PMFInputError, match="2 source images and 3 poses"):
        pipe([tiny_sd.source] * 2, [tiny_sd.pose] * 3, height=64, width=64)


def test_cli_literals_match_the_libraries():
    from pmf_jax import constants
    from pmf_jax.commands import model_options
    from pmf_jax.models.attention import BACKENDS

    assert constants.SCHEDULER_NAMES == tuple(SCHEDULERS)
    assert model_options.MODES == MODES
    assert set(constants.ATTENTION_BACKENDS) == set(BACKENDS)
    assert options.DTYPES[1:] == constants.DTYPES
