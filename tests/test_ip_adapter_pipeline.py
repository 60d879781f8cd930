"""IP-Adapter in the UNet and in the retarget pipeline (the design's Method 2) against diffusers: the decoupled
cross-attention at several scales (per block too), ``ip_tokens=None`` bit for bit, no recompilation when the scale
changes, one denoising step of the ``ip_adapter`` mode against StableDiffusionControlNetPipeline with
``load_ip_adapter``, and ``pmf retarget --mode ip_adapter`` (alone and with acm) on the tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import pmf_jax.io as pio
from compile_counter import CompileCounter
from ip_adapter_fixtures import EMBED, load_into_diffusers, tiny_ip  # noqa: F401  (tiny_ip: fixture)
from parity import rel_err, to_nchw, to_nhwc
from pmf_jax.errors import PMFInputError
from pmf_jax.models.image_prompt import expand_scale, module_scales
from tiny_sd import CLIP_DIM, tiny_sd  # noqa: F401  (fixture)

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4
PER_BLOCK = {"down": {"block_0": 0.7}, "up": {"block_1": [0.0, 1.3]}}   # mid: 0 (left out)


def test_unet_with_image_tokens_matches_diffusers(tiny_ip):
    sd = tiny_ip.sd
    module, params = pio.from_pretrained(sd.sd / "unet")
    adapter = pio.load_ip_adapter(tiny_ip.adapter)
    merged = adapter.merge_into(module, params)
    torch_unet = diffusers.UNet2DConditionModel.from_pretrained(sd.sd / "unet").eval()
    torch_pipe = load_into_diffusers(torch_unet, tiny_ip.adapter)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999, 421], np.int32)
    ctx = rng.standard_normal((2, 6, CLIP_DIM)).astype(np.float32)
    embeds = rng.standard_normal((2, EMBED)).astype(np.float32)
    proj, proj_params = adapter.image_proj
    tokens = proj.apply({"params": proj_params}, embeds)                   # [2, 4, 32]

    @jax.jit
    def run(p, tokens, scale):
        return module.apply({"params": p}, x, t, ctx, ip_tokens=tokens, ip_scale=scale)

    errors = {}
    with CompileCounter() as compiles:
        for name, scale in (("0", 0.0), ("0.5", 0.5), ("1", 1.0), ("per block", PER_BLOCK)):
            torch_pipe.set_ip_adapter_scale(scale)
            with torch.no_grad():
                want = torch_unet(to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                                  added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds[:, None])]}).sample
            errors[name] = rel_err(run(merged, tokens, expand_scale(module, scale)), to_nhwc(want))
    print("UNet + IP-Adapter vs diffusers, rel err by scale:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors
    assert compiles.count == 1  # the scale is traced: one program for every scale, per-block dicts included

    # The image prompt matters, and scale 0 is the plain UNet.
    plain_fn = jax.jit(lambda p: module.apply({"params": p}, x, t, ctx))
    plain = plain_fn(params)
    assert rel_err(run(merged, tokens, expand_scale(module, 1.0)), plain) > 1e-2
    assert rel_err(run(merged, tokens, expand_scale(module, 0.0)), plain) <= 1e-6
    # ip_tokens=None ignores the adapter's kernels: the very same numbers as the UNet without them.
    np.testing.assert_array_equal(np.asarray(plain_fn(merged)), np.asarray(plain))
    # One token row per sample reaches both rows of it (rows matched sample-major): sample 0 twice, one token row.
    both = jax.jit(lambda p, tok: module.apply({"params": p}, np.repeat(x[:1], 2, 0), np.repeat(t[:1], 2),
                                               np.repeat(ctx[:1], 2, 0), ip_tokens=tok))(merged, tokens[:1])
    one = run(merged, jnp.repeat(tokens[:1], 2, 0), expand_scale(module, 1.0))
    assert rel_err(both[0], one[0]) <= 1e-6 and rel_err(both[1], one[0]) <= 1e-6


def test_per_block_scales():
    from pmf_jax.models.unet import UNet2DConditionModel
    from tiny_sd import UNET

    unet = UNet2DConditionModel.from_config(UNET)  # attention in down block 0 (1 layer), mid, up block 1 (2 layers)
    def flat(scales):
        return {"/".join(k): float(v) for k, v in traverse_util.flatten_dict(scales).items()}

    assert flat(module_scales(unet, PER_BLOCK)) == pytest.approx(
        {"down_blocks_0/attentions_0": 0.7, "mid_block/attentions_0": 0.0, "up_blocks_1/attentions_0": 0.0,
         "up_blocks_1/attentions_1": 1.3})
    assert flat(module_scales(unet, {"up": 2.0, "mid": [0.5]})) == {
        "down_blocks_0/attentions_0": 0.0, "mid_block/attentions_0": 0.5, "up_blocks_1/attentions_0": 2.0,
        "up_blocks_1/attentions_1": 2.0}
    full = expand_scale(unet, PER_BLOCK)
    assert jax.tree_util.tree_map(float, expand_scale(unet, full)) == jax.tree_util.tree_map(float, full)
    for bad, match in (({"down": {"block_1": 1.0}}, "'block_1' is not a down block with attention"),
                       ({"up": {"block_1": [1.0, 2.0, 3.0]}}, "needs 2 scales"),
                       ({"left": 1.0}, "unknown key 'left'"), ("high", "must be a number")):
        with pytest.raises(PMFInputError, match=match):
            expand_scale(unet, bad)
    with pytest.raises(PMFInputError, match=r"ip_tokens must be \[B, num_tokens, 32\]"):
        unet.apply({"params": unet.abstract_params()}, *unet.dummy_inputs(), ip_tokens=jnp.zeros((1, 4, 8)))


def _latents(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ip_adapter", "plus"])
def test_ip_adapter_step_matches_diffusers(tiny_ip, kind):
    """One DDIM step (trailing: t = 999, the whole guided model) of mode ip_adapter against diffusers'
    StableDiffusionControlNetPipeline after its load_ip_adapter, the source as ip_adapter_image."""
    import transformers
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from pmf_jax.pipelines import RetargetPipeline

    sd = tiny_ip.sd
    adapter = tiny_ip.adapter if kind == "ip_adapter" else tiny_ip.plus
    torch_pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd.sd, controlnet=ControlNetModel.from_pretrained(sd.controlnet), safety_checker=None,
        requires_safety_checker=False)
    torch_pipe.scheduler = DDIMScheduler.from_config(torch_pipe.scheduler.config, timestep_spacing="trailing")
    torch_pipe.set_progress_bar_config(disable=True)
    # diffusers would build CLIPImageProcessor(size=30, crop_size=30); its Pillow twin is the exact arithmetic ours
    # follows (transformers 5's torchvision one rounds a level differently now and then).
    torch_pipe.register_modules(feature_extractor=transformers.CLIPImageProcessorPil(size=30, crop_size=30))
    torch_pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                               image_encoder_folder=tiny_ip.image_encoder.name, local_files_only=True,
                               low_cpu_mem_usage=False)
    pipe = RetargetPipeline.from_pretrained(sd.sd, controlnet=sd.controlnet, mode="ip_adapter", ip_adapter=adapter,
                                            image_encoder=tiny_ip.image_encoder)
    pipe.scheduler_config["timestep_spacing"] = "trailing"
    latents = _latents()
    errors = {}
    for scale in (0.6, PER_BLOCK):
        torch_pipe.set_ip_adapter_scale(scale)
        with torch.no_grad():
            want = to_nhwc(torch_pipe("a man", image=Image.open(sd.pose), ip_adapter_image=Image.open(sd.source),
                                      negative_prompt="an", num_inference_steps=1, guidance_scale=7.5,
                                      controlnet_conditioning_scale=0.8, height=64, width=64,
                                      num_images_per_prompt=2, latents=to_nchw(latents), output_type="latent").images)
        got = pipe(sd.source, sd.pose, prompt="a man", negative_prompt="an", num_inference_steps=1,
                   guidance_scale=7.5, controlnet_conditioning_scale=0.8, scheduler="ddim", height=64, width=64,
                   num_images=2, latents=latents, output_type="latent", ip_adapter_scale=scale)
        errors[str(scale)] = rel_err(got, want)
    print(f"{kind}: one DDIM step of mode ip_adapter vs diffusers, rel err by scale", errors)
    assert max(errors.values()) <= TOL, errors
    # the image prompt moves the result (else the check above proves nothing about it)
    plain = pipe(sd.source, sd.pose, prompt="a man", negative_prompt="an", num_inference_steps=1, guidance_scale=7.5,
                 controlnet_conditioning_scale=0.8, scheduler="ddim", height=64, width=64, num_images=2,
                 latents=latents, output_type="latent", ip_adapter_scale=0.0)
    assert rel_err(got, plain) > 1e-3
    assert pipe.compiled_programs() == 3  # every scale ran on the same three programs


def test_pmf_retarget_cli(tiny_ip, tmp_path):
    """``pmf retarget --mode ip_adapter`` and ``--mode acm`` with an IP-Adapter (per-block scale) in two concurrent
    subprocesses on the tiny models: both write their results and record the flags."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pmf_jax.commands.scaling import FAST_COMPILE_FLAGS

    sd = tiny_ip.sd
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PMF_JAX_CACHE_DIR=str(tmp_path / "jax_cache"), HF_HUB_OFFLINE="1",
               XLA_FLAGS=" ".join(FAST_COMPILE_FLAGS))
    common = ["retarget", "--model", sd.sd, "--controlnet", sd.controlnet, "--source", sd.source, "--pose", sd.pose,
              "--pose-kind", "skeleton", "--steps", "1", "--num-images", "1", "--dtype", "float32", "--no-progress",
              "--ip-adapter", tiny_ip.adapter, "--image-encoder", tiny_ip.image_encoder]
    runs = {"ip_adapter": common + ["--mode", "ip_adapter", "--ip-adapter-scale", "0.5"],
            "acm": common + ["--mode", "acm", "--reference-unet", sd.reference_unet, "--ip-adapter-scale",
                             '{"up": {"block_1": [0.0, 1.0]}}']}
    repo = Path(__file__).resolve().parents[1]
    procs = {name: subprocess.Popen([sys.executable, "-m", "pmf_jax.cli", *map(str, args), "--out", tmp_path / name],
                                    cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out}\n{err[-3000:]}"
            assert (tmp_path / name / "result_00.png").is_file()
            settings = json.loads((tmp_path / name / "settings.json").read_text())
            assert settings["ip_adapter"] == str(tiny_ip.adapter) and settings["mode"] == name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert json.loads((tmp_path / "acm" / "settings.json").read_text())["ip_adapter_scale"] == {
        "up": {"block_1": [0.0, 1.0]}}


def test_sharding_rules_cover_the_adapter_kernels(tiny_ip):
    """to_k_ip / to_v_ip get the roles and specs of their attn2's to_k / to_v, on every mesh."""
    from pmf_jax.parallel import ShardingRules, logical_axes, param_partition_specs

    tb = "up_blocks_1/attentions_0/transformer_blocks_0/attn2"
    assert logical_axes(f"{tb}/to_k_ip/kernel", (768, 640)) == logical_axes(f"{tb}/to_k/kernel", (768, 640)) \
        == ("embed", "heads")
    module, params = pio.from_pretrained(tiny_ip.sd.sd / "unet")
    merged = pio.load_ip_adapter(tiny_ip.adapter).merge_into(module, params)
    rules = ShardingRules(min_shard_size=1)  # the tiny kernels would be replicated as too small otherwise
    for sizes in ({"data": 1, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 1}):
        specs = traverse_util.flatten_dict(param_partition_specs(merged, sizes, rules))
        ip = [path for path in specs if path[-2] in ("to_k_ip", "to_v_ip")]
        assert len(ip) == 8
        for path in ip:
            assert specs[path] == specs[path[:-2] + (path[-2][:4], "kernel")], path


def test_torch_pipeline_reads_the_adapter(tiny_ip):
    """PMFTorchPipeline with diffusers' load_ip_adapter against RetargetPipeline: one DDIM step of reference_only +
    IP-Adapter (the UNet writes its bank with the image prompt off, then reads bank and image prompt), per-block
    scale, the same latents."""
    import transformers
    from PIL import Image

    from pmf_jax.pipelines import RetargetPipeline
    from pmf_jax.torch_compat.pipeline import PMFTorchPipeline

    sd, one_step = tiny_ip.sd, {"timestep_spacing": "trailing", "clip_sample": False}
    kw = dict(controlnet=sd.controlnet, mode="reference_only", ip_adapter=tiny_ip.plus,
              image_encoder=tiny_ip.image_encoder)
    torch_pipe = PMFTorchPipeline.from_pretrained(sd.sd, scheduler="ddim", **kw)
    torch_pipe.scheduler = type(torch_pipe.scheduler).from_config(torch_pipe.scheduler.config, **one_step)
    torch_pipe.feature_extractor = transformers.CLIPImageProcessorPil(size=30, crop_size=30)  # as in the step test
    pipe = RetargetPipeline.from_pretrained(sd.sd, **kw)
    pipe.scheduler_config.update(one_step)
    latents = _latents()
    call = dict(prompt="a man", negative_prompt="an", num_inference_steps=1, guidance_scale=3.0, num_images=2,
                output_type="latent", ip_adapter_scale=PER_BLOCK)
    source, pose = Image.open(sd.source), Image.open(sd.pose)
    with torch.no_grad():
        want = to_nhwc(torch_pipe(source, pose, latents=to_nchw(latents), **call))
    got = pipe(source, pose, scheduler="ddim", height=64, width=64, latents=latents, pose_kind="skeleton", **call)
    err = rel_err(got, want)
    print(f"reference_only + IP-Adapter Plus, one DDIM step, JAX vs PMFTorchPipeline: rel err {err:.2e}")
    assert err <= TOL
    without = pipe(source, pose, scheduler="ddim", height=64, width=64, latents=latents, pose_kind="skeleton",
                   **dict(call, ip_adapter_scale=0.0))
    assert rel_err(got, without) > 1e-3  # the image prompt took part
