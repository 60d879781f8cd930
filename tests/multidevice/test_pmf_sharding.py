"""The real PMF forward/backward (reference UNet -> bank -> ControlNet + UNet) sharded over 8 virtual CPU devices.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8. Meshes (8,1,1), (2,4,1), (1,8,1),
(2,2,2): loss, output and gradients equal the single-device result; large kernels are really sharded; with pure
data parallelism the compiled program gathers nothing (the bank's K/V concat is local to each device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmf_jax.models.controlnet import ControlNetModel
from pmf_jax.models.unet import UNet2DConditionModel
from pmf_jax.parallel import collective_counts, jit_sharded, make_mesh, param_shardings, shard_batch, shard_params
from pmf_jax.reference import ReferenceConfig, ReferenceRead

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh", allow_module_level=True)

jax.config.update("jax_default_matmul_precision", "highest")
CFG = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4,
           cross_attention_dim=32, norm_num_groups=8)
UNET = UNet2DConditionModel.from_config(CFG)
CONTROLNET = ControlNetModel.from_config({k: v for k, v in CFG.items() if k != "up_block_types"},
                                         ).clone(conditioning_embedding_out_channels=(8, 16))
REF_CFG = ReferenceConfig(controlnet_reads_reference=True)
B, HW = 8, 12  # 144 tokens per image: activations outweigh the kernels, as in SD
FF_KERNEL = ("unet", "mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "kernel")


def pmf_loss(params, batch):
    t, ctx = batch["t"], batch["ctx"]
    bank = UNET.apply({"params": params["reference_unet"]}, batch["ref"], t, ctx, method=UNET.write_reference)
    read = ReferenceRead.build(bank, REF_CFG, batch["x"].shape[0])
    down, mid = CONTROLNET.apply({"params": params["controlnet"]}, batch["x"], t, ctx, batch["pose"], reference=read)
    out = UNET.apply({"params": params["unet"]}, batch["x"], t, ctx, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, reference=read)
    return jnp.mean((out - batch["y"]) ** 2), out


loss_and_grad = jax.value_and_grad(pmf_loss, has_aux=True)


def _rel(a, b):
    num = sum(float(jnp.sum((jnp.asarray(x, jnp.float32) - np.asarray(y)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return (num / sum(float(np.sum(np.asarray(y) ** 2)) for y in jax.tree.leaves(b))) ** 0.5


@pytest.fixture(scope="module")
def single_device():
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((B, HW, HW, 4)), "ref": rng.standard_normal((B, HW, HW, 4)),
             "y": rng.standard_normal((B, HW, HW, 4)), "ctx": rng.standard_normal((B, 3, 32)),
             "pose": rng.uniform(size=(B, 2 * HW, 2 * HW, 3)), "t": rng.integers(0, 1000, (B,))}
    batch = {k: v.astype(np.int32 if k == "t" else np.float32) for k, v in batch.items()}
    with jax.default_device(jax.devices()[0]):
        keys = jax.random.split(jax.random.key(0), 3)
        params = {"unet": UNET.init_params(keys[0]), "reference_unet": UNET.init_params(keys[1]),
                  "controlnet": CONTROLNET.init_params(keys[2])}
        # non-zero ControlNet output convs, so its path (and its reading of the bank) matters
        params["controlnet"] = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.05 if "controlnet_" in jax.tree_util.keystr(p) else x, params["controlnet"])
        (loss, out), grads = jax.jit(loss_and_grad)(params, batch)
    return dict(batch=batch, params=jax.device_get(params), loss=loss, out=out, grads=grads)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_pmf_step_matches_single_device(shape, single_device):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    p_sh = param_shardings(single_device["params"], mesh)
    params = shard_params(single_device["params"], mesh)
    batch = shard_batch(single_device["batch"], mesh)
    fn = jit_sharded(loss_and_grad, mesh, (p_sh, "batch"), (("replicated", "batch"), p_sh))
    compiled = fn.lower(params, batch).compile()
    (loss, out), grads = compiled(params, batch)
    assert _rel(loss, single_device["loss"]) <= 1e-5
    assert _rel(out, single_device["out"]) <= 1e-5
    assert _rel(grads, single_device["grads"]) <= 1e-5
    kernel = params
    for key in FF_KERNEL:
        kernel = kernel[key]
    fsdp, tensor = shape[1], shape[2]
    axes = [a for a in kernel.sharding.spec if a is not None]
    assert ("fsdp" in axes) == (fsdp > 1) and ("tensor" in axes) == (tensor > 1), kernel.sharding.spec
    assert kernel.addressable_shards[0].data.size == kernel.size // (fsdp * tensor)
    if shape == (8, 1, 1):
        counts = collective_counts(compiled.as_text())
        # pure data parallelism: the bank stays on its device; only the gradients are all-reduced
        assert counts.get("all-gather", 0) == 0 and counts.get("all-to-all", 0) == 0
        assert counts.get("all-reduce", 0) > 0
