"""Trainer on 8 virtual CPU devices: sharded steps equal the 1-device step; checkpoints move between meshes.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ (train_fixtures)
import train_fixtures  # noqa: E402
from pmf_jax.config import load_config  # noqa: E402
from pmf_jax.io.checkpoints import restore_trained_params  # noqa: E402
from train.loop import train_and_evaluate  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_synthetic.yaml")
jax.config.update("jax_default_matmul_precision", "highest")


def _rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(la, lb))
    return (num / sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)) ** 0.5


def _train(env, run_dir, mesh, n_devices, steps, max_steps=None):
    data, fsdp, tensor = mesh
    cfg = load_config(CONFIG, train_fixtures.overrides(
        env, run_dir, f"train.steps={steps}", "train.checkpoint_every=1", "data.batch_size=8", "train.lr=1e-3",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", "mesh.min_shard_size=256",
        "train.compilation_cache=true"))  # the runs here repeat meshes: later ones load the compiled programs
    train_and_evaluate(cfg, max_steps=max_steps, devices=jax.devices()[:n_devices])
    return restore_trained_params(run_dir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PMF_JAX_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        yield train_fixtures.prepare(tmp_path_factory.mktemp("train8"))


@pytest.fixture(scope="module")
def single(env, tmp_path_factory):
    """Two steps on one device, with the step-1 parameters kept aside."""
    root = tmp_path_factory.mktemp("single")
    one, _ = _train(env, root / "run", (1, 1, 1), 1, steps=1)
    two, step = _train(env, root / "run", (1, 1, 1), 1, steps=2)
    assert step == 2
    return {"step1": one, "step2": two}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1)], ids=["8x1x1", "2x4x1"])
def test_one_sharded_step_equals_single_device(env, single, tmp_path, mesh):
    params, step = _train(env, tmp_path / "run", mesh, 8, steps=1)
    assert step == 1
    assert _rel(params, single["step1"]) <= 1e-5
    assert _rel(single["step1"], single["step2"]) > 1e-4  # a step changes the params: the comparison has teeth


def test_checkpoint_from_2x4x1_resumes_on_4_devices_and_on_1(env, single, tmp_path):
    _train(env, tmp_path / "a", (2, 4, 1), 8, steps=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    on_four, step = _train(env, tmp_path / "a", (4, 1, 1), 4, steps=2)  # restores step 1 on (4,1,1), trains step 2
    assert step == 2 and _rel(on_four, single["step2"]) <= 1e-5
    on_one, step = _train(env, tmp_path / "b", (1, 1, 1), 1, steps=2)
    assert step == 2 and _rel(on_one, single["step2"]) <= 1e-5


def test_global_batch_must_divide_the_data_parallel_size(env, tmp_path):
    from pmf_jax.errors import PMFInputError

    cfg = load_config(CONFIG, train_fixtures.overrides(env, tmp_path / "run", "data.batch_size=4", "mesh.data=8"))
    with pytest.raises(PMFInputError, match="data.batch_size=4 must divide by the data-parallel size"):
        train_and_evaluate(cfg)
