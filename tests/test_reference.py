"""Reference attention (ACM): JAX read/write against the PyTorch processor oracle, selection rules, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

from pmf_jax.io import from_pretrained
from pmf_jax.reference import ReferenceConfig, ReferenceRead, bank_paths, reading_blocks, select_bank, write_inputs
from pmf_jax.torch_compat.reference_attention import ReferenceState, install_reference_attention
from parity import randomize_, rel_err, to_nchw, to_nhwc

UNET = dict(block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4), cross_attention_dim=24, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1)
CONTROLNET = {k: v for k, v in UNET.items() if k != "up_block_types"}
CONTROLNET["conditioning_embedding_out_channels"] = (8, 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("acm")
    torch_models = {"unet": randomize_(TorchUNet(**UNET).eval(), seed=1, scale=0.15),
                    "reference_unet": randomize_(TorchUNet(**UNET).eval(), seed=2, scale=0.15),
                    "controlnet": randomize_(TorchControlNet(**CONTROLNET).eval(), seed=3, scale=0.15)}
    jax_models = {}
    for name, model in torch_models.items():
        model.save_pretrained(root / name)
        jax_models[name] = from_pretrained(root / name)
    state = ReferenceState()
    for model in torch_models.values():
        install_reference_attention(model, state)
    return torch_models, jax_models, state


def _inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((batch, 8, 8, 4)).astype(np.float32),
                ref=rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
                ctx=rng.standard_normal((batch, 5, 24)).astype(np.float32),
                cond=rng.uniform(size=(batch, 16, 16, 3)).astype(np.float32),
                t=np.array([400] * batch, np.int32))


def _torch_forward(torch_models, state, inp, config, uncond_mask=None, controlnet_reads=False, use_controlnet=False):
    t = torch.from_numpy(inp["t"]).long()
    ctx = torch.from_numpy(inp["ctx"])
    with torch.no_grad():
        state.write()
        torch_models["reference_unet"](to_nchw(inp["ref"]), t[:1], ctx[:1])
        state.read(config, uncond_mask=uncond_mask)
        residuals = {}
        if use_controlnet:
            if not controlnet_reads:
                state.off()
            down, mid = torch_models["controlnet"](to_nchw(inp["x"]), t, ctx, to_nchw(inp["cond"]), return_dict=False)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            state.read(config, uncond_mask=uncond_mask)
        out = torch_models["unet"](to_nchw(inp["x"]), t, ctx, **residuals).sample
        state.off()
    return to_nhwc(out)


def _jax_forward(jax_models, inp, config, uncond_mask=None, controlnet_reads=False, use_controlnet=False):
    (unet, p_unet), (ref_unet, p_ref), (cn, p_cn) = (jax_models[k] for k in ("unet", "reference_unet", "controlnet"))
    bank = ref_unet.apply({"params": p_ref}, inp["ref"], inp["t"][:1], inp["ctx"][:1], method=ref_unet.write_reference)
    kwargs = {}
    if use_controlnet:
        read = ReferenceRead.build(bank, config, len(inp["x"]), uncond_mask=uncond_mask) if controlnet_reads else None
        down, mid = cn.apply({"params": p_cn}, inp["x"], inp["t"], inp["ctx"], inp["cond"], reference=read)
        kwargs = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return unet.apply({"params": p_unet}, inp["x"], inp["t"], inp["ctx"],
                      reference=ReferenceRead.build(bank, config, len(inp["x"]), uncond_mask=uncond_mask), **kwargs)


CASES = {
    "full": dict(config=ReferenceConfig()),
    "midup": dict(config=ReferenceConfig(fusion_blocks="midup")),
    "auto_weight_half": dict(config=ReferenceConfig(attention_weight=0.5)),
    "guidance_batch_style_fidelity": dict(config=ReferenceConfig(style_fidelity=0.6), uncond_mask=np.array([1, 0])),
    "controlnet_reads": dict(config=ReferenceConfig(controlnet_reads_reference=True), use_controlnet=True,
                             controlnet_reads=True),
    "controlnet_does_not_read": dict(config=ReferenceConfig(), use_controlnet=True, controlnet_reads=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_mode_matches_torch_processor(models, case):
    torch_models, jax_models, state = models
    inp = _inputs()
    want = _torch_forward(torch_models, state, inp, **CASES[case])
    got = _jax_forward(jax_models, inp, **CASES[case])
    assert rel_err(got, want) <= 1e-4
    plain = jax_models["unet"][0].apply({"params": jax_models["unet"][1]}, inp["x"], inp["t"], inp["ctx"])
    assert rel_err(plain, want) > 1e-3  # the reference changed the output


def test_self_reference_changes_output_and_none_is_plain(models):
    _, jax_models, _ = models
    unet, params = jax_models["unet"]
    inp = _inputs(batch=1)
    plain_fn = jax.jit(lambda p, x: unet.apply({"params": p}, x, inp["t"], inp["ctx"]))
    none_fn = jax.jit(lambda p, x: unet.apply({"params": p}, x, inp["t"], inp["ctx"], reference=None))
    np.testing.assert_array_equal(np.asarray(plain_fn(params, inp["x"])), np.asarray(none_fn(params, inp["x"])))
    bank = unet.apply({"params": params}, inp["x"], inp["t"], inp["ctx"], method=unet.write_reference)
    read = unet.apply({"params": params}, inp["x"], inp["t"], inp["ctx"], reference=ReferenceRead(bank))
    # Reading a bank of the very same x duplicates every key and value: softmax over [h; h] equals softmax over h,
    # so the output equals the plain one up to rounding (a check that K/V really are the concatenation) ...
    assert 0 < float(jnp.abs(read - plain_fn(params, inp["x"])).max()) < 1e-5
    # ... while a bank of another latent (the source image) changes it.
    other = unet.apply({"params": params}, inp["ref"], inp["t"], inp["ctx"], method=unet.write_reference)
    read_other = unet.apply({"params": params}, inp["x"], inp["t"], inp["ctx"], reference=ReferenceRead(other))
    assert rel_err(read_other, plain_fn(params, inp["x"])) > 1e-3
    # ref_mix = 1 is the no-reference branch of appearance guidance: exactly plain attention
    mixed = unet.apply({"params": params}, inp["x"], inp["t"], inp["ctx"], reference=ReferenceRead(bank, jnp.ones(1)))
    assert rel_err(mixed, plain_fn(params, inp["x"])) < 1e-6


def test_bank_layout_and_writer_skips_output_conv(models):
    _, jax_models, _ = models
    ref_unet, params = jax_models["reference_unet"]
    inp = _inputs(batch=1)
    trimmed = {k: v for k, v in params.items() if k not in ("conv_out", "conv_norm_out")}
    bank = ref_unet.apply({"params": trimmed}, inp["ref"], inp["t"], inp["ctx"], method=ref_unet.write_reference)
    paths = ["/".join(p) for p in bank_paths(bank)]
    assert paths == ["down_blocks_0/attentions_0/transformer_blocks_0", "down_blocks_1/attentions_0/transformer_blocks_0",
                     "up_blocks_1/attentions_0/transformer_blocks_0", "up_blocks_1/attentions_1/transformer_blocks_0",
                     "up_blocks_2/attentions_0/transformer_blocks_0", "up_blocks_2/attentions_1/transformer_blocks_0",
                     "mid_block/attentions_0/transformer_blocks_0"]
    shapes = {p: bank_paths and v.shape for p, v in zip(paths, [bank[a][b][c] for a, b, c in bank_paths(bank)])}
    assert shapes["down_blocks_0/attentions_0/transformer_blocks_0"] == (1, 64, 16)
    assert shapes["mid_block/attentions_0/transformer_blocks_0"] == (1, 4, 32)


def test_block_selection_rules():
    widths = {("down_blocks_0", "a"): 16, ("down_blocks_1", "a"): 32, ("up_blocks_1", "a"): 32,
              ("up_blocks_2", "a"): 16, ("mid_block", "a"): 32}
    entries = list(widths.items())
    assert reading_blocks(entries, ReferenceConfig()) == set(widths)
    assert reading_blocks(entries, ReferenceConfig(fusion_blocks="midup")) == {
        ("up_blocks_1", "a"), ("up_blocks_2", "a"), ("mid_block", "a")}
    # widest first, module order (down, up, mid) among equals: weight 0.5 of 5 keeps ranks 0, 1, 2
    assert reading_blocks(entries, ReferenceConfig(attention_weight=0.5)) == {
        ("down_blocks_1", "a"), ("up_blocks_1", "a"), ("mid_block", "a")}
    bank = {"down_blocks_0": {"a": jnp.zeros((1, 4, 16))}, "mid_block": {"a": jnp.zeros((1, 4, 32))}}
    assert set(select_bank(bank, ReferenceConfig(fusion_blocks="midup"))) == {"mid_block"}


def test_write_inputs_timestep_and_noise():
    lat, noise, t = jnp.ones((2, 4, 4, 4)), jnp.full((2, 4, 4, 4), 2.0), jnp.array([5, 9])
    x, tt = write_inputs(ReferenceConfig(reference_timestep="zero"), lat, t)
    assert tt.tolist() == [0, 0] and x is lat
    x, tt = write_inputs(ReferenceConfig(noise_reference=True), lat, t, noise, lambda a, n, s: a + n * s[:, None, None, None])
    assert tt.tolist() == [5, 9] and float(x[1, 0, 0, 0]) == 19.0


def test_gradients_reach_the_reference_unet(models):
    _, jax_models, _ = models
    (unet, p_unet), (ref_unet, p_ref) = jax_models["unet"], jax_models["reference_unet"]
    inp = _inputs(batch=2)
    target = jnp.asarray(np.random.default_rng(9).standard_normal(inp["x"].shape), jnp.float32)

    def loss(p_ref):
        bank = ref_unet.apply({"params": p_ref}, inp["ref"], inp["t"][:1], inp["ctx"][:1], method=ref_unet.write_reference)
        out = unet.apply({"params": p_unet}, inp["x"], inp["t"], inp["ctx"], reference=ReferenceRead(bank))
        return jnp.mean((out - target) ** 2)

    grads = jax.jit(jax.grad(loss))(p_ref)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
    qkv = grads["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert float(jnp.abs(qkv).max()) > 0
    assert float(jnp.abs(grads["conv_in"]["kernel"]).max()) > 0
    # the writer stops after its last transformer block: its output conv gets no gradient
    assert float(jnp.abs(grads["conv_out"]["kernel"]).max()) == 0
