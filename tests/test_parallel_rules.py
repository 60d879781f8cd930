"""Partitioning rules on fake parameter trees (single process; no devices needed beyond the default one)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from pmf_jax.errors import PMFInputError
from pmf_jax.parallel import (DEFAULT_RULES, ShardingRules, batch_spec, logical_axes, logical_spec, make_mesh,
                              mirrored_partition_specs, param_partition_specs, param_spec, resolve_mesh_shape,
                              with_logical_constraint)

TB = "down_blocks_0/attentions_1/transformer_blocks_0"
CLIP = "text_model/encoder/layers_0"

# path → shape: SD1.5-sized parameters named as the old diffusers / transformers Flax checkpoints name them.
SD_SHAPES = {
    f"{TB}/attn1/to_q/kernel": (320, 320),
    f"{TB}/attn2/to_k/kernel": (768, 320),
    f"{TB}/attn1/to_out_0/kernel": (320, 320),
    f"{TB}/attn1/to_out_0/bias": (320,),
    f"{TB}/ff/net_0/proj/kernel": (320, 2560),
    f"{TB}/ff/net_2/kernel": (1280, 320),
    f"{TB}/norm1/scale": (320,),
    "conv_in/kernel": (3, 3, 4, 320),
    "down_blocks_0/resnets_0/conv1/kernel": (3, 3, 320, 640),
    "down_blocks_0/attentions_1/proj_in/kernel": (1, 1, 320, 320),
    "time_embedding/linear_1/kernel": (320, 1280),
    f"{CLIP}/self_attn/q_proj/kernel": (768, 768),
    f"{CLIP}/self_attn/out_proj/kernel": (768, 768),
    f"{CLIP}/mlp/fc1/kernel": (768, 3072),
    f"{CLIP}/mlp/fc2/kernel": (3072, 768),
    "text_model/embeddings/token_embedding/embedding": (49408, 768),
}

EXPECTED_FSDP4_TENSOR2 = {
    f"{TB}/attn1/to_q/kernel": P("fsdp", "tensor"),
    f"{TB}/attn2/to_k/kernel": P("fsdp", "tensor"),
    f"{TB}/attn1/to_out_0/kernel": P("tensor", "fsdp"),
    f"{TB}/attn1/to_out_0/bias": P(None),
    f"{TB}/ff/net_0/proj/kernel": P("fsdp", "tensor"),
    f"{TB}/ff/net_2/kernel": P("tensor", "fsdp"),
    f"{TB}/norm1/scale": P(None),
    "conv_in/kernel": P(None, None, None, None),                 # 11,520 elements < 2**14: replicated
    "down_blocks_0/resnets_0/conv1/kernel": P(None, None, None, "fsdp"),   # HWIO: largest dim (O=640)
    "down_blocks_0/attentions_1/proj_in/kernel": P(None, None, "fsdp", None),  # tie I=O: the first
    "time_embedding/linear_1/kernel": P(None, "fsdp"),
    f"{CLIP}/self_attn/q_proj/kernel": P("fsdp", "tensor"),
    f"{CLIP}/self_attn/out_proj/kernel": P("tensor", "fsdp"),
    f"{CLIP}/mlp/fc1/kernel": P("fsdp", "tensor"),
    f"{CLIP}/mlp/fc2/kernel": P("tensor", "fsdp"),
    "text_model/embeddings/token_embedding/embedding": P("fsdp", None),
}


def _tree(shapes):
    flat = {tuple(k.split("/")): jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    return traverse_util.unflatten_dict(flat)


def _flat_specs(specs):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(specs, is_leaf=lambda _, x: isinstance(x, P)).items()}


def test_sd_param_specs_fsdp_and_tensor():
    specs = _flat_specs(param_partition_specs(_tree(SD_SHAPES), {"data": 1, "fsdp": 4, "tensor": 2}))
    assert specs == EXPECTED_FSDP4_TENSOR2


def test_pure_data_parallel_replicates_everything():
    specs = param_partition_specs(_tree(SD_SHAPES), {"data": 8, "fsdp": 1, "tensor": 1})
    for path, spec in _flat_specs(specs).items():
        assert spec == P(*([None] * len(SD_SHAPES[path]))), path


def test_fsdp_only_shards_largest_divisible_dim():
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    # Without a tensor axis the attention kernels are free for FSDP.
    assert param_spec(f"{TB}/attn1/to_q/kernel", (320, 320), sizes) == P("fsdp", None)
    assert param_spec(f"{TB}/ff/net_0/proj/kernel", (320, 2560), sizes) == P(None, "fsdp")
    # Divisibility fallback: the largest dimension (331) does not divide by 3, the next one does.
    sizes3 = {"data": 1, "fsdp": 3, "tensor": 1}
    assert param_spec("a/kernel", (331, 330), sizes3) == P(None, "fsdp")
    assert param_spec("a/kernel", (331, 337), sizes3) == P(None, None)


def test_tensor_fallback_frees_dim_for_fsdp():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    # 330 heads*dim is not divisible by tensor=4: not tensor-sharded; FSDP then takes the largest divisible dim.
    assert param_spec(f"{TB}/attn1/to_q/kernel", (320, 330), sizes) == P(None, "fsdp")
    # out dim 320 divides by 4 but in dim 333 not by 2: tensor only.
    assert param_spec(f"{TB}/attn1/to_k/kernel", (333, 320), sizes) == P(None, "tensor")


def test_small_and_1d_params_replicated():
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    assert param_spec("x/bias", (4096,), sizes) == P(None)          # 1-D, even though large
    assert param_spec("x/kernel", (64, 255), sizes) == P(None, None)   # 16,320 < 2**14 elements
    assert param_spec("x/kernel", (64, 256), sizes) == P(None, "fsdp")  # exactly 2**14: sharded
    assert param_spec("step", (), sizes) == P()
    rules = ShardingRules(min_shard_size=2**20)
    assert param_spec(f"{TB}/attn1/to_q/kernel", (320, 320), sizes, rules) == P(None, None)


def test_logical_table_is_the_only_mesh_knowledge():
    assert logical_axes(f"{TB}/attn1/to_v/kernel", (320, 320)) == ("embed", "heads")
    assert logical_axes(f"{TB}/attn1/to_out_0/kernel", (320, 320)) == ("heads", "embed")
    assert logical_axes("conv_in/kernel", (3, 3, 4, 320)) == ("conv_height", "conv_width", "conv_in", "conv_out")
    assert logical_axes(f"{TB}/attn1/to_out_0/bias", (320,)) == (None,)
    # Turning tensor-parallel MLP off is a table edit; FSDP then shards the big MLP dim.
    rules = ShardingRules(logical_axes=(("batch", ("data", "fsdp")), ("heads", "tensor")))
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    assert param_spec(f"{TB}/ff/net_0/proj/kernel", (320, 2560), sizes, rules) == P(None, "fsdp")
    assert param_spec(f"{TB}/attn1/to_q/kernel", (320, 320), sizes, rules) == P("fsdp", "tensor")
    assert logical_spec(("batch", None, "heads")) == P(("data", "fsdp"), None, "tensor")
    assert batch_spec(4) == P(("data", "fsdp"), None, None, None)
    assert batch_spec(0) == P()


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [B, 128]
        return nn.Dense(128, name="to_out_0")(nn.Dense(256, name="to_q")(x))


def test_rules_on_abstract_and_concrete_trees_agree():
    x = jnp.ones((2, 128))
    abstract = jax.eval_shape(_TwoDense().init, jax.random.key(0), x)
    concrete = _TwoDense().init(jax.random.key(0), x)
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    a, c = param_partition_specs(abstract, sizes), param_partition_specs(concrete, sizes)
    assert a == c
    assert a["params"]["to_q"] == {"kernel": P("fsdp", "tensor"), "bias": P(None)}
    assert a["params"]["to_out_0"] == {"kernel": P("tensor", "fsdp"), "bias": P(None)}


@pytest.mark.parametrize("make_opt", [
    lambda: optax.adamw(1e-3),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(1e-3, 10))),
    lambda: optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2),
])
def test_opt_state_specs_mirror_params(make_opt):
    params = {"params": _tree(SD_SHAPES)}
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    pspecs = param_partition_specs(params, sizes)
    state = jax.eval_shape(make_opt().init, params)
    specs = mirrored_partition_specs(state, params, pspecs)
    flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    mirrored = 0
    for (path, leaf), spec in zip(flat_state, flat_specs):
        keys = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        hit = [p for p in SD_SHAPES if keys.endswith(p)]
        if hit and leaf.shape == SD_SHAPES[hit[0]]:
            assert spec == EXPECTED_FSDP4_TENSOR2[hit[0]], keys
            mirrored += 1
        else:
            assert spec == P() and leaf.ndim == 0, keys   # counters, scalars
    assert mirrored >= 2 * len(SD_SHAPES)   # at least mu and nu


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert resolve_mesh_shape((1, 8, 1), 8) == (1, 8, 1)
    with pytest.raises(PMFInputError, match=r"data=2, fsdp=2, tensor=1.*4 slots.*8 devices"):
        resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(PMFInputError, match="only one axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(PMFInputError, match="not divisible"):
        resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(PMFInputError, match="fsdp=0"):
        resolve_mesh_shape({"data": 1, "fsdp": 0}, 8)
    with pytest.raises(PMFInputError, match="unknown axes"):
        resolve_mesh_shape({"model": 2}, 8)
    mesh = make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert DEFAULT_RULES.mesh_axes_for("batch") == ("data", "fsdp")


def test_opt_state_specs_leave_unmatched_shapes_replicated():
    params = {"w": {"kernel": jax.ShapeDtypeStruct((256, 256), jnp.float32)}}
    specs = param_partition_specs(params, {"data": 1, "fsdp": 2, "tensor": 1})
    tree = {"mu": {"w": {"kernel": np.zeros((256, 128), np.float32)}}, "count": np.zeros((), np.int32)}
    out = mirrored_partition_specs(tree, params, specs)
    assert out == {"mu": {"w": {"kernel": P()}}, "count": P()}


def test_logical_constraint_is_noop_without_mesh():
    x = jnp.ones((4, 3))
    assert with_logical_constraint(x, ("batch", None)) is x
    assert jax.jit(lambda a: with_logical_constraint(a, ("batch", None)) * 2)(x).shape == (4, 3)
