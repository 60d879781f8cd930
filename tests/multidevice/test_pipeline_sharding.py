"""RetargetPipeline on 8 virtual CPU devices: the batch is padded to the device count and split over the devices,
and every image equals the one computed sample by sample from the modules on one device.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported).
"""

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: parity helpers and the pixel models

from parity import rel_err  # noqa: E402
from test_identity_vae import SCHEDULE, SIZE, build_pixel_models, pixel_inputs, reference_step  # noqa: E402

from pmf_jax.pipelines import RetargetPipeline  # noqa: E402
from pmf_jax.reference import ReferenceConfig  # noqa: E402

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
                allow_module_level=True)


def test_three_pairs_sharded_over_eight_devices(tmp_path):
    jax.config.update("jax_default_matmul_precision", "highest")
    models = build_pixel_models(tmp_path)
    pipe = RetargetPipeline(*models[:2], reference_unet=models[2], mode="acm", scheduler_config=SCHEDULE)
    sources, poses, x = pixel_inputs(3, seed=4)
    config = ReferenceConfig(style_fidelity=0.5, reference_timestep="zero")
    got = pipe(list(sources), list(poses), num_inference_steps=1, guidance_scale=2.5, scheduler="ddim",
               reference_config=config, height=SIZE, width=SIZE, pose_kind="skeleton", latents=x,
               output_type="latent")
    assert got.shape == x.shape
    assert rel_err(got, reference_step(models, sources, poses, x, config, 2.5)) <= 1e-5
    placed = jax.tree_util.tree_leaves(pipe.placed_params())[0]
    assert len(placed.sharding.device_set) == 8 and placed.sharding.is_fully_replicated
