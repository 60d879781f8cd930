"""IP-Adapter's parts against the PyTorch oracles: the CLIP image encoder (transformers), its image processor, the
image projections and where the attention kernels go (diffusers' own loader), parameter counts, bad files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file

import pmf_jax.io as pio
from parity import rel_err
from pmf_jax.errors import PMFInputError
from pmf_jax.io.ip_adapter import cross_attention_paths, cross_attention_shapes, image_proj_key, image_proj_path
from pmf_jax.io.naming import torch_key_to_flax_module_path
from pmf_jax.models.clip_image_processor import ImageProcessorConfig, preprocess
from pmf_jax.models.clip_vision import CLIPVisionModelWithProjection, CLIPVisionOutput
from pmf_jax.models.image_projection import ImageProjection, IPAdapterPlusImageProjection
from pmf_jax.models.unet import UNet2DConditionModel
from pmf_jax.scaling.abstract import SD15_UNET
from ip_adapter_fixtures import (EMBED, PLUS_HIDDEN, TOKENS, diffusers_cross_attentions, load_into_diffusers, nested,
                                 public_state, tiny_vision_config, torch_vision)
from tiny_sd import CLIP_DIM, UNET

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
# A tiny UNet with cross-attention in every block, two transformer layers in the second level (and so in the mid
# block): 17 attn2 layers of two widths, numbered 1, 3, ..., 33 by diffusers.
IP_UNET = dict(UNET, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
               layers_per_block=2, transformer_layers_per_block=(1, 2))
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
             image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
VIT_BIGG = dict(VIT_H, hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, projection_dim=1280)


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


# ---- (a) the image encoder -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_vision_encoder_parity_and_round_trip(hidden_act, tmp_path):
    config = tiny_vision_config(hidden_act=hidden_act)
    model = torch_vision(config)
    model.save_pretrained(tmp_path / "torch")
    if hidden_act == "gelu":
        # The Hub's image_encoder folders (transformers 4.x): the position_ids buffer and 4.x config keys.
        from safetensors.numpy import load_file

        weights = tmp_path / "torch" / "model.safetensors"
        state = load_file(weights)
        state["vision_model.embeddings.position_ids"] = np.arange(26, dtype=np.int64)[None]
        save_file(state, weights, metadata={"format": "pt"})
        saved = json.loads((tmp_path / "torch" / "config.json").read_text())
        saved.update(_name_or_path="laion/CLIP-ViT-H-14", torch_dtype="float32", dropout=0.0,
                     transformers_version="4.28.0.dev0")
        (tmp_path / "torch" / "config.json").write_text(json.dumps(saved))
    module, params = pio.from_pretrained(tmp_path / "torch")
    assert isinstance(module, CLIPVisionModelWithProjection) and module.hidden_act == hidden_act

    pixels = np.random.default_rng(1).normal(size=(2, 30, 30, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    got = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, pixels)
    assert isinstance(got, CLIPVisionOutput)
    assert got.last_hidden_state.shape == (2, 1 + 25, 32) and got.image_embeds.shape == (2, EMBED)
    errors = {"image_embeds": rel_err(got.image_embeds, want.image_embeds),
              "last_hidden_state": rel_err(got.last_hidden_state, want.last_hidden_state)}
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        errors[f"hidden_states[{i}]"] = rel_err(g, w)
    print(hidden_act, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors

    # Our save -> transformers load: the very same tensors.
    pio.save_pretrained(module, params, tmp_path / "ours")
    reloaded = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.hidden_act == hidden_act and reloaded.config.projection_dim == EMBED
    original = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key

    with pytest.raises(PMFInputError, match=r"\[B, 30, 30, 3\]"):
        module.apply({"params": params}, pixels[:, :24, :24])


def test_vision_config_errors():
    with pytest.raises(PMFInputError, match="hidden_act='relu'"):
        CLIPVisionModelWithProjection.from_config(tiny_vision_config(hidden_act="relu").to_dict())
    with pytest.raises(PMFInputError, match="not_a_key"):
        CLIPVisionModelWithProjection.from_config({**tiny_vision_config().to_dict(), "not_a_key": 1})


# ---- (b) the image processor ---------------------------------------------------------------------------------------

def photo(height, width, seed=0):
    """A smooth pattern with noise (uint8 [H, W, 3]): sharp enough that resampling differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    wave = np.sin(xx / 7.0)[..., None] * np.cos(yy / 11.0)[..., None] * np.array([100, 80, 60])
    return (127 + wave + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)


def test_preprocess_matches_clip_image_processor(tmp_path):
    sizes = [(300, 200), (97, 131), (50, 400), (224, 224)]  # portrait, landscape upscale, extreme, unchanged
    pil_processor = transformers.CLIPImageProcessorPil()
    tv_processor = transformers.CLIPImageProcessor()
    config = ImageProcessorConfig.from_dict(tv_processor.to_dict())
    assert config == ImageProcessorConfig()
    for h, w in sizes:
        image = photo(h, w)
        ours = preprocess(image, config)
        assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
        # Pillow's arithmetic exactly: transformers 4.x's CLIPImageProcessor, 5.x's CLIPImageProcessorPil.
        pil = pil_processor(image, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(ours, pil, rtol=0, atol=1e-6)
        # transformers 5.x's default (torchvision) rounds its uint8 passes differently: a level or two, rarely.
        tv = tv_processor(image, return_tensors="pt").pixel_values.numpy().transpose(0, 2, 3, 1)
        level = 1 / 255 / min(config.image_std)
        diff = np.abs(ours - tv)
        assert diff.max() <= 2 * level + 1e-6 and (diff > 1e-5).mean() < 0.01 and rel_err(ours, tv) < 3e-3
        # Float images ([0, 1]) are resampled without rounding: torchvision's float path.
        floats = np.random.default_rng(h).random((h, w, 3))
        tv_float = tv_processor(torch.from_numpy(floats * 255).permute(2, 0, 1).float(),
                                return_tensors="pt").pixel_values.numpy().transpose(0, 2, 3, 1)
        assert rel_err(preprocess(floats, config), tv_float) <= 1e-5

    # Settings from a folder: other sizes, bilinear, own statistics; a batch of differently sized images.
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36},
                                                   resample=2, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    processor.save_pretrained(tmp_path)
    config = ImageProcessorConfig.from_folder(tmp_path)
    images = [photo(60, 90, 1), photo(81, 45, 2)]
    want = processor(images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(preprocess(images, config), want, rtol=0, atol=1e-6)
    # Legacy int sizes; no file -> diffusers' CLIPImageProcessor(size=image_size, crop_size=image_size).
    legacy = ImageProcessorConfig.from_dict({"size": 40, "crop_size": 32, "feature_extractor_type":
                                             "CLIPFeatureExtractor"})
    assert legacy.size == (40,) and legacy.crop_size == (32, 32)
    assert ImageProcessorConfig.from_folder(tmp_path / "none", image_size=30).crop_size == (30, 30)
    with pytest.raises(PMFInputError, match="resample=0"):
        ImageProcessorConfig.from_dict({"resample": 0}, "cfg.json")
    with pytest.raises(PMFInputError, match="unknown key 'crop_pct'"):
        ImageProcessorConfig.from_dict({"crop_pct": 0.9})
    with pytest.raises(PMFInputError, match=r"RGB \[H, W, 3\]"):
        preprocess(np.zeros((10, 10, 4), np.uint8))


# ---- (c) image projections and (d) the attention kernels, through diffusers' own loader ----------------------------

def diffusers_unet(config=IP_UNET):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def ip_unet():
    """(diffusers UNet, our UNet module, its abstract params) of IP_UNET."""
    unet = diffusers_unet()
    ours = UNet2DConditionModel.from_config(dict(unet.config))
    return unet, ours, ours.abstract_params()


@pytest.mark.parametrize("kind", ["ip_adapter", "plus"])
def test_adapter_against_diffusers(kind, ip_unet, tmp_path):
    unet, our_unet, abstract = ip_unet
    state = public_state(kind, unet)
    path = tmp_path / "ip-adapter.safetensors"
    save_file(state, str(path))
    adapter = pio.load_ip_adapter(path)
    assert adapter.kind == kind and adapter.num_tokens == TOKENS and adapter.cross_attention_dim == CLIP_DIM
    module, params = adapter.image_proj
    assert isinstance(module, ImageProjection if kind == "ip_adapter" else IPAdapterPlusImageProjection)
    if kind == "plus":
        assert (module.heads, module.depth, module.hidden_dims, module.embed_dims) == (2, 4, PLUS_HIDDEN, EMBED)

    # diffusers reads the same file.
    unet = load_into_diffusers(diffusers_unet(), path).unet
    oracle = unet.encoder_hid_proj.image_projection_layers[0]
    rng = np.random.default_rng(5)
    features = rng.standard_normal((2, EMBED) if kind == "ip_adapter" else (2, 7, EMBED)).astype(np.float32)
    with torch.no_grad():
        want = oracle(torch.from_numpy(features)).numpy()
    got = module.apply({"params": params}, features)
    err = rel_err(got, want)
    print(kind, f"image projection rel err {err:.1e}")
    assert got.shape == (2, TOKENS, CLIP_DIM) and err <= TOL

    merged = adapter.merge_into(our_unet, abstract)
    flat = traverse_util.flatten_dict(merged)
    added = {path[:-2] for path in flat if path[-2] in ("to_k_ip", "to_v_ip")}
    crosses = diffusers_cross_attentions(unet)
    assert len(crosses) == 17 and len(added) == 17
    assert len(flat) == len(traverse_util.flatten_dict(abstract)) + 2 * 17
    for name, _ in crosses:
        path = torch_key_to_flax_module_path(name + ".x")[0]
        assert path in added, name
        processor = unet.attn_processors[name + ".processor"]
        for key in ("to_k_ip", "to_v_ip"):
            np.testing.assert_array_equal(np.asarray(flat[path + (key, "kernel")]),
                                          getattr(processor, key)[0].weight.detach().numpy().T)
    assert [p[:1] for p in cross_attention_paths(abstract)][:6] == [("down_blocks_0",)] * 2 + [("down_blocks_1",)] * 4
    assert cross_attention_paths(abstract)[-1][0] == "mid_block"

    # (g) back to the file's keys, exactly; and in half precision.
    again = adapter.to_state_dict()
    assert set(again) == set(state)
    for key, value in state.items():
        assert again[key].dtype == value.dtype and np.array_equal(again[key], value), key
    half = {k: v.astype(np.float16) for k, v in state.items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    back = pio.load_ip_adapter(tmp_path / "half.safetensors").to_state_dict(np.float16)
    assert all(np.array_equal(back[k], v) for k, v in half.items())


def test_image_proj_naming_rule():
    assert image_proj_path("image_proj.layers.0.1.3.weight") == ("layers_0_1_3", "weight")
    assert image_proj_path("image_proj.layers.2.0.to_kv.weight") == ("layers_2_0", "to_kv", "weight")
    assert image_proj_key(("layers_0_1_3", "kernel")) == "image_proj.layers.0.1.3.weight"
    assert image_proj_key(("layers_2_0", "norm1", "scale")) == "image_proj.layers.2.0.norm1.weight"
    assert image_proj_key(("proj_in", "bias")) == "image_proj.proj_in.bias"
    assert image_proj_key(("latents",)) == "image_proj.latents"


def test_encoder_to_tokens(ip_unet, tmp_path):
    """The encoder's output feeds each projection: image_embeds (IP-Adapter), hidden_states[-2] (Plus)."""
    unet = ip_unet[0]
    encoder = CLIPVisionModelWithProjection.from_config(tiny_vision_config(hidden_size=EMBED, num_attention_heads=4)
                                                        .to_dict())
    enc_params = jax.jit(encoder.init_params)(jax.random.key(0))
    output = jax.jit(encoder.apply)({"params": enc_params}, jnp.ones((2, 30, 30, 3)))
    for kind in ("ip_adapter", "plus"):
        path = tmp_path / f"{kind}.safetensors"
        save_file(public_state(kind, unet), str(path))
        adapter = pio.load_ip_adapter(path, image_encoder=encoder)
        tokens = jax.jit(adapter.image_tokens)(output)
        module, params = adapter.image_proj
        features = output.image_embeds if kind == "ip_adapter" else output.hidden_states[-2]
        assert rel_err(tokens, jax.jit(module.apply)({"params": params}, features)) <= 1e-6
        assert tokens.shape == (2, TOKENS, CLIP_DIM)


# ---- (e) parameter counts ------------------------------------------------------------------------------------------

def test_parameter_counts():
    hub = dict(VIT_H, architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model",
               _name_or_path="", attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
               num_channels=3, torch_dtype="float16", transformers_version="4.28.0.dev0")
    with torch.device("meta"):
        vit_h = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_H))
        vit_g = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_BIGG))
        sd15 = diffusers.UNet2DConditionModel(**{k: v for k, v in SD15_UNET.items() if not k.startswith("_")})
        projection = diffusers.models.embeddings.ImageProjection(image_embed_dim=1024, cross_attention_dim=768,
                                                                 num_image_text_embeds=4)
        plus = diffusers.models.embeddings.IPAdapterPlusImageProjection(
            embed_dims=1280, output_dims=768, hidden_dims=768, heads=12, num_queries=16)
    torch_count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(CLIPVisionModelWithProjection.from_config(hub).abstract_params()) == torch_count(vit_h) \
        == 632_076_800
    assert count(CLIPVisionModelWithProjection.from_config(VIT_BIGG).abstract_params()) == torch_count(vit_g) \
        == 1_844_907_264

    # ip-adapter_sd15 as shapes: our image projection (names by our rule) and to_k_ip/to_v_ip shaped by our SD1.5
    # UNet. diffusers' loader builds its modules from its own config and loads these strictly (any other key or
    # shape is an error); what it adds to its UNet's parameters is the adapter's count.
    shapes = cross_attention_shapes(UNet2DConditionModel.from_config(SD15_UNET).abstract_params())
    projection_shapes = traverse_util.flatten_dict(ImageProjection(1024, 768, 4).abstract_params())
    meta = lambda shape: torch.empty(shape, device="meta")  # noqa: E731
    state = {"image_proj": {image_proj_key(path)[len("image_proj."):]: meta(shape.shape[::-1])
                            for path, shape in projection_shapes.items()},
             "ip_adapter": {f"{2 * i + 1}.{name}.weight": meta(shape[::-1])
                            for i, shape in enumerate(shapes.values()) for name in ("to_k_ip", "to_v_ip")}}
    assert len(shapes) == 16
    before = torch_count(sd15)
    with torch.device("meta"):
        load_into_diffusers(sd15, state)
    ours = sum(2 * a * b for a, b in shapes.values()) + count(projection_shapes)
    assert torch_count(sd15) - before == ours == 22_319_616  # ip-adapter_sd15 (the paper's "22M")
    assert count(projection_shapes) == torch_count(projection)
    ours_plus = IPAdapterPlusImageProjection(embed_dims=1280, output_dims=768, hidden_dims=768, heads=12,
                                             num_queries=16)
    assert count(ours_plus.abstract_params()) == torch_count(plus)
    attention = sum(2 * a * b for a, b in shapes.values())
    assert count(ours_plus.abstract_params()) + attention == 49_087_488  # ip-adapter-plus_sd15


# ---- (f) bad input -------------------------------------------------------------------------------------------------

def test_bad_files(ip_unet, tmp_path):
    unet, our_unet, abstract = ip_unet
    good = public_state("ip_adapter", unet)

    def write(state, name="bad.safetensors"):
        path = tmp_path / name
        save_file(state, str(path))
        return path

    def fails(path, match, **kwargs):
        with pytest.raises(PMFInputError, match=match) as info:
            pio.load_ip_adapter(path, **kwargs)
        assert str(path) in str(info.value)
        return info.value

    (tmp_path / "notes.txt").write_text("hello")
    fails(tmp_path / "notes.txt", "not an IP-Adapter weight file")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 40)
    fails(tmp_path / "broken.safetensors", "cannot read IP-Adapter weights")
    fails(tmp_path / "absent.safetensors", "does not exist")
    fails(write({"conv_in.weight": np.zeros((4, 4), np.float32)}), r"no image_proj\.\* keys")
    fails(write({k: v for k, v in good.items() if k != "image_proj.norm.weight"}), "missing key image_proj.norm.weight")
    plus = public_state("plus", unet)
    fails(write({k: v for k, v in plus.items() if k != "image_proj.layers.1.0.to_kv.weight"}),
          r"missing keys \(1\): image_proj.layers.1.0.to_kv.weight")
    fails(write({**good, "image_proj.proj.weight": np.zeros((TOKENS * CLIP_DIM + 1, EMBED), np.float32)}),
          "image_proj.proj.weight has 129 outputs, not num_tokens")
    fails(write({**plus, "image_proj.latents": np.zeros((1, TOKENS, 96), np.float32)}),
          "image_proj.proj_in.weight")
    fails(write({**good, "ip_adapter.3.to_k_ip.weight": np.zeros((16, 48), np.float32)}),
          "ip_adapter.3.to_k_ip.weight has shape")
    fails(write({k: v for k, v in good.items() if k != "ip_adapter.5.to_v_ip.weight"}),
          "missing key ip_adapter.5.to_v_ip.weight")
    fails(write({**good, "ip_adapter.1.to_k_lora.down.weight": np.zeros((4, 4), np.float32)}),
          "unexpected keys.*to_k_lora")
    fails(write({"image_proj.proj.0.weight": np.zeros((4, 4), np.float32),
                 "image_proj.proj.3.weight": np.zeros(4, np.float32)}), "Full Face")
    nan = dict(good)
    nan["ip_adapter.7.to_k_ip.weight"] = np.full_like(good["ip_adapter.7.to_k_ip.weight"], np.nan)
    fails(write(nan), "ip_adapter.7.to_k_ip.weight holds NaN")

    # An image encoder of another width.
    path = write(good, "good.safetensors")
    other = CLIPVisionModelWithProjection.from_config(tiny_vision_config(projection_dim=16).to_dict())
    fails(path, r"image_proj.proj.weight takes 24-dim .* gives 16 \(projection_dim\)", image_encoder=other)
    with pytest.raises(PMFInputError, match=r"proj_in.weight takes 24-dim .* gives 32 \(hidden_size\)"):
        pio.load_ip_adapter(write(plus, "plus.safetensors")).check_image_encoder(other)

    # A UNet of another layout: the tiny SD UNet has 4 cross-attentions, not 17.
    adapter = pio.load_ip_adapter(path)
    small = UNet2DConditionModel.from_config(UNET)
    with pytest.raises(PMFInputError, match=f"{path}: 17 ip_adapter.<n> pairs for a UNet with 4 cross-attention"):
        adapter.merge_into(small, small.abstract_params())
    wide = UNet2DConditionModel.from_config(dict(UNET, cross_attention_dim=48))
    with pytest.raises(PMFInputError, match="cross_attention_dim is 48"):
        adapter.merge_into(wide, wide.abstract_params())

    # A pickle (.bin, the nested dict torch.save writes) only with the opt-in; then the same adapter.
    torch.save(nested(good), tmp_path / "ip-adapter.bin")
    refused = fails(tmp_path / "ip-adapter.bin", "pickle file.*allow_pickle=True")
    assert "--allow-pickle" in refused.cli_message
    from_pickle = pio.load_ip_adapter(tmp_path / "ip-adapter.bin", allow_pickle=True).to_state_dict()
    assert all(np.array_equal(from_pickle[k], v) for k, v in good.items()) and set(from_pickle) == set(good)
