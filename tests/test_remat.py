"""Gradient checkpointing (train.remat) changes memory, not values: same loss and gradients, same param names."""

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.models.unet import UNet2DConditionModel
from pmf_jax.reference import ReferenceRead
from parity import rel_err

CFG = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
           cross_attention_dim=16, norm_num_groups=8)


def test_remat_gradients_equal_plain():
    plain = UNet2DConditionModel.from_config(CFG)
    remat = UNet2DConditionModel.from_config(CFG, gradient_checkpointing=True)
    params = plain.init_params(jax.random.key(0))
    assert jax.tree_util.tree_structure(remat.abstract_params()) == jax.tree_util.tree_structure(params)
    rng = np.random.default_rng(0)
    x, ref = rng.standard_normal((2, 8, 8, 4)), rng.standard_normal((2, 8, 8, 4))
    ctx, t = rng.standard_normal((2, 3, 16)), np.array([3, 500])

    def loss(model):
        def fn(p):
            bank = model.apply({"params": p}, ref, t, ctx, method=model.write_reference)
            return jnp.mean(model.apply({"params": p}, x, t, ctx, reference=ReferenceRead(bank)) ** 2)
        return jax.jit(jax.value_and_grad(fn))(params)

    (l0, g0), (l1, g1) = loss(plain), loss(remat)
    assert abs(float(l0) - float(l1)) < 1e-6
    leaves0, leaves1 = jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)
    assert max(rel_err(a, b) for a, b in zip(leaves1, leaves0) if np.linalg.norm(b) > 0) < 1e-5
