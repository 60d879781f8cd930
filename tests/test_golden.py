"""Golden outputs recorded from the code before a behaviour-preserving refactor: later changes must reproduce them.

* the result PNGs of fixed-seed ``pmf retarget`` runs (every mode, on a tiny export and on the tiny SD folders) and of
  ``pmf enhance`` — byte-identical (SHA-256 of the files);
* the reference bank and the UNet / ControlNet outputs of a tiny reference step — equal within 1e-6;
* the loss of the first 3 train steps of the tiny config (mode acm with remat, and reference_only) — within 1e-6.

Recorded with ``PMF_RECORD_GOLDEN=1 pytest tests/test_golden.py`` into ``tests/golden/``; a normal run compares.
Re-record only for a change that is meant to change outputs, and say so in the commit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from tiny_sd import tiny_sd  # noqa: F401  (fixture)
import train_fixtures

GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("PMF_RECORD_GOLDEN") == "1"
ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--steps", "3", "--height", "64", "--width", "64", "--seed", "11", "--no-progress", "--no-cache"]


def _check_json(name: str, value):
    path = GOLDEN / f"{name}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        return
    return json.loads(path.read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _retarget_cases(sd, export):
    base = ["--source", sd.source, "--pose", sd.pose]
    return {
        "export_acm": ["retarget", "--model", export, *base, "--num-images", "2"],
        "export_acm_appearance_ddpm_cn_reads": ["retarget", "--model", export, *base, "--num-images", "1",
                                                "--appearance-guidance-scale", "2.0", "--scheduler", "ddpm",
                                                "--controlnet-reads-reference"],
        "export_reference_only_zero": ["retarget", "--model", export, *base, "--mode", "reference_only",
                                       "--num-images", "1", "--reference-timestep", "zero", "--style-fidelity", "0.5",
                                       "--scheduler", "euler"],
        "export_controlnet_only": ["retarget", "--model", export, *base, "--mode", "controlnet_only",
                                   "--num-images", "1", "--scheduler", "ddim"],
        "sd_acm_prompt": ["retarget", "--model", sd.sd, "--controlnet", sd.controlnet, "--reference-unet",
                          sd.reference_unet, *base, "--prompt", "a man", "--num-images", "2",
                          "--appearance-guidance-scale", "2.0", "--attention-weight", "0.6"],
        "sd_reference_only_midup": ["retarget", "--model", sd.sd, "--controlnet", sd.controlnet, "--source",
                                    sd.source, "--pose", sd.pose_json, "--mode", "reference_only", "--num-images", "1",
                                    "--style-fidelity", "1.0", "--fusion-blocks", "midup", "--scheduler",
                                    "dpmpp_2m"],
    }


def test_cli_outputs_are_byte_identical(tiny_sd, tiny_export, tmp_path):
    from pmf_jax.cli import main

    hashes = {}
    for name, args in _retarget_cases(tiny_sd, tiny_export).items():
        out = tmp_path / name
        assert main([str(a) for a in args + ["--out", out] + COMMON]) == 0, name
        for png in sorted(out.glob("result_*.png")):
            hashes[f"{name}/{png.name}"] = _sha(png)
    edited = tmp_path / "enhance" / "out.png"
    assert main([str(a) for a in ["enhance", "--model", tiny_sd.ip2p, "--image", tiny_sd.source, "--instruction",
                                  "make it blue", "--out", edited, *COMMON]]) == 0
    hashes["enhance/out.png"] = _sha(edited)
    expected = _check_json("cli_png_sha256", hashes)
    if expected is not None:
        assert hashes == expected


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
    from pmf_jax.reference import ReferenceConfig

    bank = unet.apply({"params": p_ref}, ref, t[:2], ctx[:2], method=unet.write_reference)
    bank = jax.tree_util.tree_map(lambda b: jnp.repeat(b, 2, axis=0), bank)
    config = ReferenceConfig(attention_weight=0.7, style_fidelity=0.5, controlnet_reads_reference=True)
    read = dict(reference=bank, reference_config=config, uncond_mask=jnp.array([1.0, 0.0, 1.0, 0.0]))
    down, mid = cn.apply({"params": p_cn}, x, t, ctx, cond, conditioning_scale=0.8, **read)
    out = unet.apply({"params": p_unet}, x, t, ctx, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, **read)
    plain = unet.apply({"params": p_unet}, x, t, ctx, reference=bank, ref_mix=jnp.array([0.0, 0.25, 1.0, 0.5]))
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
        np.testing.assert_allclose(arrays[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name,extra", [("acm_remat", ["train.remat=true"]),
                                        ("reference_only", ["reference.mode=reference_only",
                                                            "reference.controlnet_reads_reference=true"])])
def test_first_train_losses(tmp_path_factory, name, extra):
    from pmf_jax.config import load_config
    from train.logs import read_metrics
    from train.loop import train_and_evaluate

    env = train_fixtures.prepare(tmp_path_factory.mktemp("golden_train"))
    run = tmp_path_factory.mktemp("golden_run") / name
    cfg = load_config(str(ROOT / "configs" / "tiny_synthetic.yaml"), train_fixtures.overrides(
        env, run, "train.steps=3", "train.checkpoint_every=3", "train.eval_every=1000", "train.lr=1e-3", *extra))
    train_and_evaluate(cfg)
    losses = [row["loss"] for row in read_metrics(run)]
    assert len(losses) == 3
    expected = _check_json(f"train_loss_{name}", losses)
    if expected is not None:
        np.testing.assert_allclose(losses, expected, rtol=1e-6, atol=1e-6)
