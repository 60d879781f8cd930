"""Loading/saving model folders: round trips through diffusers, sharded files, the HF cache, and clear errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file

from pmf_jax.errors import PMFInputError
from pmf_jax.io import from_pretrained, save_pretrained
from parity import randomize_, rel_err, to_nchw, to_nhwc

UNET = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
            cross_attention_dim=24, norm_num_groups=8, sample_size=8)
CONTROLNET = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  layers_per_block=1, attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8,
                  conditioning_embedding_out_channels=(8, 16))


@pytest.fixture(scope="module")
def torch_unet():
    return randomize_(TorchUNet(**UNET).eval(), seed=11, scale=0.15)


@pytest.fixture()
def unet_dir(tmp_path, torch_unet):
    torch_unet.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


def _unet_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 8, 8, 4)).astype(np.float32), np.array([5], np.int32),
            rng.standard_normal((1, 3, 24)).astype(np.float32))


def _torch_unet_out(model, x, t, ctx):
    with torch.no_grad():
        return to_nhwc(model(to_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample)


def test_unet_round_trip_through_diffusers(tmp_path, unet_dir, torch_unet):
    module, params = from_pretrained(unet_dir)
    out = save_pretrained(module, params, tmp_path / "saved")
    reloaded = TorchUNet.from_pretrained(out).eval()
    x, t, ctx = _unet_inputs()
    np.testing.assert_array_equal(_torch_unet_out(reloaded, x, t, ctx), _torch_unet_out(torch_unet, x, t, ctx))
    # and every tensor is bit-identical to the original state dict
    original = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(original)
    assert all(np.array_equal(saved[k], original[k]) for k in original)


def test_controlnet_round_trip_through_diffusers(tmp_path):
    torch_cn = randomize_(TorchControlNet(**CONTROLNET).eval(), seed=12)
    torch_cn.save_pretrained(tmp_path / "cn")
    module, params = from_pretrained(tmp_path / "cn")
    save_pretrained(module, params, tmp_path / "cn2")
    reloaded, info = TorchControlNet.from_pretrained(tmp_path / "cn2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in torch_cn.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_sharded_checkpoint_and_pipeline_subfolder(tmp_path, torch_unet):
    torch_unet.save_pretrained(tmp_path / "pipe" / "unet", max_shard_size="40KB")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    module, params = from_pretrained(tmp_path / "pipe", subfolder="unet")
    x, t, ctx = _unet_inputs()
    assert rel_err(module.apply({"params": params}, x, t, ctx), _torch_unet_out(torch_unet, x, t, ctx)) <= 1e-4


def test_bf16_params_and_fp16_variant(tmp_path, torch_unet):
    torch_unet.half().save_pretrained(tmp_path / "unet", variant="fp16")
    torch_unet.float()
    module, params = from_pretrained(tmp_path / "unet", variant="fp16", dtype=jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves(params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    x, t, ctx = _unet_inputs()
    out = module.apply({"params": params}, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), _torch_unet_out(torch_unet, x, t, ctx)) < 5e-2


def test_hub_repo_id_from_local_cache_offline(tmp_path, torch_unet):
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--someone--tiny-sd" / "snapshots" / "0123abcd"
    torch_unet.save_pretrained(snapshot / "unet")
    (cache / "models--someone--tiny-sd" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0123abcd")
    code = ("from pmf_jax.io import from_pretrained; import jax; "
            "m, p = from_pretrained('someone/tiny-sd', subfolder='unet'); "
            "print(sum(x.size for x in jax.tree_util.tree_leaves(p)))")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip()) == sum(p.numel() for p in torch_unet.parameters())
    missing = subprocess.run([sys.executable, "-c", "from pmf_jax.io import from_pretrained; "
                              "from_pretrained('someone/not-there')"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "neither a local folder nor a repo in the Hugging Face cache" in missing.stderr


def test_wrong_folder_and_missing_config(tmp_path):
    with pytest.raises(PMFInputError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PMFInputError, match="no config.json"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(PMFInputError, match="no subfolder 'unet'"):
        from_pretrained(tmp_path / "empty", subfolder="unet")


def test_unknown_class_and_unsupported_option(tmp_path, unet_dir):
    config = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps(dict(config, _class_name="UNet3DConditionModel")))
    with pytest.raises(PMFInputError, match="UNet3DConditionModel.*not supported"):
        from_pretrained(unet_dir)
    (unet_dir / "config.json").write_text(json.dumps(dict(config, class_embed_type="timestep", bogus_key=1)))
    with pytest.raises(PMFInputError, match=r"class_embed_type='timestep'.*unknown config keys: bogus_key"):
        from_pretrained(unet_dir)


def test_corrupted_safetensors(unet_dir):
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(PMFInputError, match="cannot read weights file .*diffusion_pytorch_model.safetensors"):
        from_pretrained(unet_dir)


def test_missing_unexpected_and_misshaped_keys_listed_together(unet_dir):
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["conv_in.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = np.zeros((4, 16, 1, 1), np.float32)
    save_file(state, str(weights))
    with pytest.raises(PMFInputError) as err:
        from_pretrained(unet_dir)
    text = str(err.value)
    assert "missing keys (1): conv_in.bias" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "conv_out.weight: (4, 16, 1, 1)" in text


def test_pickle_refused_unless_allowed(tmp_path, torch_unet):
    torch_unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(PMFInputError, match="pickle.*allow_pickle=True"):
        from_pretrained(tmp_path / "unet")
    module, params = from_pretrained(tmp_path / "unet", allow_pickle=True)
    x, t, ctx = _unet_inputs()
    assert rel_err(module.apply({"params": params}, x, t, ctx), _torch_unet_out(torch_unet, x, t, ctx)) <= 1e-4


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, unet_dir):
    module, params = from_pretrained(unet_dir)
    target = tmp_path / "out"
    broken = dict(params, conv_in={"kernel": np.array(["not", "numbers"]), "bias": params["conv_in"]["bias"]})
    with pytest.raises(Exception):
        save_pretrained(module, broken, target)
    assert not target.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    save_pretrained(module, params, target)
    with pytest.raises(PMFInputError, match="already exists"):
        save_pretrained(module, params, target)
    save_pretrained(module, params, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
