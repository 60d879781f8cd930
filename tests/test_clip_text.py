"""CLIPTextModel parity with transformers: tiny random torch models, saved and loaded by pmf_jax.io."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import pmf_jax.io as pio
from pmf_jax.errors import PMFInputError
from pmf_jax.models.clip_text import CLIPTextModel, CLIPTextOutput, load_tokenizer
from parity import rel_err
from pmf_jax.models.letter_tokenizer import write_letter_vocab

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB, T = 100, 12


def tiny_config(**overrides):
    config = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=16, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=1)
    config.update(overrides)
    return transformers.CLIPTextConfig(**config)


def torch_clip(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # move norms and biases off their init values so every tensor is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def token_ids(eos):
    """Two rows: eos repeated as padding, and one eos mid-sequence; random ids elsewhere (some above eos)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, (2, T)).astype(np.int64)
    ids[ids == eos] = 3
    ids[0, 5:] = eos
    ids[1, 3] = eos
    return ids


def torch_forward(model, ids, attention_mask=None):
    with torch.no_grad():
        out = model(torch.from_numpy(ids),
                    attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
                    output_hidden_states=True)
    return out


def jax_encode(module, params, ids, attention_mask=None):
    fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, method=module.encode))
    with jax.default_matmul_precision("highest"):
        return fn(params, jnp.asarray(ids, jnp.int32), None if attention_mask is None else jnp.asarray(attention_mask))


CASES = {
    "quick_gelu_legacy_eos": dict(hidden_act="quick_gelu", eos_token_id=2),
    # A mid-vocabulary eos id (pad = eos, as SD2's tokenizer pads): pooling at the first eos, not at argmax(ids).
    "gelu_eos": dict(hidden_act="gelu", eos_token_id=50, pad_token_id=50),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(name, tmp_path):
    config = tiny_config(**CASES[name])
    model = torch_clip(config)
    model.save_pretrained(tmp_path / "torch")
    module, params = pio.from_pretrained(tmp_path / "torch")
    assert isinstance(module, CLIPTextModel)
    assert module.hidden_act == config.hidden_act and module.eos_token_id == config.eos_token_id

    ids = token_ids(config.eos_token_id)
    want = torch_forward(model, ids)
    got = jax_encode(module, params, ids)
    assert isinstance(got, CLIPTextOutput)
    pooled_at = ids.argmax(-1) if config.eos_token_id == 2 else (ids == config.eos_token_id).argmax(-1)
    if config.eos_token_id != 2:
        assert (pooled_at != ids.argmax(-1)).all()
    errors = {"last_hidden_state": rel_err(got.last_hidden_state, want.last_hidden_state),
              "pooler_output": rel_err(got.pooler_output, want.pooler_output)}
    np.testing.assert_array_equal(np.asarray(got.pooler_output), np.asarray(got.last_hidden_state)[[0, 1], pooled_at])
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        errors[f"hidden_states[{i}]"] = rel_err(g, w)
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors

    # The plain call and clip skip (diffusers: final_layer_norm(hidden_states[-(k + 1)])).
    with jax.default_matmul_precision("highest"):
        plain = module.apply({"params": params}, jnp.asarray(ids))
        skipped = module.apply({"params": params}, jnp.asarray(ids), clip_skip=1)
    np.testing.assert_allclose(plain, got.last_hidden_state, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want_skip = model.final_layer_norm(want.hidden_states[-2])
    assert rel_err(skipped, want_skip) <= TOL

    # Round trip: our save -> transformers load gives the very same torch model.
    pio.save_pretrained(module, params, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["CLIPTextModel"] and saved["model_type"] == "clip_text_model"
    assert not any(key.startswith("_") for key in saved)
    reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path / "ours").eval()
    for key in ("hidden_act", "eos_token_id", "bos_token_id", "pad_token_id", "layer_norm_eps", "projection_dim"):
        assert getattr(reloaded.config, key) == getattr(config, key), key
    original = model.state_dict()
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == original.keys()
    for key, value in reloaded_state.items():
        assert torch.equal(value, original[key]), key
    again = torch_forward(reloaded, ids)
    assert torch.equal(again.last_hidden_state, want.last_hidden_state)
    assert torch.equal(again.pooler_output, want.pooler_output)


def test_attention_mask(tmp_path):
    config = tiny_config()
    model = torch_clip(config)
    model.save_pretrained(tmp_path)
    module, params = pio.from_pretrained(tmp_path)
    ids = token_ids(config.eos_token_id)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0  # right padding: every query still sees position 0
    mask[1, 10:] = 0
    want = torch_forward(model, ids, mask)
    got = jax_encode(module, params, ids, mask)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) <= TOL
    assert rel_err(got.pooler_output, want.pooler_output) <= TOL
    # The mask changes the padded positions of a causal model only.
    unmasked = np.asarray(jax_encode(module, params, ids).last_hidden_state)
    np.testing.assert_allclose(np.asarray(got.last_hidden_state)[0, :7], unmasked[0, :7], rtol=1e-5, atol=1e-5)
    assert rel_err(np.asarray(got.last_hidden_state)[0, 7:], unmasked[0, 7:]) > 1e-3


def test_hub_layout_with_prefix_and_position_ids(tmp_path):
    """SD checkpoints on the Hub: ``text_model.``-prefixed keys and the old ``position_ids`` buffer."""
    config = tiny_config(eos_token_id=2)
    model = torch_clip(config)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {f"text_model.{k}": v for k, v in load_file(weights).items()}
    state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(state, weights, metadata={"format": "pt"})
    module, params = pio.from_pretrained(tmp_path)
    ids = token_ids(2)
    got = jax_encode(module, params, ids)
    assert rel_err(got.last_hidden_state, torch_forward(model, ids).last_hidden_state) <= TOL


def test_sd15_parameter_count():
    sd15 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    # What the SD1.5 text_encoder/config.json holds (transformers 4.22), metadata and all.
    hub_config = dict(sd15, _name_or_path="openai/clip-vit-large-patch14", architectures=["CLIPTextModel"],
                      attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
                      layer_norm_eps=1e-05, model_type="clip_text_model", torch_dtype="float32",
                      transformers_version="4.22.0.dev0")
    module = CLIPTextModel.from_config(hub_config)
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(module.abstract_params()))
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**sd15))
    torch_count = sum(p.numel() for p in reference.parameters())
    assert torch_count == 123_060_480
    assert ours == torch_count


def test_config_errors_and_generic_keys():
    with pytest.raises(PMFInputError, match="hidden_act='relu'"):
        CLIPTextModel.from_config(tiny_config(hidden_act="relu").to_dict())
    with pytest.raises(PMFInputError, match="not_a_key"):
        CLIPTextModel.from_config({**tiny_config().to_dict(), "not_a_key": 1})
    # The full dict (generic PretrainedConfig keys included) is accepted.
    module = CLIPTextModel.from_config(tiny_config().to_dict(), attention_backend="xla")
    assert module.attention_backend == "xla" and module.hidden_size == 32
    with pytest.raises(PMFInputError, match="at most 16"):
        module.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


def test_load_tokenizer(tmp_path):
    vocab = write_letter_vocab(tmp_path / "pipe" / "tokenizer", merge="ab")
    tokenizer = load_tokenizer(tmp_path / "pipe")
    ids = tokenizer(["ab c"], padding="max_length", max_length=6, truncation=True).input_ids
    assert ids == [[53, vocab["ab</w>"], vocab["c</w>"], 54, 54, 54]]
    assert load_tokenizer(tmp_path / "pipe" / "tokenizer", subfolder=None).vocab_size == len(vocab)
    with pytest.raises(PMFInputError, match="no subfolder"):
        load_tokenizer(tmp_path)
    with pytest.raises(PMFInputError):
        load_tokenizer(tmp_path / "missing")


def test_bfloat16_compute(tmp_path):
    config = tiny_config()
    model = torch_clip(config)
    model.save_pretrained(tmp_path)
    module, params = pio.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    ids = token_ids(config.eos_token_id)
    got = jax_encode(module, params, ids)
    assert got.last_hidden_state.dtype == jnp.bfloat16
    want = torch_forward(model, ids)
    assert rel_err(got.last_hidden_state.astype(jnp.float32), want.last_hidden_state) <= 3e-2
    assert rel_err(got.pooler_output.astype(jnp.float32), want.pooler_output) <= 3e-2
