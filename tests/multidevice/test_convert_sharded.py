"""`pmf convert to-diffusers` on a checkpoint saved sharded over 8 virtual CPU devices (FSDP x data mesh): the run is
restored onto the host without its mesh and the folders hold exactly the saved arrays.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ (convert_fixtures)
import convert_fixtures  # noqa: E402
from pmf_jax.convert import export_to_diffusers  # noqa: E402
from pmf_jax.io import from_pretrained  # noqa: E402
from pmf_jax.parallel import make_mesh, opt_state_shardings, param_shardings, replicated, rules_from_config  # noqa: E402
from pmf_jax.training.state import TrainState  # noqa: E402


def _shard(state, cfg):
    """The train state placed as the trainer places it on a (2, 4, 1) mesh (params and EMA FSDP-sharded)."""
    mesh = make_mesh(cfg.mesh)
    params_sh = param_shardings(state.params, mesh, rules_from_config(cfg.mesh))
    shardings = TrainState(step=replicated(mesh), params=params_sh, ema_params=params_sh, rng=replicated(mesh),
                           opt_state=opt_state_shardings(state.opt_state, state.params, params_sh, mesh))
    state = jax.device_put(state, shardings)
    leaves = jax.tree_util.tree_leaves(state.ema_params)
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)  # really sharded
    return state


def test_export_of_a_sharded_checkpoint(tmp_path):
    saved = convert_fixtures.write_run(tmp_path, tmp_path / "run", "mesh.data=2", "mesh.fsdp=4",
                                       "mesh.min_shard_size=256", place=_shard, steps=(1,))
    out = export_to_diffusers(tmp_path / "run", tmp_path / "export")
    for part in ("unet", "reference_unet", "controlnet"):
        params = from_pretrained(out / part)[1]
        expected = saved[1]["ema"][part]
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
        for a, e in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_array_equal(np.asarray(a), e)
