"""UNet2DConditionModel parity with diffusers (fp32, relative error ≤ 1e-4) on tiny configs covering every branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from pmf_jax.io import from_pretrained
from parity import randomize_, rel_err, to_nchw, to_nhwc

BASE = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
            cross_attention_dim=24, norm_num_groups=8, sample_size=8)

CONFIGS = {
    "sd15_like": dict(BASE),
    "sd2_like_linear_list_heads_upcast": dict(
        BASE, block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        upcast_attention=True, cross_attention_dim=40,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "ip2p_8ch_two_transformer_layers": dict(BASE, in_channels=8, transformer_layers_per_block=2, layers_per_block=2),
    "only_cross_flip_shift_center": dict(BASE, only_cross_attention=True, flip_sin_to_cos=False, freq_shift=1,
                                         center_input_sample=True, layers_per_block=(1, 2)),
}


def _build(tmp_path, config, seed=0):
    torch_model = randomize_(TorchUNet(**config).eval(), seed=seed, scale=0.15)
    torch_model.save_pretrained(tmp_path / "unet")
    module, params = from_pretrained(tmp_path / "unet", dtype=jnp.float32)
    return torch_model, module, params


def _inputs(config, batch=2, size=(8, 8), seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *size, config.get("in_channels", 4))).astype(np.float32)
    ctx = rng.standard_normal((batch, 5, config["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 700][:batch], dtype=np.int32)
    return x, t, ctx


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_matches_diffusers(tmp_path, name):
    config = CONFIGS[name]
    torch_model, module, params = _build(tmp_path, config)
    x, t, ctx = _inputs(config)
    with torch.no_grad():
        want = to_nhwc(torch_model(to_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample)
    got = jax.jit(module.apply)({"params": params}, x, t, ctx)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def test_unet_odd_latent_size_and_scalar_timestep(tmp_path):
    config = CONFIGS["sd2_like_linear_list_heads_upcast"]
    torch_model, module, params = _build(tmp_path, config)
    x, _, ctx = _inputs(config, size=(10, 6))
    with torch.no_grad():
        want = to_nhwc(torch_model(to_nchw(x), 321, torch.from_numpy(ctx)).sample)
    got = module.apply({"params": params}, x, 321, ctx)
    assert rel_err(got, want) <= 1e-4


def test_unet_controlnet_residuals(tmp_path):
    config = CONFIGS["sd15_like"]
    torch_model, module, params = _build(tmp_path, config)
    x, t, ctx = _inputs(config)
    rng = np.random.default_rng(3)
    # skip shapes: conv_in, down0 layer, down0 downsampler, down1 layer; mid at the lowest resolution
    shapes = [(2, 8, 8, 16), (2, 8, 8, 16), (2, 4, 4, 16), (2, 4, 4, 32)]
    down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mid = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
    with torch.no_grad():
        want = to_nhwc(torch_model(to_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                                   down_block_additional_residuals=[to_nchw(d) for d in down],
                                   mid_block_additional_residual=to_nchw(mid)).sample)
        plain = to_nhwc(torch_model(to_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample)
    got = module.apply({"params": params}, x, t, ctx, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(plain, want) > 1e-2  # the residuals matter


def test_sd15_parameter_count_matches_torch():
    from pmf_jax.models.unet import UNet2DConditionModel

    config = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    abstract = UNet2DConditionModel.from_config(config).abstract_params()
    ours = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(abstract))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchUNet(**config).parameters())
    assert ours == theirs == 859_520_964
