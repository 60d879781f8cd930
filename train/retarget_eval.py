"""Retargeting a run's test pairs with its trained weights (the demo's evaluation; eval generate builds on it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax import input_pipeline
from pmf_jax.io.checkpoints import restore_trained_params
from pmf_jax.training import components as components_lib
from pmf_jax.training.sampling import sample


def load_trained(cfg, step=None, ema: bool = True):
    """(components, params, frozen, step) with the trained parts restored from ``cfg.train.output_dir``."""
    comps, params, frozen = components_lib.build(cfg, jax.random.key(cfg.train.seed))
    trained, step = restore_trained_params(cfg.train.output_dir, step, ema=ema)
    for part, tree in trained.items():
        params[part] = jax.tree_util.tree_map(jnp.asarray, tree)
    if cfg.reference.mode == "reference_only":
        import dataclasses

        comps = dataclasses.replace(comps, reference_unet=comps.unet)
        params["reference_unet"] = params["unet"]
    return comps, params, frozen, step


def generate_test_pairs(cfg, num_pairs: int = 64, batch_size: int = 16, step=None) -> dict:
    """Samples the first ``num_pairs`` pairs of the eval split with and without the reference bank.

    Returns numpy arrays [N, H, W, 3]: source, pose ([0, 1]), target, generated, generated_no_reference ([-1, 1]).
    """
    comps, params, frozen, step = load_trained(cfg, step)
    loader = input_pipeline.make_loader(cfg.data.name, cfg.data.eval_split, cfg.data.data_dir, batch_size,
                                        cfg.data.height_width, config=cfg.data.builder_config, shuffle=False,
                                        augment=False, num_epochs=1, shard_index=0, shard_count=1)
    out = {k: [] for k in ("source", "pose", "target", "generated", "generated_no_reference")}
    reference_cfg = cfg.reference.to_reference_config()
    kwargs = dict(components=comps, reference_cfg=reference_cfg, scheduler_name=cfg.sampling.scheduler,
                  steps=cfg.sampling.steps, prediction_type=cfg.train.prediction_type)
    key = jax.random.key(cfg.sampling.seed)
    seen = 0
    for i, batch in enumerate(loader):
        if seen >= num_pairs:
            break
        k = jax.random.fold_in(key, i)  # the same noise for both variants
        for name, use_ref in (("generated", True), ("generated_no_reference", False)):
            images = sample(params, frozen, batch["source"], batch["pose"], k, use_reference=use_ref, **kwargs)
            out[name].append(np.asarray(images))
        for name in ("source", "pose", "target"):
            out[name].append(batch[name])
        seen += batch["source"].shape[0]
    result = {k: np.concatenate(v)[:num_pairs] for k, v in out.items()}
    result["step"] = step
    return result
