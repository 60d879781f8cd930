"""train.person_loss_weight: the loss weighs the target person's latent pixels (the pose map's drawn pixels pooled to
the latent grid, grown by one) more than the background; the demo recipe uses it."""

import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pmf_jax.config import load_config
from pmf_jax.errors import PMFInputError
from pmf_jax.training.objective import weighted_loss, person_mask

ROOT = Path(__file__).resolve().parents[1]


def test_person_mask_pools_the_drawn_pose_to_the_latent_grid_and_grows_it_by_one():
    pose = np.zeros((2, 16, 16, 3), np.float32)
    pose[0, 5, 9, 1] = 0.3    # one drawn pixel -> latent cell (1, 2) of a 4x4 grid
    mask = np.asarray(person_mask(jnp.asarray(pose), (4, 4)))
    assert mask.shape == (2, 4, 4, 1)
    want = np.zeros((4, 4), np.float32)
    want[0:3, 1:4] = 1.0      # the 3x3 around (1, 2)
    np.testing.assert_array_equal(mask[0, ..., 0], want)
    assert not mask[1].any()  # nothing drawn: no person


def test_the_weighted_loss_is_the_mean_of_the_weighted_squares():
    cfg = types.SimpleNamespace(person_loss_weight=5.0, min_snr_gamma=None)
    pred = jnp.zeros((1, 4, 4, 2))
    target = jnp.ones((1, 4, 4, 2)) * 2.0              # squared error 4 everywhere
    mask = jnp.zeros((1, 4, 4, 1)).at[0, :2, :, 0].set(1.0)   # half the cells
    loss = float(weighted_loss(pred, target, None, None, cfg, mask))
    assert loss == pytest.approx(4.0 * (0.5 * 5.0 + 0.5 * 1.0))
    assert float(weighted_loss(pred, target, None, None, cfg)) == pytest.approx(4.0)   # no mask: the plain mean


def test_the_demo_recipe_weighs_the_person_and_bad_weights_are_refused():
    assert load_config(ROOT / "configs" / "tiny_synthetic.yaml").train.person_loss_weight == 10.0
    assert load_config(None).train.person_loss_weight == 1.0
    with pytest.raises(PMFInputError, match="person_loss_weight"):
        load_config(None, ["train.person_loss_weight=0"])
