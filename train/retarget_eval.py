"""The demo's evaluation: a run's held-out test pairs in every pipeline mode, generated and scored the way
``pmf eval generate`` / ``pmf eval score`` do (the same library calls, one process, the run's weights loaded once):
``acm`` (the trained PMF model), ``reference_only`` (its denoising UNet writes its own bank: Method 1) and
``controlnet_only`` (the same weights, no reference bank)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pmf_jax.evaluation import generate, read_pairs, score, write_report
from pmf_jax.evaluation.model import EvalModel, load_run_parts
from pmf_jax.evaluation.pairs import image_source
from pmf_jax.input_pipeline import prepare_pair
from pmf_jax.pipelines.from_run import pipeline_from_run

MODES = ("acm", "reference_only", "controlnet_only")


def load_trained(cfg, step=None, ema: bool = True):
    """(:class:`~pmf_jax.pipelines.from_run.RunParts`, step) with the trained parts restored from
    ``cfg.train.output_dir`` (as ``pmf eval generate --model RUN`` loads a run)."""
    return load_run_parts(cfg, cfg.train.output_dir, step, ema=ema)


def generate_modes(cfg, out: Path, num_pairs: int = 64, step=None, progress: bool = True) -> dict:
    """Writes ``out/<mode>/`` (images, generation.json, scores.json/.md with SSIM and PSNR) for the first
    ``num_pairs`` pairs of the eval split in every mode of :data:`MODES`; returns {mode: folder} and the step."""
    if cfg.model.base and cfg.model.text_encoder:
        raise NotImplementedError("the demo evaluation covers prompt-free runs; use `pmf eval generate`")
    run, step = load_trained(cfg, step)
    data = cfg.data
    folders = {}
    for mode in MODES:
        mode_cfg = dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, mode=mode))
        model = EvalModel("run", Path(cfg.train.output_dir).absolute(), step).with_overrides(
            [f"reference.mode={mode}"])
        folder = out / mode
        generate(mode_cfg, folder, split=data.eval_split, model=model, pipeline=pipeline_from_run(run, mode=mode),
                 limit=num_pairs, overwrite=True, progress=progress)
        results = score(folder, data.name, data.builder_config, data.data_dir, split=data.eval_split,
                        metrics=["ssim", "psnr"], progress=False)
        write_report(results, folder / "scores")
        folders[mode] = folder
    return {"folders": folders, "step": step}


def read_modes(cfg, folders: dict, num_pairs: int) -> dict:
    """The generated images of :func:`generate_modes` beside the pairs' inputs, as arrays [N, H, W, 3]: source,
    target ([-1, 1]), pose ([0, 1]), target_keypoints ([N, 18, 3], pixels) and one entry per mode ([-1, 1]), in split
    order."""
    from PIL import Image

    data = cfg.data
    pairs = read_pairs(data.name, data.builder_config, data.eval_split, data.data_dir)[:num_pairs]
    source = image_source(data.name, data.builder_config, data.eval_split, data.data_dir)
    out = {k: [] for k in ("source", "pose", "target", "target_keypoints", *folders)}
    for pair in pairs:
        example = prepare_pair(source[pair.index], data.height_width, None)
        for k in ("source", "pose", "target", "target_keypoints"):
            out[k].append(example[k])
        for mode, folder in folders.items():
            image = np.asarray(Image.open(Path(folder) / pair.filename).convert("RGB"), np.float32)
            out[mode].append(image / 127.5 - 1.0)
    return {k: np.stack(v) for k, v in out.items()}
