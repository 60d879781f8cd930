"""``make demo``: build synthetic_pairs (64x64), train the tiny PMF model, retarget held-out identities, score.

The held-out pairs are generated and scored in three modes, as ``pmf eval generate`` / ``pmf eval score`` do
(``outputs/demo/compare_runs/<mode>``): ``acm`` (the trained PMF model), ``reference_only`` (its denoising UNet writes
its own bank: the design's Method 1) and ``controlnet_only`` (the same weights, no reference bank), then put side by
side by ``pmf eval compare`` (``outputs/demo/compare.md``, ``compare.json``, ``compare.png``).
Also exports the run with ``pmf convert to-diffusers`` (``outputs/demo/export``) and runs ``pmf retarget`` on
one held-out pair (``outputs/demo/retarget``); ``test_source*.png`` (8 held-out people) are ``pmf serve``'s
examples. Writes ``outputs/demo/grid.png`` (rows: test pairs; columns: source | target pose | PMF | PMF without the
reference bank | ground truth) and ``outputs/demo/metrics.json`` with SSIM, PSNR and the person and clothing colour
errors (train/demo_metrics.py) against the ground truth for each mode. Appearance reaches the output only through the
reference, so the trained model must beat the baselines on identities never seen in training.
Run from the repository root: ``python -m train.demo [--out DIR] [--test-pairs N] [key=value ...]``.
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

from train.demo_metrics import score

CONFIG = "configs/tiny_synthetic.yaml"


def _pmf(*args) -> None:
    run = subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)])
    if run.returncode:
        raise SystemExit(f"`pmf {' '.join(map(str, args[:2]))}` failed with exit code {run.returncode}")


def _export_and_retarget_one(cfg, out: Path, result: dict) -> None:
    """What a user does with the trained run: export it to diffusers folders, then `pmf retarget` a held-out pair."""
    import shutil

    from PIL import Image

    export, retarget = out / "export", out / "retarget"
    for folder in (export, retarget):  # a re-run replaces the last one's (`pmf` refuses a non-empty --out)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"[demo] pmf convert to-diffusers --checkpoint {cfg.train.output_dir} --out {export}", flush=True)
    _pmf("convert", "to-diffusers", "--checkpoint", cfg.train.output_dir, "--out", export)
    to_u8 = lambda x, low: np.round((np.clip(x, low, 1) - low) / (1 - low) * 255).astype(np.uint8)  # noqa: E731
    retarget.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_u8(result["source"][0], -1.0)).save(out / "test_source.png")
    for i in range(1, min(8, len(result["source"]))):  # more held-out people for `pmf serve`'s example picker
        Image.fromarray(to_u8(result["source"][i], -1.0)).save(out / f"test_source_{i:02d}.png")
    Image.fromarray(to_u8(result["pose"][0], 0.0)).save(out / "test_pose.png")
    height, width = cfg.data.height_width
    appearance = cfg.sampling.reference_guidance_scale
    appearance = [] if appearance is None else ["--appearance-guidance-scale", appearance]
    print(f"[demo] pmf retarget --model {export} ... --out {retarget}", flush=True)
    _pmf("retarget", "--model", export,  # the export supplies its ControlNet, reference UNet, mode, settings
         "--source", out / "test_source.png", "--pose", out / "test_pose.png", "--pose-kind", "skeleton",
         "--steps", cfg.sampling.steps, "--scheduler", cfg.sampling.scheduler, "--guidance-scale",
         cfg.sampling.text_guidance_scale, *appearance, "--height", height, "--width", width, "--num-images", 1,
         "--seed", cfg.sampling.seed, "--out", retarget)


def _train_images_per_s(run_dir) -> float | None:
    """The trainer's median logged images/s over the run (metrics.jsonl rows; the first excluded: it holds the
    warm-up)."""
    from train.logs import read_metrics

    rates = [row["images_per_s"] for row in read_metrics(run_dir)[1:] if "images_per_s" in row]
    return round(float(np.median(rates)), 1) if rates else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--test-pairs", type=int, default=64)
    parser.add_argument("-v", "--verbose", action="store_true", default=None,
                        help="show the libraries' log lines, here and in the runs it starts (also: PMF_VERBOSE=1)")
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run (key=value)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    from pmf_jax import input_pipeline, runtime
    from pmf_jax.config import load_config

    cfg = load_config(CONFIG, [f"data.data_dir={out / 'tfds'}", f"train.output_dir={out / 'run'}", *args.overrides])
    runtime.setup(None if cfg.train.compilation_cache else False, verbose=args.verbose)
    print(f"[demo] building synthetic_pairs/{cfg.data.builder_config} in {cfg.data.data_dir}", flush=True)
    input_pipeline.build(cfg.data.name, cfg.data.data_dir, config=cfg.data.builder_config)
    phases = {"build_data": time.perf_counter() - start}

    print(f"[demo] training {CONFIG} for {cfg.train.steps} steps (resumes if interrupted)", flush=True)
    overrides = [f"data.data_dir={cfg.data.data_dir}", f"train.output_dir={cfg.train.output_dir}", *args.overrides]
    run = subprocess.run([sys.executable, "-m", "train", "--config", CONFIG, *overrides])
    if run.returncode:
        raise SystemExit(f"training failed with exit code {run.returncode}")
    phases["train"] = time.perf_counter() - start - sum(phases.values())

    print("[demo] retargeting held-out test identities in every mode (pmf eval generate + score)", flush=True)
    from train.retarget_eval import generate_modes, read_modes

    modes = generate_modes(cfg, out / "compare_runs", num_pairs=args.test_pairs)
    runs = [modes["folders"][m] for m in ("acm", "reference_only", "controlnet_only")]
    print(f"[demo] pmf eval compare {' '.join(map(str, runs))} --out {out / 'compare'}", flush=True)
    _pmf("eval", "compare", *runs, "--out", out / "compare", "--data-dir", cfg.data.data_dir)
    compared = json.loads((out / "compare.json").read_text())
    result = read_modes(cfg, modes["folders"], args.test_pairs)
    result["generated"], result["generated_no_reference"] = result["acm"], result["controlnet_only"]
    keypoints = result["target_keypoints"]
    metrics = {"with_reference": score(result["acm"], result["target"], keypoints),
               "reference_only": score(result["reference_only"], result["target"], keypoints),
               "without_reference": score(result["controlnet_only"], result["target"], keypoints),
               "test_pairs": int(result["target"].shape[0]), "checkpoint_step": modes["step"],
               "train_steps": cfg.train.steps, "train_images_per_s": _train_images_per_s(cfg.train.output_dir),
               "devices": jax.device_count(), "platform": jax.default_backend(),
               "pmf_eval_compare": {r["label"]: r["metrics"] for r in compared["runs"]}}
    phases["evaluate"] = time.perf_counter() - start - sum(phases.values())
    from PIL import Image

    from train.logs import image_grid

    _export_and_retarget_one(cfg, out, result)
    phases["export_and_retarget"] = time.perf_counter() - start - sum(phases.values())
    metrics["seconds"] = {k: round(v, 1) for k, v in phases.items()}
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = slice(0, 8)
    grid = image_grid([result["source"][rows], result["pose"][rows], result["generated"][rows],
                       result["generated_no_reference"][rows], result["target"][rows]])
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "grid.png")
    a, b = metrics["with_reference"], metrics["without_reference"]
    for name, m in (("PMF (acm):        ", a), ("reference_only:   ", metrics["reference_only"]),
                    ("without reference:", b)):
        print(f"[demo] {name}  SSIM {m['ssim']:.4f}  PSNR {m['psnr']:.2f} dB  person colour error "
              f"{m['person_colour_error']:.1f} ΔE  clothing colour error {m['clothing_colour_error']:.1f} ΔE")
    print(f"[demo] wrote {out / 'grid.png'}, {out / 'metrics.json'}, {out / 'compare.md'} and {out / 'compare.png'} "
          f"in {metrics['total_seconds']:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
