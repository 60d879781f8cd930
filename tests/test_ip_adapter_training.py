"""The IP-Adapter recipe (configs/sd15_ip_adapter.yaml) on the tiny models: 3 steps train only the adapter (image
projection + to_k_ip/to_v_ip), the UNet, ControlNet and image encoder stay bit-identical; the export is the public
file format, and diffusers' ``load_ip_adapter`` on it gives the noise prediction of our UNet with the trained kernels
merged (same image embeddings fed to both). Also the JAX image preprocessing of training against the PIL-exact one."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file

import pmf_jax.io as pio
from ip_adapter_fixtures import public_state, tiny_vision_config, torch_vision
from parity import rel_err, to_nchw, to_nhwc
from pmf_jax.config import load_config
from pmf_jax.convert import export_to_diffusers
from pmf_jax.convert.ip_adapter_export import export_ip_adapter
from pmf_jax.errors import PMFInputError
from pmf_jax.models.clip_image_processor import ImageProcessorConfig, preprocess
from pmf_jax.training import components as components_lib
from pmf_jax.training.image_prompt import clip_pixel_values, ip_adapter_tree, merge_ip_kernels
from pmf_jax.training.state import bind_step, init_state, make_optimizer
from tiny_sd import tiny_sd  # noqa: F401  (the pytest fixture)
from train.checkpointing import RunCheckpoints
from train.loop import write_run_info

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sd15_ip_adapter.yaml"
TOL = 1e-4
SIZE = (32, 48)  # not square: the processor resizes the short side to 30 and centre-crops 30 x 30


def write_tiny_ip_adapter(root: Path, sd_folder: Path):
    """h94/IP-Adapter's layout for the tiny SD UNet: ``models/ip-adapter_tiny.safetensors`` (public keys, random)
    beside ``models/image_encoder/`` (a tiny transformers CLIP vision model, 30 px, no preprocessor config)."""
    models = Path(root) / "models"
    models.mkdir(parents=True)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    save_file(public_state("ip_adapter", unet), str(models / "ip-adapter_tiny.safetensors"), metadata={"format": "pt"})
    torch_vision(tiny_vision_config(num_hidden_layers=2)).save_pretrained(models / "image_encoder")
    return models / "ip-adapter_tiny.safetensors", models / "image_encoder"


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _batch(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    image = lambda: rng.uniform(-1, 1, (2, *SIZE, 3)).astype(np.float32)  # noqa: E731
    return {"source": image(), "target": image(), "pose": rng.uniform(0, 1, (2, *SIZE, 3)).astype(np.float32)}


def test_recipe_trains_the_adapter_and_round_trips_through_diffusers(tiny_sd, tmp_path):  # noqa: F811
    adapter_file, encoder_folder = write_tiny_ip_adapter(tmp_path / "h94", tiny_sd.sd)
    cfg = load_config(RECIPE, [f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}",
                               f"model.ip_adapter={adapter_file}", "model.image_encoder=null",  # beside the file
                               "model.dtype=float32", "model.frozen_param_dtype=float32",
                               f"data.resolution=[{SIZE[0]},{SIZE[1]}]", "train.lr=1e-3", "train.weight_decay=0",
                               "train.warmup_steps=0", "train.grad_clip=0", "train.reference_drop_prob=0.02"])
    assert cfg.reference.mode == "ip_adapter" and tuple(cfg.train.trainable) == ("ip_adapter",)

    # ---- 3 steps: only the adapter moves -------------------------------------------------------------------------
    comps, params, frozen = components_lib.build(cfg, jax.random.key(0))
    assert comps.trainable == ("ip_adapter",) and comps.writer is None and "reference_unet" not in params
    assert set(params) == {"unet", "controlnet", "ip_adapter"} and "image_encoder" in frozen
    assert comps.image_prompt.processor == ImageProcessorConfig.for_image_size(30)  # diffusers' default for 30 px
    loaded = {part: _flat(tree) for part, tree in params.items()}
    loaded["image_encoder"] = _flat(frozen["image_encoder"])
    start = pio.load_ip_adapter(adapter_file)
    tx = make_optimizer(cfg.train)
    state = init_state({"ip_adapter": params["ip_adapter"]}, tx, cfg.train, jax.random.key(1))
    frozen_params = {p: t for p, t in params.items() if p != "ip_adapter"}
    step = jax.jit(bind_step(comps, tx, cfg.train, cfg.reference.to_reference_config()))
    dropped = []
    for i in range(3):
        state, metrics = step(state, frozen_params, frozen, _batch(i))
        dropped.append(float(metrics["image_prompt_dropped"]))
    assert np.isfinite(float(metrics["loss"])) and "reference_dropped" not in metrics  # no bank in ip_adapter
    assert dropped == [0.5, 0.0, 0.0]  # this run's draws at reference_drop_prob=0.02: one row reads no image
    trained = jax.device_get(state.params["ip_adapter"])
    after = _flat(trained)
    assert len(after) == 4 + 2 * 4  # proj kernel/bias, norm scale/bias; to_k_ip/to_v_ip of the 4 cross-attentions
    same = [k for k in after if np.array_equal(after[k], loaded["ip_adapter"][k])]
    assert not same, f"every adapter array trains; unchanged: {same}"
    for part, tree in (*frozen_params.items(), ("image_encoder", frozen["image_encoder"])):
        now = _flat(tree)
        assert now.keys() == loaded[part].keys() and all(np.array_equal(now[k], loaded[part][k]) for k in now), part
    for part, folder in (("unet", tiny_sd.sd / "unet"), ("controlnet", tiny_sd.controlnet),
                         ("image_encoder", encoder_folder)):  # frozen = the folders' weights, bit for bit
        want = _flat(pio.from_pretrained(folder)[1])
        assert all(np.array_equal(loaded[part][k], np.asarray(want[k])) for k in want), part

    # ---- export (`pmf convert to-diffusers` of the run's checkpoint): the public format, the same numbers ----------
    run_dir = tmp_path / "run"
    write_run_info(run_dir, cfg, comps)
    checkpoints = RunCheckpoints(run_dir, keep=1, async_saves=False)
    checkpoints.save(3, state, None)
    checkpoints.close()
    out = export_to_diffusers(run_dir, tmp_path / "export", ema=False)  # 3 steps: the EMA is the start, nearly
    weights = out / "ip_adapter" / "ip_adapter.safetensors"
    assert (out / "image_encoder" / "config.json").is_file() and (out / "unet").is_dir()
    assert json.loads((out / "pmf_config.json").read_text())["parts"]["ip_adapter"] == "checkpoint"
    exported = pio.load_ip_adapter(weights)
    assert exported.kind == start.kind and exported.num_tokens == start.num_tokens
    again = ip_adapter_tree(exported, params["unet"])
    assert all(np.array_equal(v, _flat(again)[k]) for k, v in after.items())
    assert not all(np.array_equal(v, start.to_state_dict()[k]) for k, v in exported.to_state_dict().items())
    with pytest.raises(PMFInputError, match="ip_adapter already exists"):
        export_ip_adapter(trained, cfg, out)
    broken = {"image_proj": trained["image_proj"], "attn2": {k: v for k, v in trained["attn2"].items()
                                                              if k != "mid_block"}}
    with pytest.raises(PMFInputError, match="missing ip_adapter.7.to_k_ip.weight"):
        export_ip_adapter(broken, cfg, tmp_path / "broken")

    # the run in memory (previews, pmf eval generate --model RUN) and its export sample with the same weights
    from pmf_jax.pipelines import RetargetPipeline
    from pmf_jax.pipelines.from_run import RunParts, pipeline_from_run

    in_memory = pipeline_from_run(RunParts(cfg, comps, dict(params, ip_adapter=trained), frozen))
    from_export = RetargetPipeline.from_pretrained(out, dtype="float32")
    assert in_memory.mode == from_export.mode == "ip_adapter"
    for key in ("unet", "image_proj", "image_encoder", "controlnet"):
        a, b = _flat(in_memory.params[key]), _flat(from_export.params[key])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), key

    # ---- diffusers reads the export: image encoder and UNet with the trained adapter -------------------------------
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd.sd, controlnet=diffusers.ControlNetModel.from_pretrained(tiny_sd.controlnet), safety_checker=None,
        requires_safety_checker=False)
    pipe.load_ip_adapter(str(out), subfolder="ip_adapter", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder/", local_files_only=True, low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(1.0)
    assert pipe.image_encoder is not None

    source = _batch(7)["source"]
    pixels = jax.jit(clip_pixel_values, static_argnums=1)(source, comps.image_prompt.processor)
    ours = comps.image_prompt.image_encoder.apply({"params": frozen["image_encoder"]}, pixels)
    with torch.no_grad():
        theirs = pipe.image_encoder(to_nchw(pixels)).image_embeds.numpy()
    errors = {"image_embeds": rel_err(ours.image_embeds, theirs)}

    embeds = np.asarray(ours.image_embeds)  # the same embeddings into both UNets: the comparison is of the weights
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 6, 4)).astype(np.float32)
    t = np.array([999, 421], np.int32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        want = to_nhwc(pipe.unet(to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                                 added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds[:, None])]}).sample)

    @jax.jit
    def predict(ip_tree, features):
        tokens = comps.image_prompt.tokens(ip_tree["image_proj"], features)
        return comps.unet.apply({"params": merge_ip_kernels(params["unet"], ip_tree["attn2"])}, x, t, ctx,
                                ip_tokens=tokens, ip_scale=1.0)

    got = predict(trained, embeds)
    errors["noise prediction"] = rel_err(got, want)
    plain = comps.unet.apply({"params": params["unet"]}, x, t, ctx)
    moved = rel_err(predict(params["ip_adapter"], embeds), got)  # the starting adapter
    print("trained adapter through diffusers, rel err:", {k: f"{v:.1e}" for k, v in errors.items()},
          f"| the image prompt changes the prediction by {rel_err(got, plain):.1e}, 3 steps of training by "
          f"{moved:.1e}")
    assert max(errors.values()) <= TOL, errors
    assert rel_err(got, plain) > 1e-2 and moved > 10 * TOL


def test_training_preprocessing_against_the_processor():
    """The jitted preprocessing of training (jax.image.resize, float) against the numpy processor on the recipe's
    512 x 352 images to 224 px: its float path (the same weights) and its uint8 path (Pillow's rounding)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :352]
    smooth = np.stack([np.sin(xx / 17.0) * np.cos(yy / 23.0), np.cos(xx / 29.0), np.sin((xx + yy) / 41.0)], -1)
    images = np.clip(0.8 * smooth[None] + 0.1 * rng.standard_normal((2, 512, 352, 3)), -1, 1).astype(np.float32)
    config = ImageProcessorConfig()
    ours = np.asarray(jax.jit(clip_pixel_values, static_argnums=1)(images, config))
    want = preprocess(list((images.astype(np.float64) + 1) / 2), config)
    err = rel_err(ours, want)
    # The uint8 path (Pillow's 8-bit arithmetic) of the same pictures rounded to uint8: a level or so apart.
    u8 = np.round((images + 1) * 127.5).astype(np.uint8)
    ours_u8 = np.asarray(clip_pixel_values(u8.astype(np.float32) / 127.5 - 1, config))
    err_u8 = rel_err(ours_u8, preprocess(list(u8), config))
    print(f"JAX preprocessing vs the processor: float path rel err {err:.1e} (max abs "
          f"{np.abs(ours - want).max():.1e}); uint8 (Pillow 8-bit) path rel err {err_u8:.1e}")
    assert ours.shape == want.shape == (2, 224, 224, 3) and err < 1e-5 and err_u8 < 1e-2
    # A crop larger than the image: zeros around it, as the processor pads.
    small = ImageProcessorConfig(do_resize=False, crop_size=(40, 36))
    np.testing.assert_allclose(np.asarray(clip_pixel_values(images[:, :30, :30], small)),
                               preprocess(list((images[:, :30, :30].astype(np.float64) + 1) / 2), small), atol=1e-5)


def test_recipe_errors(tiny_sd, tmp_path):  # noqa: F811
    base = [f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}"]
    with pytest.raises(PMFInputError, match="writes no reference bank: train ip_adapter"):
        components_lib.trainable_parts(load_config(RECIPE, ["train.trainable=[reference_unet]"]).train,
                                       "ip_adapter")
    assert components_lib.trainable_parts(load_config(RECIPE, ["train.trainable=[]"]).train,
                                          "ip_adapter") == ("ip_adapter",)
    with pytest.raises(PMFInputError, match="names ip_adapter, but model.ip_adapter is null"):
        components_lib.build(load_config(RECIPE, [*base, "model.ip_adapter=null", "reference.mode=acm"]),
                             jax.random.key(0))
    with pytest.raises(PMFInputError, match="needs config model.ip_adapter"):
        components_lib.build(load_config(RECIPE, [*base, "model.ip_adapter=null", "train.trainable=[controlnet]"]),
                             jax.random.key(0))
    with pytest.raises(PMFInputError, match="model.ip_adapter: .*does not exist"):
        components_lib.build(load_config(RECIPE, [*base, f"model.ip_adapter={tmp_path}/none.safetensors"]),
                             jax.random.key(0))
    with pytest.raises(PMFInputError, match="in ip_adapter no reference bank is written"):
        components_lib.build(load_config(RECIPE, [*base, f"model.reference_unet={tiny_sd.reference_unet}"]),
                             jax.random.key(0))
