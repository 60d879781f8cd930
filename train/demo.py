"""``make demo``: build synthetic_pairs (64x64), train the tiny PMF model, retarget held-out identities, score.

Also exports the run with ``pmf convert to-diffusers`` (``outputs/demo/export``) and runs ``pmf retarget`` on
one held-out pair (``outputs/demo/retarget``). Writes ``outputs/demo/grid.png`` (rows: test pairs; columns: source | target pose | PMF | PMF without the reference
bank | ground truth) and ``outputs/demo/metrics.json`` with SSIM and PSNR against the ground truth for (a) the
trained PMF model and (b) the same weights with the reference bank disabled at sampling. Appearance reaches the
output only through the reference, so (a) must beat (b) on identities never seen in training.
Run from the repository root: ``python -m train.demo [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

CONFIG = "configs/tiny_synthetic.yaml"


def _score(generated: np.ndarray, truth: np.ndarray) -> dict:
    """SSIM (scikit-image, RGB, data_range 255, 7x7 window) and PSNR per image, averaged; inputs [B,H,W,3] in [-1,1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    to_u8 = lambda x: np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)  # noqa: E731
    g, t = to_u8(generated), to_u8(truth)
    ssim = [structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(g, t)]
    psnr = [peak_signal_noise_ratio(b, a, data_range=255) for a, b in zip(g, t)]
    return {"ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr))}


def _pmf(*args) -> None:
    run = subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)])
    if run.returncode:
        raise SystemExit(f"`pmf {' '.join(map(str, args[:2]))}` failed with exit code {run.returncode}")


def _export_and_retarget_one(cfg, out: Path, result: dict) -> None:
    """What a user does with the trained run: export it to diffusers folders, then `pmf retarget` a held-out pair."""
    import shutil

    from PIL import Image

    export, retarget = out / "export", out / "retarget"
    shutil.rmtree(export, ignore_errors=True)
    print(f"[demo] pmf convert to-diffusers --checkpoint {cfg.train.output_dir} --out {export}", flush=True)
    _pmf("convert", "to-diffusers", "--checkpoint", cfg.train.output_dir, "--out", export)
    to_u8 = lambda x, low: np.round((np.clip(x, low, 1) - low) / (1 - low) * 255).astype(np.uint8)  # noqa: E731
    retarget.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_u8(result["source"][0], -1.0)).save(out / "test_source.png")
    Image.fromarray(to_u8(result["pose"][0], 0.0)).save(out / "test_pose.png")
    height, width = cfg.data.height_width
    print(f"[demo] pmf retarget --model {export} ... --out {retarget}", flush=True)
    _pmf("retarget", "--model", export,  # the export supplies its ControlNet, reference UNet, mode, settings
         "--source", out / "test_source.png", "--pose", out / "test_pose.png", "--pose-kind", "skeleton",
         "--steps", cfg.sampling.steps, "--scheduler", cfg.sampling.scheduler, "--guidance-scale",
         cfg.sampling.text_guidance_scale, "--height", height, "--width", width, "--num-images", 1,
         "--seed", cfg.sampling.seed, "--out", retarget)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--test-pairs", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run (key=value)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    from pmf_jax import input_pipeline, runtime
    from pmf_jax.config import load_config

    cfg = load_config(CONFIG, [f"data.data_dir={out / 'tfds'}", f"train.output_dir={out / 'run'}", *args.overrides])
    runtime.setup(None if cfg.train.compilation_cache else False)
    print(f"[demo] building synthetic_pairs/{cfg.data.builder_config} in {cfg.data.data_dir}", flush=True)
    input_pipeline.build(cfg.data.name, cfg.data.data_dir, config=cfg.data.builder_config)

    print(f"[demo] training {CONFIG} for {cfg.train.steps} steps (resumes if interrupted)", flush=True)
    overrides = [f"data.data_dir={cfg.data.data_dir}", f"train.output_dir={cfg.train.output_dir}", *args.overrides]
    run = subprocess.run([sys.executable, "-m", "train", "--config", CONFIG, *overrides])
    if run.returncode:
        raise SystemExit(f"training failed with exit code {run.returncode}")
    train_s = time.perf_counter() - start

    print("[demo] retargeting held-out test identities", flush=True)
    from train.retarget_eval import generate_test_pairs

    result = generate_test_pairs(cfg, num_pairs=args.test_pairs)
    metrics = {"with_reference": _score(result["generated"], result["target"]),
               "without_reference": _score(result["generated_no_reference"], result["target"]),
               "test_pairs": int(result["target"].shape[0]), "checkpoint_step": result["step"],
               "train_steps": cfg.train.steps, "train_seconds": round(train_s, 1),
               "total_seconds": round(time.perf_counter() - start, 1), "devices": jax.device_count(),
               "platform": jax.default_backend()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from PIL import Image

    from train.logs import image_grid

    _export_and_retarget_one(cfg, out, result)
    rows = slice(0, 8)
    grid = image_grid([result["source"][rows], result["pose"][rows], result["generated"][rows],
                       result["generated_no_reference"][rows], result["target"][rows]])
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "grid.png")
    a, b = metrics["with_reference"], metrics["without_reference"]
    print(f"[demo] PMF:                 SSIM {a['ssim']:.4f}  PSNR {a['psnr']:.2f} dB")
    print(f"[demo] without reference:   SSIM {b['ssim']:.4f}  PSNR {b['psnr']:.2f} dB")
    print(f"[demo] wrote {out / 'grid.png'} and {out / 'metrics.json'} in {metrics['total_seconds']:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
