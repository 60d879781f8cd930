"""The sample-major row layout (pmf_jax.rows) and a reference bank with fewer samples than the reader's batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmf_jax.models.unet import UNet2DConditionModel
from pmf_jax.reference import ReferenceRead
from pmf_jax.rows import expand_rows, repeat_rows, row_pattern, split_rows

CFG = dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
           cross_attention_dim=8, norm_num_groups=4)


def test_layout_helpers():
    x = jnp.arange(3)[:, None] * jnp.ones((3, 2))                       # samples 0, 1, 2
    rows = repeat_rows(x, 2)
    np.testing.assert_array_equal(rows[:, 0], [0, 0, 1, 1, 2, 2])         # row n·G + g holds sample n
    u, c = split_rows(rows, 2)
    np.testing.assert_array_equal(u, x)
    np.testing.assert_array_equal(c, x)
    np.testing.assert_array_equal(row_pattern([1.0, 0.0], 3), [1, 0, 1, 0, 1, 0])
    tree = expand_rows({"a": x[:1], "b": {"c": x}}, 6)
    np.testing.assert_array_equal(tree["a"][:, 0], [0] * 6)
    np.testing.assert_array_equal(tree["b"]["c"][:, 0], [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="do not divide"):
        expand_rows(x[:2], 3)


def test_bank_with_fewer_samples_reads_its_own_sample():
    """Two sources, four rows (two guidance rows or frames each): rows 0-1 read source 0 and rows 2-3 source 1, the
    same as a bank repeated to the batch by hand, and not the [s0, s1, s0, s1] tiling."""
    unet = UNet2DConditionModel(**CFG)
    params = jax.jit(unet.init_params)(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (4, 8, 8, 4))
    sources = jax.random.normal(keys[1], (2, 8, 8, 4))
    ctx = jax.random.normal(keys[2], (4, 3, 8))
    t = jnp.array([5, 5, 700, 700])

    @jax.jit
    def run(bank):
        return unet.apply({"params": params}, x, t, ctx, reference=ReferenceRead(bank))

    bank = unet.apply({"params": params}, sources, t[::2], ctx[::2], method=unet.write_reference)   # [2, L, C]
    small = run(bank)
    by_hand = run(jax.tree_util.tree_map(lambda b: jnp.repeat(b, 2, axis=0), bank))
    tiled = run(jax.tree_util.tree_map(lambda b: jnp.tile(b, (2, 1, 1)), bank))
    np.testing.assert_array_equal(small, by_hand)
    assert float(jnp.abs(small[1] - tiled[1]).max()) > 1e-3   # row 1 must read source 0, the tiling gives source 1
    with pytest.raises(ValueError, match="do not divide"):
        unet.apply({"params": params}, x[:3], t[:3], ctx[:3], reference=ReferenceRead(bank))


def test_reference_must_be_a_read():
    unet = UNet2DConditionModel(**CFG)
    params = unet.abstract_params()
    with pytest.raises(TypeError, match="ReferenceRead"):
        jax.eval_shape(lambda p: unet.apply({"params": p}, *unet.dummy_inputs(), reference={"mid_block": {}}), params)
