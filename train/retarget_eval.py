"""Retargeting a run's held-out test pairs with its trained weights through the RetargetPipeline (the demo's
evaluation): the run's mode (``reference.mode``, the PMF model) and mode "controlnet_only" (the same weights,
reference bank disabled)."""

from __future__ import annotations

import numpy as np

from pmf_jax import input_pipeline
from pmf_jax.evaluation.model import load_run_parts
from pmf_jax.pipelines.from_run import pipeline_from_run, sampling_kwargs


def load_trained(cfg, step=None, ema: bool = True):
    """(:class:`~pmf_jax.pipelines.from_run.RunParts`, step) with the trained parts restored from
    ``cfg.train.output_dir`` (as ``pmf eval generate --model RUN`` loads a run)."""
    return load_run_parts(cfg, cfg.train.output_dir, step, ema=ema)


def pipelines_for_run(cfg, step=None):
    """{"generated": pipeline in the run's mode, "generated_no_reference": pipeline in mode "controlnet_only"} over
    the run's trained weights, and the step."""
    if cfg.model.base and cfg.model.text_encoder:
        raise NotImplementedError("the demo evaluation covers prompt-free runs; use `pmf eval generate`")
    run, step = load_trained(cfg, step)
    return {"generated": pipeline_from_run(run),
            "generated_no_reference": pipeline_from_run(run, mode="controlnet_only")}, step


def _uint8(images, low):
    return np.round((np.clip(images, low, 1.0) - low) / (1.0 - low) * 255).astype(np.uint8)


def generate_test_pairs(cfg, num_pairs: int = 64, batch_size: int = 16, step=None) -> dict:
    """Samples the first ``num_pairs`` pairs of the eval split with and without the reference bank.

    Returns numpy arrays [N, H, W, 3]: source, pose ([0, 1]), target, generated, generated_no_reference ([-1, 1]).
    """
    pipes, step = pipelines_for_run(cfg, step)
    loader = input_pipeline.make_loader(cfg.data.name, cfg.data.eval_split, cfg.data.data_dir, batch_size,
                                        cfg.data.height_width, config=cfg.data.builder_config, shuffle=False,
                                        augment=False, num_epochs=1, shard_index=0, shard_count=1)
    out = {k: [] for k in ("source", "pose", "target", "generated", "generated_no_reference")}
    height, width = cfg.data.height_width
    seen = 0
    for batch in loader:
        if seen >= num_pairs:
            break
        sources, poses = list(_uint8(batch["source"], -1.0)), list(_uint8(batch["pose"], 0.0))
        seeds = [cfg.sampling.seed + seen + i for i in range(len(sources))]  # the same noise for both variants
        for name, pipe in pipes.items():
            images = pipe(sources, poses, height=height, width=width, seed=seeds, pose_kind="skeleton",
                          output_type="np", **sampling_kwargs(cfg, pipe.mode))
            out[name].append(np.asarray(images) * 2.0 - 1.0)
        for name in ("source", "pose", "target"):
            out[name].append(batch[name])
        seen += len(sources)
    result = {k: np.concatenate(v)[:num_pairs] for k, v in out.items()}
    result["step"] = step
    return result
