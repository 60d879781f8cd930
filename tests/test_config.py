"""The config schema: YAML + key=value overrides, casting, errors, round trip."""

import dataclasses

import pytest
import yaml

from pmf_jax.config import (Config, DataConfig, MeshConfig, TrainConfig, all_keys, apply_overrides, config_from_dict,
                            dump_yaml, load_config, save_config, to_dict)
from pmf_jax.errors import PMFInputError


def test_defaults_are_frozen_sections():
    cfg = load_config()
    assert cfg == Config()
    assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.mesh, MeshConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert "train.lr" in all_keys() and "mesh.data" in all_keys()


@pytest.mark.parametrize("override, section, key, expected", [
    ("train.lr=1e-4", "train", "lr", 1e-4),                 # float from scientific notation
    ("train.lr=3", "train", "lr", 3.0),                     # int text into a float field
    ("train.steps=2000", "train", "steps", 2000),
    ("train.steps=1e3", "train", "steps", 1000),            # integral float text into an int field
    ("mesh.data=-1", "mesh", "data", -1),
    ("train.remat=true", "train", "remat", True),
    ("train.remat=0", "train", "remat", False),
    ("reference.noise_reference=Yes", "reference", "noise_reference", True),
    ("train.ema_decay=0.999", "train", "ema_decay", 0.999),  # Optional[float]
    ("train.ema_decay=null", "train", "ema_decay", None),
    ("model.controlnet=None", "model", "controlnet", None),  # Optional[str]
    ("model.base=/ckpt/sd15", "model", "base", "/ckpt/sd15"),
    ("data.data_dir='/data/tfds'", "data", "data_dir", "/data/tfds"),  # quotes dropped
    ("data.resolution=[256, 176]", "data", "resolution", (256, 176)),  # tuple from YAML list syntax
    ("data.resolution=256,192", "data", "resolution", (256, 192)),     # ... or from "a,b"
    ("data.resolution=64", "data", "resolution", (64,)),
    ("--sampling.scheduler=euler", "sampling", "scheduler", "euler"),  # leading -- tolerated
])
def test_override_casting(override, section, key, expected):
    value = getattr(getattr(load_config(overrides=[override]), section), key)
    assert value == expected and type(value) is type(expected)


def test_later_override_wins_and_others_keep_defaults():
    cfg = load_config(overrides=["train.lr=1e-3", "train.lr=2e-3", "mesh.fsdp=4"])
    assert cfg.train.lr == 2e-3 and cfg.mesh.fsdp == 4
    assert cfg.train.steps == TrainConfig().steps and cfg.data == DataConfig()


@pytest.mark.parametrize("override, match", [
    ("train.learning_rat=1", r"unknown config key 'train.learning_rat'"),
    ("trian.lr=1", r"'trian.lr'; did you mean train.lr\?"),
    ("model.lr=1", r"did you mean train.lr\?"),
    ("data.batchsize=4", r"did you mean data.batch_size"),
    ("optimizer.lr=1", r"unknown config key 'optimizer.lr'"),
    ("train=3", r"'train' is a section"),
    ("train.lr", r"must look like section.key=value"),
])
def test_unknown_keys_are_errors_with_close_matches(override, match):
    with pytest.raises(PMFInputError, match=match):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, match", [
    ("train.lr=fast", r"train.lr='fast' is not a valid float"),
    ("train.steps=1.5", r"train.steps='1.5' is not a valid int"),
    ("train.remat=maybe", r"train.remat='maybe' is not a valid bool"),
    ("train.schedule=linear", r"train.schedule='linear' must be one of \['cosine', 'constant'\]"),
    ("train.stage=3", r"train.stage=3 must be one of \[1, 2\]"),
    ("train.reference_drop_prob=1.5", r"train.reference_drop_prob=1.5 must lie in \[0, 1\]"),
    ("data.resolution=[500, 512]", r"data.resolution=\(500, 512\) must be one size or \[height, width\]"),
    ("data.resolution=[a, b]", r"data.resolution='a' is not a valid int"),
    ("mesh.fsdp=0", r"mesh.fsdp=0 must be a positive integer or -1"),
    ("sampling.scheduler=plms", r"sampling.scheduler='plms' must be one of"),
    ("model.dtype=float64", r"model.dtype='float64' must be one of"),
])
def test_bad_values_name_key_and_value(override, match):
    with pytest.raises(PMFInputError, match=match):
        load_config(overrides=[override])


def test_cross_field_check():
    with pytest.raises(PMFInputError, match="only one of data=-1, fsdp=-1"):
        load_config(overrides=["mesh.fsdp=-1"])


def test_yaml_nested_sections_then_overrides(tmp_path):
    path = tmp_path / "stage2.yaml"
    path.write_text(
        "model:\n  base: /ckpt/sd15\n  dtype: float32\n"
        "reference:\n  fusion_blocks: midup\n  reference_timestep: zero\n"
        "train:\n  stage: 2\n  lr: 1e-5\n  steps: 100\n"   # PyYAML reads 1e-5 as a string: cast to float
        "data:\n  resolution: [256, 176]\n"
        "mesh:\n  data: 2\n  fsdp: -1\n"
        "sampling:\n")                                     # an empty section keeps its defaults
    cfg = load_config(path, ["train.steps=5"])
    assert cfg.model.base == "/ckpt/sd15" and cfg.model.dtype == "float32"
    assert cfg.reference.fusion_blocks == "midup" and cfg.reference.reference_timestep == "zero"
    assert cfg.train.stage == 2 and cfg.train.lr == 1e-5 and cfg.train.steps == 5
    assert cfg.data.resolution == (256, 176) and cfg.data.height_width == (256, 176)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, -1, 1)
    assert cfg.sampling == Config().sampling


def test_yaml_errors_name_file_and_key(tmp_path):
    with pytest.raises(PMFInputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(PMFInputError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  lr: 1e-4\n  warmup: 10\n")
    with pytest.raises(PMFInputError, match=r"'train.warmup'; did you mean train.warmup_steps"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(PMFInputError, match="section 'train' must be a mapping"):
        load_config(bad)


def test_round_trip(tmp_path):
    cfg = load_config(overrides=["train.lr=3e-4", "data.resolution=[256,176]", "train.ema_decay=0.9999",
                                 "model.controlnet=null", "reference.mode=reference_only", "mesh.tensor=2"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    plain = to_dict(cfg)
    assert plain["data"]["resolution"] == [256, 176] and plain["model"]["controlnet"] is None
    assert set(plain) == {"model", "reference", "data", "train", "mesh", "sampling"}


def test_sections_feed_the_library():
    from pmf_jax.parallel import make_mesh, rules_from_config

    cfg = apply_overrides(Config(), ["reference.style_fidelity=0.5", "reference.fusion_blocks=midup",
                                     "mesh.min_shard_size=1024"])
    ref = cfg.reference.to_reference_config()
    assert ref.style_fidelity == 0.5 and ref.fusion_blocks == "midup"
    assert dict(make_mesh(cfg.mesh).shape) == {"data": 1, "fsdp": 1, "tensor": 1}  # data=-1 fills the one device
    assert rules_from_config(cfg.mesh).min_shard_size == 1024
