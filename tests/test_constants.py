"""pmf_jax.constants agrees with the libraries that act on its names (it imports none of them, so nothing else would
notice a drift)."""

import sys

import jax.numpy as jnp
import pytest

from pmf_jax import constants
from pmf_jax.config import Config, load_config
from pmf_jax.errors import PMFInputError


def test_constants_import_no_jax():
    import subprocess

    code = "import sys, pmf_jax.constants; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_scheduler_names_are_the_schedulers():
    from pmf_jax.schedulers import SCHEDULERS

    assert constants.SCHEDULER_NAMES == tuple(SCHEDULERS)
    assert constants.DEFAULT_SCHEDULER in constants.SCHEDULER_NAMES


def test_diffusers_has_every_scheduler_class():
    diffusers = pytest.importorskip("diffusers")
    from pmf_jax.schedulers import SCHEDULERS

    assert all(hasattr(diffusers, SCHEDULERS[name].DIFFUSERS_CLASS) for name in constants.SCHEDULER_NAMES)


def test_sd15_schedule_is_a_scheduler_config():
    from pmf_jax.schedulers import make_scheduler

    for name in constants.SCHEDULER_NAMES:
        scheduler = make_scheduler(name, constants.SD15_SCHEDULER_CONFIG)
        assert scheduler.num_train_timesteps == 1000 and scheduler.beta_schedule == "scaled_linear"
    assert constants.SD15_SCHEDULER_CONFIG.items() >= constants.SD15_NOISE_SCHEDULE.items()


def test_dtypes_and_attention_backends():
    from pmf_jax.models import attention

    assert all(jnp.dtype(name).name == name for name in constants.DTYPES)
    assert set(constants.DTYPE_SHORT_NAMES.values()) == set(constants.DTYPES)
    assert set(constants.ATTENTION_BACKENDS) == set(attention.BACKENDS)


def test_reference_options_are_the_reference_config_s():
    from pmf_jax.reference import ReferenceConfig

    for blocks in constants.FUSION_BLOCKS:
        for timestep in constants.REFERENCE_TIMESTEPS:
            ReferenceConfig(fusion_blocks=blocks, reference_timestep=timestep)
    with pytest.raises(PMFInputError):
        ReferenceConfig(fusion_blocks="down")
    with pytest.raises(PMFInputError):
        ReferenceConfig(reference_timestep="first")


def test_the_config_takes_every_mode_and_the_shared_defaults():
    for mode in constants.MODES:
        assert load_config(overrides=[f"reference.mode={mode}"]).reference.mode == mode
    defaults = Config()
    assert defaults.reference.mode == constants.DEFAULT_MODE
    s = defaults.sampling
    assert (s.scheduler, s.steps, s.text_guidance_scale) == (constants.DEFAULT_SCHEDULER, constants.DEFAULT_STEPS,
                                                             constants.DEFAULT_GUIDANCE_SCALE)
    assert s.reference_guidance_scale == 2.0
    assert load_config(overrides=["sampling.reference_guidance_scale=null"]).sampling.reference_guidance_scale is None


def test_the_retarget_command_shares_the_defaults():
    from pmf_jax.cli import build_parser

    args = build_parser().parse_args(["retarget", "--model", "m", "--source", "s.png", "--pose", "p.json",
                                      "--out", "o"])
    from pmf_jax.pipelines.defaults import BUILTIN_SAMPLING

    # unset sampling flags are resolved: the flag, else an export's pmf_config.json, else the shared constants
    assert (args.scheduler, args.steps, args.guidance_scale, args.pose_kind) == (None, None, None,
                                                                                 constants.POSE_KINDS[0])
    assert BUILTIN_SAMPLING == {"scheduler": constants.DEFAULT_SCHEDULER, "steps": constants.DEFAULT_STEPS,
                                "guidance_scale": constants.DEFAULT_GUIDANCE_SCALE}
    for kind in constants.POSE_KINDS:
        build_parser().parse_args(["retarget", "--model", "m", "--source", "s", "--pose", "p", "--out", "o",
                                   "--pose-kind", kind])
