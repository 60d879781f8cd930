"""Golden outputs recorded from the code before a behaviour-preserving refactor: later changes must reproduce them.

Here:
* the result PNGs of fixed-seed ``pmf retarget`` runs on a tiny export with what tests/test_cli_retarget.py does not
  run (the stochastic DDPM sampler's noise streams, 3-row appearance guidance, a ControlNet reading the bank,
  ``reference_timestep="zero"`` with Euler);
* the reference bank and the UNet / ControlNet outputs of a tiny reference step.
Beside the tests that already run them (no extra compilation): the PNGs of every mode and of ``pmf enhance`` in
tests/test_cli_retarget.py (``cli_retarget_pixels.npz``), and the first 3 losses of the tiny trainer in
tests/test_train.py (``train_loss_first3.json``).

Tolerances: XLA:CPU generates different code for different CPUs (AVX2 vs AVX-512 FMA contraction), so the same
program gives float results that differ in the last bits from one machine to another. On the machine that recorded
them the outputs of the refactored code were byte-identical PNGs and arrays equal to 0.0; across machines the PNGs
may differ by a rounding level (:data:`PIXEL_MAX_DIFF`) and the arrays by :data:`ARRAY_TOLERANCE`.

Recorded with ``PMF_RECORD_GOLDEN=1`` into ``tests/golden/``; a normal run compares. Re-record only for a change that
is meant to change outputs, and say so in the commit.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from tiny_sd import tiny_sd  # noqa: F401  (fixture)

GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("PMF_RECORD_GOLDEN") == "1"
COMMON = ["--steps", "3", "--height", "64", "--width", "64", "--seed", "11", "--no-progress", "--no-cache"]


def _check_json(name: str, value):
    path = GOLDEN / f"{name}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        return
    return json.loads(path.read_text())


PIXEL_MAX_DIFF = 2          # uint8 levels, any pixel
PIXEL_MEAN_DIFF = 0.05      # uint8 levels, mean over an image
ARRAY_TOLERANCE = 1e-5      # absolute and relative


def check_pixels(name: str, pixels: dict) -> None:
    """``pixels`` (``{key: uint8 [H, W, C]}``, a subset of the recorded ones) equal ``tests/golden/<name>.npz`` within
    the module's tolerances, or are recorded (merged into the file)."""
    path = GOLDEN / f"{name}.npz"
    recorded = dict(np.load(path)) if path.is_file() else {}
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        np.savez_compressed(path, **dict(recorded, **pixels))
        return
    assert pixels and set(pixels) <= set(recorded), sorted(set(pixels) - set(recorded))
    for key, image in pixels.items():
        assert image.shape == recorded[key].shape, key
        diff = np.abs(image.astype(np.int16) - recorded[key].astype(np.int16))
        assert diff.max() <= PIXEL_MAX_DIFF and diff.mean() <= PIXEL_MEAN_DIFF, (key, diff.max(), diff.mean())


def pixels_of_pngs(folder: Path, key: str) -> dict:
    """``{"<key>/<file name>": uint8 pixels}`` of every PNG in ``folder``."""
    return {f"{key}/{p.name}": np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _retarget_cases(sd, export):
    base = ["--source", sd.source, "--pose", sd.pose]
    return {
        "export_acm_appearance_ddpm_cn_reads": ["retarget", "--model", export, *base, "--num-images", "1",
                                                "--appearance-guidance-scale", "2.0", "--scheduler", "ddpm",
                                                "--controlnet-reads-reference"],
        "export_reference_only_zero": ["retarget", "--model", export, *base, "--mode", "reference_only",
                                       "--num-images", "1", "--reference-timestep", "zero", "--style-fidelity", "0.5",
                                       "--scheduler", "euler", "--guidance-scale", "7.5"],  # not the export's 1.0
    }


def test_cli_outputs_equal_the_recorded(tiny_sd, tiny_export, tmp_path):
    from pmf_jax.cli import main

    pixels = {}
    for name, args in _retarget_cases(tiny_sd, tiny_export).items():
        out = tmp_path / name
        assert main([str(a) for a in args + ["--out", out] + COMMON]) == 0, name
        pixels.update({k: v for k, v in pixels_of_pngs(out, name).items() if "/result_" in k})
    check_pixels("cli_pixels", pixels)


REFERENCE_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                      cross_attention_dim=24, transformer_layers_per_block=(1, 2))


def _reference_step():
    """A reference step on random tiny models: bank written by one UNet, read by another UNet and a ControlNet."""
    from pmf_jax.models.controlnet import controlnet_from_unet
    from pmf_jax.models.unet import UNet2DConditionModel
    unet = UNet2DConditionModel(**REFERENCE_UNET)
    keys = jax.random.split(jax.random.key(3), 8)
    p_ref = jax.jit(unet.init_params)(keys[0])
    p_unet = jax.jit(unet.init_params)(keys[1])
    cn, p_cn = controlnet_from_unet(unet, p_unet, keys[2], conditioning_embedding_out_channels=(4, 8))
    leaves, tree = jax.tree_util.tree_flatten(p_cn)  # the zero convs made non-zero: the residuals are compared too
    noise = jax.random.split(keys[7], len(leaves))
    p_cn = jax.tree_util.tree_unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, noise)])
    x = jax.random.normal(keys[3], (4, 8, 8, 4))
    ref = jax.random.normal(keys[4], (2, 8, 8, 4))
    ctx = jax.random.normal(keys[5], (4, 5, 24))
    cond = jax.random.uniform(keys[6], (4, 16, 16, 3))
    t = jnp.array([10, 500, 10, 500])
    return jax.jit(functools.partial(_read_and_write, unet, cn))(p_ref, p_unet, p_cn, x, ref, ctx, cond, t)


def _read_and_write(unet, cn, p_ref, p_unet, p_cn, x, ref, ctx, cond, t):
    from pmf_jax.reference import ReferenceConfig, ReferenceRead

    bank = unet.apply({"params": p_ref}, ref, t[:2], ctx[:2], method=unet.write_reference)
    bank = jax.tree_util.tree_map(lambda b: jnp.repeat(b, 2, axis=0), bank)
    config = ReferenceConfig(attention_weight=0.7, style_fidelity=0.5, controlnet_reads_reference=True)
    read = ReferenceRead.build(bank, config, 4, uncond_mask=jnp.array([1.0, 0.0, 1.0, 0.0]))
    down, mid = cn.apply({"params": p_cn}, x, t, ctx, cond, conditioning_scale=0.8, reference=read)
    out = unet.apply({"params": p_unet}, x, t, ctx, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, reference=read)
    plain = unet.apply({"params": p_unet}, x, t, ctx,
                       reference=ReferenceRead(bank, ref_mix=jnp.array([0.0, 0.25, 1.0, 0.5])))
    arrays = {"bank/" + "/".join(k): v for k, v in
              __import__("flax").traverse_util.flatten_dict(bank).items()}
    arrays.update({"unet_out": out, "unet_ref_mix_out": plain, "controlnet_mid": mid})
    arrays.update({f"controlnet_down_{i}": d for i, d in enumerate(down)})
    return arrays


def test_reference_step_arrays():
    arrays = {k: np.asarray(v) for k, v in _reference_step().items()}
    path = GOLDEN / "reference_step.npz"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        np.savez_compressed(path, **arrays)
        return
    expected = dict(np.load(path))
    assert sorted(arrays) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(arrays[name], value, rtol=ARRAY_TOLERANCE, atol=ARRAY_TOLERANCE, err_msg=name)
