"""The shipped training recipes (configs/*.yaml) on tiny models: what each trains and what it freezes, and that in
reference_only the UNet that writes the bank is the one that trains and that inference uses."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pmf_jax.config import load_config
from pmf_jax.errors import PMFInputError
from pmf_jax.io import from_pretrained
from pmf_jax.reference import ReferenceRead
from pmf_jax.training import components as components_lib
from pmf_jax.training.objective import pmf_loss
from pmf_jax.training.state import bind_step, init_state, make_optimizer
from tiny_sd import tiny_sd  # noqa: F401  (the pytest fixture)
from train_fixtures import TINY_UNET

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# The recipe each shipped config must be: the parts that train (the rest are frozen).
RECIPES = {
    "sd15_stage1.yaml": {"reference_unet"},                       # the design's stage 1: the ACM alone
    "sd15_stage1_joint.yaml": {"unet", "reference_unet"},         # MagicPose's stage 1
    "sd15_stage2.yaml": {"controlnet"},                           # the design's ADPCM: the ControlNet alone
    "sd15_stage2_joint.yaml": {"reference_unet", "controlnet"},   # MagicPose's stage 2
    "tiny_synthetic.yaml": {"unet", "reference_unet", "controlnet"},  # the demo: everything from scratch
    "sd15_ip_adapter.yaml": {"ip_adapter"},                       # Method 2: IP-Adapter fine-tuned on pose pairs
}
STEPS = 3


def test_every_shipped_config_has_a_recipe_named_in_its_comment():
    assert set(CONFIGS) == set(RECIPES), "a config was added or removed: give it its recipe here"
    for name in CONFIGS:
        head = (REPO / "configs" / name).read_text().split("\nmodel:")[0]
        assert head.startswith("#") and ("Recipe:" in head or "demo" in head), name


def _tiny_overrides(name: str, tiny, tmp_path: Path) -> list:
    """The config ``name`` with tiny models in place of SD1.5 (same dtypes and trainable set)."""
    if name == "tiny_synthetic.yaml":
        unet = tmp_path / "unet.json"
        unet.write_text(json.dumps(TINY_UNET))
        return [f"model.unet_config={unet}", "data.resolution=[16,16]"]
    cfg = load_config(REPO / "configs" / name)
    out = [f"model.base={tiny.sd}", "data.resolution=[32,32]"]
    if cfg.model.controlnet:
        out.append(f"model.controlnet={tiny.controlnet}")
    if cfg.model.reference_unet:
        out.append(f"model.reference_unet={tiny.reference_unet}")
    if cfg.model.ip_adapter:  # a tiny adapter for the tiny UNet, its image encoder beside it (h94's layout)
        from diffusers import UNet2DConditionModel
        from ip_adapter_fixtures import public_state, tiny_vision_config, torch_vision
        from safetensors.numpy import save_file

        (tmp_path / "models").mkdir()
        unet = UNet2DConditionModel.from_pretrained(tiny.sd / "unet")
        save_file(public_state("ip_adapter", unet), str(tmp_path / "models" / "ip_adapter.safetensors"))
        torch_vision(tiny_vision_config(num_hidden_layers=2)).save_pretrained(tmp_path / "models" / "image_encoder")
        out += [f"model.ip_adapter={tmp_path}/models/ip_adapter.safetensors", "model.image_encoder=null"]
    return out


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _batch(size, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    image = lambda: rng.uniform(-1, 1, (2, *size, 3)).astype(np.float32)  # noqa: E731
    return {"source": image(), "target": image(), "pose": rng.uniform(0, 1, (2, *size, 3)).astype(np.float32)}


@pytest.mark.parametrize("name", CONFIGS)
def test_recipe_trains_its_parts_and_leaves_the_frozen_ones_bit_identical(name, tiny_sd, tmp_path):  # noqa: F811
    """3 steps of the config's own train step: each trainable part changed (weight decay off, so only gradients
    move it), each frozen part equal, bit for bit, to its weights as loaded and stored in model.frozen_param_dtype."""
    cfg = load_config(REPO / "configs" / name, _tiny_overrides(name, tiny_sd, tmp_path)
                      + ["train.weight_decay=0", "train.warmup_steps=0", "train.grad_clip=0"])
    comps, params, frozen = components_lib.build(cfg, jax.random.key(0))
    assert set(comps.trainable) == RECIPES[name]
    loaded = {part: _flat(tree) for part, tree in params.items()}
    frozen_dtype, param_dtype = jnp.dtype(cfg.model.frozen_param_dtype), jnp.dtype(cfg.model.param_dtype)
    for part, tree in loaded.items():
        want = param_dtype if part in comps.trainable else frozen_dtype
        assert {v.dtype for v in tree.values()} == {want}, (part, want)
    if name.startswith("sd15") and "unet" not in comps.trainable:  # frozen UNet = the folder's, cast
        _, folder = from_pretrained(tiny_sd.sd, "unet")
        folder = _flat(folder)
        assert all(np.array_equal(loaded["unet"][k], np.asarray(folder[k]).astype(frozen_dtype)) for k in folder)

    tx = make_optimizer(cfg.train)
    state = init_state({p: params[p] for p in comps.trainable}, tx, cfg.train, jax.random.key(1))
    frozen_params = {p: t for p, t in params.items() if p not in comps.trainable}
    step = jax.jit(bind_step(comps, tx, cfg.train, cfg.reference.to_reference_config()))
    batch = _batch(cfg.data.height_width)
    for _ in range(STEPS):
        state, metrics = step(state, frozen_params, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert set(state.params) == RECIPES[name]
    for part in comps.trainable:
        after = _flat(state.params[part])
        moved = sum(not np.array_equal(after[k], loaded[part][k]) for k in after)
        assert moved > len(after) // 4, f"{part}: only {moved} of {len(after)} arrays changed"
    for part, tree in frozen_params.items():
        after = _flat(tree)
        assert all(np.array_equal(after[k], loaded[part][k]) for k in after), part


def test_reference_only_trains_the_unet_that_writes_the_bank(tiny_sd, tmp_path):  # noqa: F811
    """In reference_only the denoising UNet writes its own bank: there is no separate writer copy, the loss reads
    the bank written with the UNet's params, and its gradient equals a loss written out here with one UNet doing
    both (so what trains is what a reference_only pipeline samples with)."""
    cfg = load_config(REPO / "configs" / "sd15_stage1.yaml",
                      [f"model.base={tiny_sd.sd}", "data.resolution=[32,32]", "reference.mode=reference_only",
                       "train.trainable=[]", "model.dtype=float32", "model.frozen_param_dtype=float32",
                       "train.reference_drop_prob=0"])
    comps, params, frozen = components_lib.build(cfg, jax.random.key(0))
    assert comps.trainable == ("unet",) and comps.writer == "unet" and "reference_unet" not in params
    batch = _batch(cfg.data.height_width)
    rng = jax.random.key(3)
    ref_cfg = cfg.reference.to_reference_config()

    def ours(unet_params):
        return pmf_loss({"unet": unet_params}, frozen, batch, rng, components=comps, train_cfg=cfg.train,
                        reference_cfg=ref_cfg)[0]

    def written_out(unet_params):  # the objective with one UNet writing and reading, spelled out
        unet, sched = comps.unet, comps.noise_scheduler
        k_t, k_noise, _, _, _ = jax.random.split(rng, 5)
        x0, ref = (comps.encode(frozen["autoencoder"], batch[k]).astype(jnp.float32) for k in ("target", "source"))
        ctx = jnp.broadcast_to(frozen["context"], (2, *frozen["context"].shape[1:]))
        t = jax.random.randint(k_t, (2,), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        bank = unet.apply({"params": unet_params}, ref, t, ctx, method=unet.write_reference)
        pred = unet.apply({"params": unet_params}, sched.add_noise(x0, noise, t), t, ctx,
                          reference=ReferenceRead.build(bank, ref_cfg, 2, ref_mix=jnp.zeros((2,))))
        return jnp.mean((pred - noise) ** 2)

    value, grads = jax.jit(jax.value_and_grad(ours))(params["unet"])
    want_value, want_grads = jax.jit(jax.value_and_grad(written_out))(params["unet"])
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    got, want = _flat(grads), _flat(want_grads)
    scale = max(float(np.abs(v).max()) for v in want.values())
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= 1e-4 * scale
    with pytest.raises(PMFInputError, match="reference_only the denoising UNet writes the bank: train unet"):
        components_lib.trainable_parts(load_config(REPO / "configs" / "sd15_stage2_joint.yaml",
                                                   ["reference.mode=reference_only"]).train, "reference_only")


def test_reference_only_export_samples_with_the_trained_unet(tiny_sd, tmp_path):  # noqa: F811
    """A reference_only run (stage 1 trains the UNet) exports that UNet and no reference_unet/; the pipeline built
    from the export writes and reads the bank with exactly those weights."""
    from convert_fixtures import BASE_RUN, write_run
    from pmf_jax.convert import export_to_diffusers
    from pmf_jax.pipelines import RetargetPipeline

    saved = write_run(tmp_path, tmp_path / "run", f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}",
                      *BASE_RUN, "reference.mode=reference_only", steps=(2,))
    assert set(saved[2]["params"]) == {"unet"}
    export = export_to_diffusers(tmp_path / "run", tmp_path / "export")
    assert not (export / "reference_unet").exists()
    pipe = RetargetPipeline.from_pretrained(export)
    assert pipe.mode == "reference_only" and "reference" not in pipe.params
    got, want = _flat(pipe.params["unet"]), _flat(saved[2]["ema"]["unet"])
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
