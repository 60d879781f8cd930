"""A tiny trained-shaped run for the conversion tests, written with the trainer's own pieces (nothing compiled).

The run folder is what ``train.loop.train_and_evaluate`` writes for configs/tiny_synthetic.yaml with the small UNet of
train_fixtures (48 channels: 64x64 pixels in 4x4 patches): ``config.yaml`` + ``components.json`` (the loop's
``write_run_info``) and orbax checkpoints at steps 1 and 2 (``train.checkpointing.RunCheckpoints`` of a
``TrainState`` from ``init_state``). The parameter trees are those of ``components.build`` (run under
``jax.eval_shape``, so no init is compiled) filled with random "trained" values (ControlNet zero convs included), and
a different EMA copy.
tests/multidevice/test_convert_sharded.py writes it sharded over 8 devices and exports it on the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures
from tiny_sd import tiny_sd  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "tiny_synthetic.yaml")
STEPS = (1, 2)


def random_params(abstract, seed: int):
    """Random values for a Flax tree of shapes: kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases
    N(0, 0.02²); every layer non-zero (zero convs too), activations of a sane size."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(a.shape)
        elif name == "bias":
            value = 0.02 * rng.standard_normal(a.shape)
        else:
            value = rng.standard_normal(a.shape) / np.sqrt(max(1, int(np.prod(a.shape[:-1]))))
        return jnp.asarray(value, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def run_config(root: Path, run_dir: Path, *extra: str):
    from pmf_jax.config import load_config

    unet = root / "unet.json"
    if not unet.is_file():
        unet.write_text(json.dumps(train_fixtures.TINY_UNET))
    return load_config(CONFIG, [f"model.unet_config={unet}", f"train.output_dir={run_dir}", "data.batch_size=4",
                                "train.ema_decay=0.9", "train.zero_terminal_snr=false", *extra])  # as recorded


def write_run(root: Path, run_dir: Path, *extra: str, place=None, steps=STEPS) -> dict:
    """Writes the run; returns {step: {"params": {part: tree}, "ema": {part: tree}}} (numpy) of what was saved.

    ``place(state, cfg) -> state``: puts the train state on devices before saving (e.g. sharded over a mesh)."""
    from pmf_jax.training import components as components_lib
    from pmf_jax.training.state import init_state, make_optimizer
    from train import checkpointing
    from train.loop import write_run_info

    cfg = run_config(root, run_dir, *extra)
    built = {}

    def build(key):
        built["components"], params, _ = components_lib.build(cfg, key)
        return params

    abstract = jax.eval_shape(build, jax.random.key(cfg.train.seed))
    comps = built["components"]
    write_run_info(run_dir, cfg, comps)
    trainable = {part: abstract[part] for part in comps.trainable}
    tx = make_optimizer(cfg.train)
    checkpoints = checkpointing.RunCheckpoints(run_dir, keep=5, async_saves=False)  # as the trainer saves
    saved = {}
    for step in steps:
        state = init_state(random_params(trainable, seed=step), tx, cfg.train, jax.random.key(0))
        if cfg.train.ema_decay is not None:
            state = state.replace(ema_params=random_params(trainable, seed=100 + step))
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        if place is not None:
            state = place(state, cfg)
        checkpoints.save(step, state, None)
        saved[step] = {"params": jax.tree_util.tree_map(np.asarray, state.params),
                       "ema": None if state.ema_params is None else jax.tree_util.tree_map(np.asarray,
                                                                                          state.ema_params)}
    checkpoints.close()
    return saved


_BUILT = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run_dir, saved) of the tiny pixel-space run (mode acm, every part trained, EMA kept), built once."""
    if "run" not in _BUILT:
        root = tmp_path_factory.mktemp("convert_run")
        _BUILT["run"] = (root / "run", write_run(root, root / "run"))
    return _BUILT["run"]


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    """The run's latest step exported with `pmf convert to-diffusers` defaults (EMA, fp32)."""
    if "export" not in _BUILT:
        from pmf_jax.convert import export_to_diffusers

        _BUILT["export"] = export_to_diffusers(tiny_run[0], tmp_path_factory.mktemp("convert_export") / "export")
    return _BUILT["export"]


BASE_RUN = ("model.unet_config=null", "model.autoencoder=vae", "model.pixel_patch_size=1", "model.text_encoder=true",
            "train.stage=1", "train.trainable=[]", "train.prediction_type=epsilon", "data.resolution=[64,64]")


@pytest.fixture(scope="session")
def base_run(tiny_sd, tmp_path_factory):
    """(run_dir, saved) of a stage-1 run on the tiny SD base: only the reference UNet trains; the frozen UNet, VAE
    and CLIP are the base's, the pose ControlNet is model.controlnet (tiny_sd.controlnet)."""
    if "base_run" not in _BUILT:
        root = tmp_path_factory.mktemp("convert_base_run")
        saved = write_run(root, root / "run", f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}",
                          *BASE_RUN)
        _BUILT["base_run"] = (root / "run", saved)
    return _BUILT["base_run"]


@pytest.fixture(scope="session")
def base_export(base_run, tmp_path_factory):
    """The base run exported with --link (the base's vae/text_encoder/tokenizer files symlinked)."""
    if "base_export" not in _BUILT:
        from pmf_jax.convert import export_to_diffusers

        _BUILT["base_export"] = export_to_diffusers(base_run[0], tmp_path_factory.mktemp("convert_base") / "export",
                                                    link=True)
    return _BUILT["base_export"]

