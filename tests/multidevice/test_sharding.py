"""Sharded init / forward / gradient on 8 virtual CPU devices equal the single-device result.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported).
The toy model uses the UNet's parameter names (conv_in, attentions_0/proj_in, transformer_blocks_0/attn1/to_q,
ff/net_0/proj, ...) and reads a reference bank through its self-attention K/V, like the denoising UNet.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pmf_jax.errors import PMFInputError
from pmf_jax.parallel import (batch_sharding, collective_counts, init_sharded, jit_sharded, make_global_batch,
                              make_mesh, opt_state_shardings, param_piece_shapes, shard_batch, shard_params,
                              unexpected_all_gathers, with_logical_constraint)

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
                allow_module_level=True)

# HW=12: 144 tokens per image, a size no parameter dimension has (a gathered activation cannot pass for a parameter
# piece), and activations outweigh the kernels, as in real models, so XLA gathers kernels rather than activations.
C, HEADS, B, HW = 128, 4, 8, 12
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x, kv_extra=None):  # x: [B, L, C]; kv_extra: [B, Lr, C]
        kv = x if kv_extra is None else jnp.concatenate([x, kv_extra], axis=1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, C // HEADS)  # noqa: E731
        q = split(nn.Dense(C, use_bias=False, name="to_q")(x))
        k = split(nn.Dense(C, use_bias=False, name="to_k")(kv))
        v = split(nn.Dense(C, use_bias=False, name="to_v")(kv))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * (C // HEADS) ** -0.5, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape)
        return nn.Dense(C, name="to_out_0")(out)


class _GEGLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        # Naming the output's axes pins the batch split whatever XLA's cost model prefers (with 64 tokens per image it
        # all-gathered the tiny activation instead of the FSDP-sharded kernel). Real blocks can do the same.
        proj = with_logical_constraint(nn.Dense(8 * C, name="proj")(x), ("batch", None, "mlp"))  # [B, L, 8C]
        h, gate = jnp.split(proj, 2, axis=-1)  # [B, L, 4C] each
        return h * nn.gelu(gate)


class _FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C, name="net_2")(_GEGLU(name="net_0")(x))


class _TransformerBlock(nn.Module):
    @nn.compact
    def __call__(self, x, bank):  # x: [B, L, C]
        h = nn.LayerNorm(name="norm1")(x)
        bank.append(h)  # write: what enters self-attention
        read = bank[0] if len(bank) > 1 else None  # read: the reference's tokens (second call)
        x = x + _Attention(name="attn1")(h, read)
        return x + _FeedForward(name="ff")(x)


class _AttentionBlock(nn.Module):
    @nn.compact
    def __call__(self, x, bank):  # x: [B, H, W, C]
        h = nn.Conv(C, (1, 1), name="proj_in")(nn.GroupNorm(32, name="norm")(x))
        return x + _TransformerBlock(name="transformer_blocks_0")(h.reshape(x.shape[0], -1, C), bank).reshape(x.shape)


class ToyUNet(nn.Module):
    """[B, 12, 12, 4] latent + [B, 12, 12, 4] reference latent → [B, 12, 12, 4]. The reference runs through the same
    weights first (reference-only style); the second pass reads its bank in self-attention."""

    @nn.compact
    def __call__(self, x, ref):
        conv_in = nn.Conv(C, (3, 3), padding=1, name="conv_in")
        block = _AttentionBlock(name="attentions_0")
        bank = []
        block(conv_in(ref), bank)
        bank[0] = with_logical_constraint(bank[0], ("batch", None, None))  # the bank keeps the batch split
        h = block(conv_in(x), bank)
        return nn.Conv(4, (3, 3), padding=1, name="conv_out")(h)


MODEL = ToyUNet()
TO_Q = ("params", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
EXPECTED_TO_Q = {(8, 1, 1): P(None, None), (2, 4, 1): P("fsdp", None), (1, 8, 1): P("fsdp", None),
                 (2, 2, 2): P("fsdp", "tensor")}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _loss(params, batch):
    out = MODEL.apply(params, batch["x"], batch["ref"])
    return jnp.mean((out - batch["y"]) ** 2), out


_loss_and_grad = jax.value_and_grad(_loss, has_aux=True)  # ((loss, out [B, 12, 12, 4]), grads)


def _rel(a, b):
    num = sum(float(jnp.sum((jnp.asarray(x, jnp.float32) - y) ** 2)) for x, y in zip(jax.tree.leaves(a),
                                                                                        jax.tree.leaves(b)))
    den = sum(float(jnp.sum(jnp.asarray(y, jnp.float32) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def reference():
    """Single-device params, batch, loss, output and gradient."""
    rng = np.random.default_rng(0)
    batch = {k: rng.standard_normal((B, HW, HW, 4)).astype(np.float32) for k in ("x", "ref", "y")}
    with jax.default_device(jax.devices()[0]):
        params = jax.jit(MODEL.init)(jax.random.key(0), batch["x"], batch["ref"])
        (loss, out), grads = jax.jit(_loss_and_grad)(params, batch)
    return dict(batch=batch, params=params, out=out, loss=loss, grads=grads)


def _mesh(shape):
    return make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_and_grad_match_single_device(shape, reference):
    mesh = _mesh(shape)
    params = shard_params(reference["params"], mesh)
    kernel = _get(params, TO_Q)
    assert kernel.sharding.spec == EXPECTED_TO_Q[shape]
    shard = kernel.addressable_shards[0].data.shape
    assert shard == kernel.sharding.shard_shape(kernel.shape)
    if shape != (8, 1, 1):
        assert np.prod(shard) < np.prod(kernel.shape)  # really split, not replicated

    p_sh = jax.tree.map(lambda a: a.sharding, params)
    batch = shard_batch(reference["batch"], mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None, None, None)

    # Forward + backward in one program (the output is the aux), checked against the single-device result.
    grad_fn = jit_sharded(_loss_and_grad, mesh, (p_sh, "batch"), (("replicated", "batch"), p_sh))
    compiled = grad_fn.lower(params, batch).compile()
    (loss, out), grads = compiled(params, batch)
    assert abs(float(loss) - float(reference["loss"])) <= 1e-5 * abs(float(reference["loss"]))
    assert out.sharding.is_equivalent_to(batch_sharding(mesh, 4), 4)
    assert _rel(out, reference["out"]) < 1e-5
    assert _rel(grads, reference["grads"]) < 1e-5
    assert _get(grads, TO_Q).sharding.spec == EXPECTED_TO_Q[shape]
    # Parameters may be gathered (FSDP); activations — the latents and the reference bank — never are.
    assert unexpected_all_gathers(compiled.as_text(), param_piece_shapes(params, mesh)) == []


def test_data_parallel_forward_has_no_all_gather(reference):
    mesh = _mesh((8, 1, 1))
    params = shard_params(reference["params"], mesh)
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    batch = shard_batch(reference["batch"], mesh)
    fwd = jit_sharded(lambda p, b: MODEL.apply(p, b["x"], b["ref"]), mesh, (p_sh, "batch"), "batch")
    compiled = fwd.lower(params, batch).compile()
    assert "all-gather" not in collective_counts(compiled.as_text())
    assert unexpected_all_gathers(compiled.as_text(), param_piece_shapes(params, mesh)) == []
    assert _rel(compiled(params, batch), reference["out"]) < 1e-5


def test_init_sharded_and_optimizer_step(reference):
    mesh = _mesh((2, 2, 2))
    params = init_sharded(MODEL.init, mesh, jax.random.key(0), reference["batch"]["x"], reference["batch"]["ref"])
    assert _rel(params, reference["params"]) == 0.0  # partitionable PRNG: the same values whatever the layout
    assert _get(params, TO_Q).sharding.spec == P("fsdp", "tensor")

    opt = optax.adamw(1e-2)
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    o_sh = opt_state_shardings(jax.eval_shape(opt.init, params), params, p_sh, mesh)
    opt_state = jax.jit(opt.init, out_shardings=o_sh)(params)
    assert _get(opt_state[0].mu, TO_Q).sharding.spec == P("fsdp", "tensor")
    assert opt_state[0].count.sharding.spec == P()

    def update(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    grads = jax.device_put(reference["grads"], p_sh)
    sharded_update = jit_sharded(update, mesh, (p_sh, o_sh, p_sh), (p_sh, o_sh), donate_argnums=(0, 1))
    new_params, new_state = sharded_update(params, opt_state, grads)
    expected, _ = jax.jit(update)(reference["params"], opt.init(reference["params"]), reference["grads"])
    assert _rel(new_params, expected) < 1e-6
    assert _get(new_state[0].nu, TO_Q).sharding.spec == P("fsdp", "tensor")


def test_batch_placement_helpers():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "step": np.int32(7)}
    for fn in (shard_batch, make_global_batch):
        out = fn(local, mesh)
        assert out["image"].shape == (8, 3) and out["image"].sharding.spec == P(("data", "fsdp"), None)
        assert len({s.index[0].start for s in out["image"].addressable_shards}) == 8
        np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
        assert out["step"].sharding.spec == P() and int(out["step"]) == 7
        with pytest.raises(PMFInputError, match=r"'pose'.* 6 .*8 batch shards"):
            fn({"pose": np.zeros((6, 2), np.float32)}, mesh)

