"""train.zero_terminal_snr: one noise schedule for training, previews, exports and both samplers.

The trainer's noise schedule ends at ᾱ = 0 (the last training step shows no trace of the image, as the pure noise a
sampler starts from does), the sampling schedulers built from a run or an export start at that step (trailing
timesteps), and the export's scheduler_config.json says so, so that diffusers (the PyTorch side) samples the same way.
"""

from __future__ import annotations

import json

import jax
import numpy as np

import convert_fixtures
from pmf_jax.schedulers import make_scheduler


def test_zero_terminal_snr_reaches_training_exports_and_both_samplers(tmp_path):
    from pmf_jax.convert import export_to_diffusers
    from pmf_jax.pipelines import RetargetPipeline
    from pmf_jax.torch_compat.pipeline import PMFTorchPipeline
    from pmf_jax.training import components as components_lib

    run = tmp_path / "run"
    convert_fixtures.write_run(tmp_path, run, "train.zero_terminal_snr=true", steps=(1,))
    cfg = convert_fixtures.run_config(tmp_path, run, "train.zero_terminal_snr=true")
    built = {}

    def build(key):  # the parts as the trainer builds them (shapes only: nothing is initialised)
        built["components"], params, _ = components_lib.build(cfg, key)
        return params

    jax.eval_shape(build, jax.random.key(0))
    noise = built["components"].noise_scheduler
    plain = make_scheduler("ddpm", components_lib.DEFAULT_NOISE_SCHEDULE)
    assert float(noise.alphas_cumprod[-1]) == 0.0 and float(plain.alphas_cumprod[-1]) > 4e-3
    assert float(noise.alphas_cumprod[0]) == float(plain.alphas_cumprod[0])  # the first step is kept

    export = export_to_diffusers(run, tmp_path / "export")
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    assert config["prediction_type"] == "sample"
    # an export's pipeline, and a run's (previews, `pmf eval generate --model RUN`: pipeline_from_run)
    for config in (RetargetPipeline.from_pretrained(export).scheduler_config,
                   components_lib.sampling_scheduler_config(built["components"], cfg.train.prediction_type)):
        ddim = make_scheduler("ddim", config)
        assert int(ddim.timesteps(25)[0]) == 999 and float(ddim.alphas_cumprod[-1]) == 0.0

    theirs = PMFTorchPipeline.from_pretrained(export).scheduler  # diffusers' DDIMScheduler from the export's config
    theirs.set_timesteps(25)
    assert int(theirs.timesteps[0]) == 999 and float(theirs.alphas_cumprod[-1]) == 0.0
    np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), np.asarray(noise.alphas_cumprod), atol=1e-6)
