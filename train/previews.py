"""Sample grids during training: every ``train.eval_every`` steps the current weights retarget a fixed batch of the
eval split; the grid (source | target pose | sample | ground truth) goes to TensorBoard and ``previews/``."""

from __future__ import annotations


import jax
import numpy as np

from pmf_jax import input_pipeline, storage
from pmf_jax.pipelines.from_run import RunParts, pipeline_from_run, pipeline_params, sampling_kwargs
from train.logs import image_grid, log

MAX_IMAGES = 4


class Previews:
    """Built once per run; its retarget pipeline is built at the first preview and compiled once: later previews
    pass the new parameters to the same programs."""

    def __init__(self, cfg, components, frozen, writer, run_dir):
        self.cfg, self.components, self.writer = cfg, components, writer
        self.frozen = jax.device_get(frozen)
        self.dir = storage.as_path(run_dir) / "previews"
        self.active = jax.process_index() == 0 and jax.process_count() == 1 and components.controlnet is not None
        if jax.process_count() > 1:
            log("previews are off on multi-host runs (the sharded weights are not on one host)")
        self.batch = None
        self.pipeline = None
        if self.active:
            loader = input_pipeline.make_loader(
                cfg.data.name, cfg.data.eval_split, cfg.data.data_dir, min(cfg.data.eval_batch_size, MAX_IMAGES),
                cfg.data.height_width, config=cfg.data.builder_config, shuffle=False, augment=False, num_epochs=1,
                shard_index=0, shard_count=1)
            self.batch = next(iter(loader))

    def __call__(self, step: int, trainable, frozen_params) -> None:
        if not self.active:
            return
        cfg = self.cfg
        params = jax.device_get({**frozen_params, **trainable})
        if self.pipeline is None:
            self.pipeline = pipeline_from_run(RunParts(cfg, self.components, params, self.frozen))
        else:
            self.pipeline.set_params(pipeline_params(self.pipeline.mode, params, self.frozen))
        to_u8 = lambda x, low: np.round((np.clip(x, low, 1) - low) / (1 - low) * 255).astype(np.uint8)  # noqa
        height, width = cfg.data.height_width
        samples = self.pipeline(list(to_u8(self.batch["source"], -1.0)), list(to_u8(self.batch["pose"], 0.0)),
                                height=height, width=width, seed=cfg.sampling.seed, pose_kind="skeleton",
                                output_type="np", **sampling_kwargs(cfg))
        grid = image_grid([self.batch["source"], self.batch["pose"], np.asarray(samples), self.batch["target"]])
        self.writer.image(step, "samples", grid)
        storage.makedirs(self.dir)
        from PIL import Image

        with (self.dir / f"step_{step:07d}.png").open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
