"""A tiny training setup shared by the trainer tests: synthetic_pairs/tiny built once, a small UNet config."""

from __future__ import annotations

import json
from pathlib import Path

TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 48, "out_channels": 48, "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 2, "cross_attention_dim": 16, "norm_num_groups": 8,
}
# One cross-attention block at 48 channels: the smallest UNet the scaling planner compiles (pmf scaling tests).
ONE_BLOCK_UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 48, "out_channels": 48, "block_out_channels": [32],
    "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 8,
}


def prepare(root: Path) -> dict:
    """Builds synthetic_pairs/tiny under root/tfds (once) and writes root/unet.json; returns the base overrides."""
    from pmf_jax import input_pipeline

    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "tfds"
    input_pipeline.build("synthetic_pairs", data_dir, config="tiny")
    unet = root / "unet.json"
    unet.write_text(json.dumps(TINY_UNET))
    return {"data_dir": data_dir, "unet": unet}


def overrides(env: dict, run_dir: Path, *extra: str) -> list:
    return [f"data.data_dir={env['data_dir']}", "data.builder_config=tiny", f"model.unet_config={env['unet']}",
            "data.batch_size=4", f"train.output_dir={run_dir}", "train.warmup_steps=0", "train.log_every=1",
            "train.compilation_cache=false",  # in-process runs leave the test process's JAX config alone
            "train.zero_terminal_snr=false",  # the recorded losses and images used SD's own schedule
            "train.person_loss_weight=1.0",   # ... and a plain mean
            "train.ema_decay=null", *extra]  # the tests compare trained params, not the demo's EMA copy
