"""The one config schema for training and sampling: frozen dataclass sections, YAML defaults, ``key=value`` overrides.

    cfg = load_config("configs/stage1.yaml", ["train.lr=1e-4", "mesh.data=-1", "data.resolution=[256,176]"])
    cfg.train.lr            # 0.0001 (float: cast to the default's type)
    save_config(cfg, run_dir / "config.yaml")   # the run records what it ran with

Rules (MaxText/MaxDiffusion style): every key has a default here; a YAML file and then the overrides replace some of
them; each value is cast to its field's type (bool from true/false/yes/no/1/0, int, float, str, tuples from YAML list
syntax or "a,b", ``Optional`` fields accept null/none); unknown keys and bad values are :class:`PMFInputError`s that
name the key (with close matches) and the value. Sections are plain frozen dataclasses, so layers and functions get
the one section they need, never the whole config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from pmf_jax import constants
from pmf_jax.errors import PMFInputError


def _field(default: Any, *, choices: Sequence[Any] = (), check=None, doc: str = "") -> Any:
    """A dataclass field with validation metadata: ``choices`` (allowed values) and ``check`` = (predicate, text)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), "check": check, "doc": doc})


_PROB = (lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_OPT_NON_NEGATIVE = (lambda v: v is None or v >= 0, "must be >= 0 or null")
_MESH_SIZE = (lambda v: v == -1 or v >= 1, "must be a positive integer or -1 (fill with the remaining devices)")
_RESOLUTION = (lambda v: len(v) in (1, 2) and all(s > 0 and s % 8 == 0 for s in v),
               "must be one size or [height, width], each a positive multiple of 8")


class _Section:
    """Validates choices and checks of every field on construction (so ``dataclasses.replace`` is checked too)."""

    SECTION = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices and value not in choices:
                raise PMFInputError(f"config {self.SECTION}.{f.name}={value!r} must be one of {list(choices)}")
            if check is not None and not check[0](value):
                raise PMFInputError(f"config {self.SECTION}.{f.name}={value!r} {check[1]}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Which weights, in which precision. Paths are local folders or Hub repo ids (diffusers layout)."""

    SECTION = "model"
    base: Optional[str] = _field("stable-diffusion-v1-5/stable-diffusion-v1-5",
                       doc="SD1.5 folder/repo with unet/, vae/, text_encoder/, tokenizer/, scheduler/")
    revision: Optional[str] = _field(None, doc="Hub revision of `base`")
    controlnet: Optional[str] = _field("lllyasviel/control_v11p_sd15_openpose", doc="pose ControlNet; null: none")
    reference_unet: Optional[str] = _field(None, doc="trained ACM UNet folder; null: initialised from base's UNet")
    dtype: str = _field("bfloat16", choices=constants.DTYPES, doc="compute dtype (float32 on CPU tests)")
    param_dtype: str = _field("float32", choices=constants.DTYPES, doc="dtype of the parameters that train")
    frozen_param_dtype: str = _field("bfloat16", choices=constants.DTYPES, doc="dtype of frozen parameters")
    attention_backend: str = _field("auto", choices=constants.ATTENTION_BACKENDS)
    autoencoder: str = _field("vae", choices=("vae", "identity"),
                              doc="identity: diffuse in pixel space (tiny demo/test models without a VAE)")
    pixel_patch_size: int = _field(1, check=_POSITIVE, doc="autoencoder=identity: fold p x p pixels into channels")
    unet_config: Optional[str] = _field(None, doc="with base null: a UNet config.json to initialise randomly (tiny runs)")
    text_encoder: bool = _field(True, doc="encode the (empty) prompt with base's CLIP; false: one zeros token")
    ip_adapter: Optional[str] = _field(None, doc="IP-Adapter weight file (local, or owner/repo/path in the Hugging "
                                                 "Face cache): reference.mode=ip_adapter, or with acm / "
                                                 "reference_only; null: none")
    image_encoder: Optional[str] = _field(None, doc="its CLIP image encoder folder (local or owner/repo/path); null: "
                                                    "image_encoder/ beside the ip_adapter file")
    allow_pickle: bool = _field(False, doc="also read pickled torch weights (.bin/.ckpt) of the folders above, which "
                                           "can run arbitrary code (python -m train --allow-pickle sets it)")


@dataclasses.dataclass(frozen=True)
class ReferenceSection(_Section):
    """The Appearance Control Module's reference bank (see pmf_jax.reference.ReferenceConfig for the meanings)."""

    SECTION = "reference"
    mode: str = _field(constants.DEFAULT_MODE, choices=constants.MODES,
                       doc="acm: a separate reference UNet; reference_only: the denoising UNet's own weights; "
                           "controlnet_only: no reference")
    fusion_blocks: str = _field("full", choices=constants.FUSION_BLOCKS)
    attention_weight: float = _field(1.0, check=_PROB, doc="reference-only attention auto machine weight")
    style_fidelity: float = _field(0.0, check=_PROB)
    reference_timestep: str = _field("same", choices=constants.REFERENCE_TIMESTEPS)
    noise_reference: bool = _field(False, doc="write from the source latent noised to the timestep (else clean)")
    controlnet_reads_reference: bool = _field(False)
    method: str = _field("attn", choices=constants.REFERENCE_METHODS,
                         doc="attn: reference attention; adain: reference AdaIN (the hidden states take the source's "
                             "per-channel mean and variance after every block layer); attn+adain: both")
    adain_weight: float = _field(1.0, check=(lambda v: 0.0 <= v <= 2.0, "must lie in [0, 2]"),
                                 doc="reference-only gn_auto_machine_weight: which blocks apply AdaIN (2: all; 1: "
                                     "the mid block, deeper down blocks, first up blocks)")

    def to_reference_config(self):
        """The model-side ``pmf_jax.reference.ReferenceConfig`` (the fields both share)."""
        from pmf_jax.reference import ReferenceConfig

        names = {f.name for f in dataclasses.fields(ReferenceConfig)}
        return ReferenceConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """The TFDS pose-pair dataset and its loader (pmf_jax.input_pipeline)."""

    SECTION = "data"
    name: str = _field("deepfashion_pairs", doc="a key of pmf_jax.input_pipeline.DATASETS")
    builder_config: Optional[str] = _field(None, doc='TFDS builder config, e.g. "256x176"')
    data_dir: Optional[str] = _field(None, doc="TFDS data_dir; null: the TFDS default")
    split: str = _field("train")
    eval_split: str = _field("test")
    resolution: Tuple[int, ...] = _field((512, 512), check=_RESOLUTION, doc="[height, width] (or one size), pixels")
    batch_size: int = _field(8, check=_POSITIVE, doc="global batch (all processes), divisible by data x fsdp")
    eval_batch_size: int = _field(8, check=_POSITIVE)
    workers: int = _field(0, check=_NON_NEGATIVE, doc="grain worker processes (0: in the main process)")
    augment: bool = _field(True, doc="random resized crop (0.9-1.0) and horizontal flip")

    @property
    def height_width(self) -> Tuple[int, int]:
        return (self.resolution[0], self.resolution[-1])


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimisation, the loss, and the loop's bookkeeping."""

    SECTION = "train"
    stage: int = _field(1, choices=(1, 2), doc="1: no ControlNet (the ACM stage); 2: with the pose ControlNet "
                                                     "(ADPCM)")
    trainable: Tuple[str, ...] = _field((), doc="parts that train (unet, reference_unet, controlnet, "
                                               "ip_adapter); the others are frozen, stored in "
                                               "model.frozen_param_dtype. Empty: the design's recipe by stage (1: "
                                               "reference_unet, or unet in reference_only; 2: controlnet; "
                                               "ip_adapter in reference.mode=ip_adapter)")
    steps: int = _field(10_000, check=_POSITIVE)
    lr: float = _field(1e-5, check=_POSITIVE)
    warmup_steps: int = _field(500, check=_NON_NEGATIVE)
    schedule: str = _field("cosine", choices=("cosine", "constant"))
    weight_decay: float = _field(1e-2, check=_NON_NEGATIVE)
    grad_clip: float = _field(1.0, check=_NON_NEGATIVE, doc="global-norm clip; 0 turns clipping off")
    grad_accum_steps: int = _field(1, check=_POSITIVE)
    ema_decay: Optional[float] = _field(None, check=(lambda v: v is None or 0.0 <= v < 1.0,
                                                     "must be in [0, 1) or null"),
                                        doc="null: no EMA copy of the trained params")
    prediction_type: str = _field("epsilon", choices=("epsilon", "v_prediction", "sample"),
                                  doc="the UNet's target: noise, velocity, or the clean latent (sample)")
    min_snr_gamma: Optional[float] = _field(None, check=_OPT_NON_NEGATIVE, doc="Min-SNR loss weighting; null: off")
    noise_offset: float = _field(0.0, check=_NON_NEGATIVE)
    person_loss_weight: float = _field(1.0, check=_POSITIVE,
                                       doc="loss weight on the target's person (the pose map's pixels, pooled to "
                                           "the latent grid and grown by one latent pixel); 1: a plain mean")
    zero_terminal_snr: bool = _field(False, doc="rescale the noise schedule so its last step is pure noise, sampled "
                                               "with trailing timesteps (Lin et al. 2024); exports carry it")
    reference_drop_prob: float = _field(0.05, check=_PROB, doc="P(no reference), for appearance guidance")
    remat: bool = _field(False, doc="rematerialise transformer blocks in the backward pass")
    compilation_cache: bool = _field(True, doc="JAX persistent compilation cache ($PMF_JAX_CACHE_DIR or "
                                               "~/.cache/pmf_jax/jax_cache; JAX_COMPILATION_CACHE_DIR wins): a "
                                               "restarted or resumed run loads its compiled programs")
    seed: int = _field(0)
    log_every: int = _field(50, check=_POSITIVE)
    eval_every: int = _field(1000, check=_POSITIVE)
    checkpoint_every: int = _field(1000, check=_POSITIVE)
    keep_checkpoints: int = _field(3, check=_POSITIVE)
    output_dir: str = _field("outputs/run")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh sizes (pmf_jax.parallel.make_mesh); one may be -1: all the devices the others leave."""

    SECTION = "mesh"
    data: int = _field(-1, check=_MESH_SIZE)
    fsdp: int = _field(1, check=_MESH_SIZE)
    tensor: int = _field(1, check=_MESH_SIZE)
    min_shard_size: int = _field(2**14, check=_NON_NEGATIVE, doc="parameters with fewer elements are replicated")

    def __post_init__(self):
        super().__post_init__()
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise PMFInputError(f"config mesh: only one of data={self.data}, fsdp={self.fsdp}, "
                                f"tensor={self.tensor} may be -1")


@dataclasses.dataclass(frozen=True)
class SamplingConfig(_Section):
    """The sampler and its guidance."""

    SECTION = "sampling"
    scheduler: str = _field(constants.DEFAULT_SCHEDULER, choices=constants.SCHEDULER_NAMES)
    steps: int = _field(constants.DEFAULT_STEPS, check=_POSITIVE)
    text_guidance_scale: float = _field(constants.DEFAULT_GUIDANCE_SCALE, check=_NON_NEGATIVE,
                                        doc="1 turns text guidance off")
    reference_guidance_scale: Optional[float] = _field(2.0, check=_OPT_NON_NEGATIVE,
                                                       doc="separate appearance guidance (3 guidance rows): the "
                                                           "pipeline's appearance_guidance_scale; null: off (2 rows)")
    controlnet_scale: float = _field(1.0, check=_NON_NEGATIVE)
    ip_adapter_scale: float = _field(constants.DEFAULT_IP_ADAPTER_SCALE,
                                     doc="weight of the IP-Adapter image prompt (model.ip_adapter)")
    seed: int = _field(0)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole config: one frozen section per concern."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)


SECTIONS: Dict[str, type] = dict(typing.get_type_hints(Config))  # "model" -> ModelConfig, in schema order


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys() -> List[str]:
    """Every dotted key, e.g. ``["model.base", ..., "sampling.seed"]``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------------------------------------ casting

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NULL = ("null", "none", "~", "")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _cast(key: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML, or a raw override string) as type ``tp``; PMFInputError naming key and value."""
    bad = PMFInputError(f"config {key}={value!r} is not a valid {_type_name(tp)}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        inner = [a for a in args if a is not type(None)]
        return _cast(key, value, inner[0]) if len(inner) == 1 else value
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            try:
                items = yaml.safe_load(value) if value.strip() else []
            except yaml.YAMLError:
                raise bad from None
            if isinstance(items, str):
                items = [s for s in items.split(",") if s.strip()]
        if not isinstance(items, (list, tuple)):
            items = [items]
        elem = args[0] if args else Any
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(items) != len(args):
                raise PMFInputError(f"config {key}={value!r} must have {len(args)} entries")
            return tuple(_cast(key, v, a) for v, a in zip(items, args))
        return tuple(_cast(key, v, elem) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:
            number = float(value) if not isinstance(value, str) else float(value.strip().replace("_", ""))
        except (TypeError, ValueError):
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


# ------------------------------------------------------------------------------------------------ building

def _unknown(key: str) -> PMFInputError:
    section, _, leaf = key.rpartition(".")
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731

    def score(k):  # a misspelt key, or the same (nearly) key name in another section (`model.lr` -> `train.lr`)
        k_section, _, k_leaf = k.rpartition(".")
        return max(ratio(key, k), ratio(leaf, k_leaf) + (0.05 if k_section == section else 0.0))

    close = sorted((k for k in all_keys() if score(k) >= 0.75), key=score, reverse=True)[:4]
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    elif section in SECTIONS:
        hint = f"; {section} has: {', '.join(f.name for f in dataclasses.fields(SECTIONS[section]))}"
    else:
        hint = f"; the sections are {', '.join(SECTIONS)}"
    return PMFInputError(f"unknown config key {key!r}{hint}")


def _build_section(section: str, values: Mapping[str, Any], base: Any) -> Any:
    cls = SECTIONS[section]
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    updates = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in names:
            raise _unknown(key)
        updates[name] = _cast(key, value, hints[name])
    return dataclasses.replace(base, **updates)


def config_from_dict(values: Mapping[str, Any], base: Optional[Config] = None) -> Config:
    """A Config from nested ``{section: {key: value}}`` over ``base`` (default: the defaults), cast and checked."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise PMFInputError(f"a config must be a mapping of sections, got {type(values).__name__}")
    config = base or Config()
    updates = {}
    for section, entries in values.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise PMFInputError(f"config section {section!r} must be a mapping of keys, got {entries!r}")
        updates[section] = _build_section(section, entries, getattr(config, section))
    return dataclasses.replace(config, **updates)


def parse_override(text: str) -> Tuple[str, str, str]:
    """``"train.lr=1e-4"`` → ("train", "lr", "1e-4"); a leading ``--`` and quotes around the value are dropped."""
    body = text[2:] if text.startswith("--") else text
    key, sep, value = body.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise PMFInputError(f"config override {text!r} must look like section.key=value (e.g. train.lr=1e-4)")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    section, dot, name = key.partition(".")
    if not dot:
        if key in SECTIONS:
            raise PMFInputError(f"config override {text!r}: {key!r} is a section; set {key}.<key>=value")
        raise _unknown(key)
    if section not in SECTIONS:
        raise _unknown(key)
    return section, name, value


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``key=value`` overrides applied in order (later ones win)."""
    grouped: Dict[str, Dict[str, str]] = {}
    for text in overrides:
        section, name, value = parse_override(text)
        grouped.setdefault(section, {})[name] = value
    return config_from_dict(grouped, base=config)


def load_config(yaml_path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← the YAML file (if given; a path or a URL) ← the overrides. Raises PMFInputError naming the file /
    key / value."""
    config = Config()
    if yaml_path is not None:
        from pmf_jax import storage

        path = storage.user_path(yaml_path)  # a local file or a URL (gs://...)
        try:
            text = path.read_text() if path.is_file() else None
        except Exception as err:  # the storage clients' errors (server, bucket, permission)
            if not storage.is_url(path):
                raise
            raise storage.describe_error(err, path, "read") from None
        if text is None:
            raise PMFInputError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PMFInputError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        config = config_from_dict(values)
    return apply_overrides(config, list(overrides))


def to_dict(config: Config) -> Dict[str, Dict[str, Any]]:
    """Nested plain dict (tuples as lists), ready for YAML/JSON."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(config, s)).items()} for s in SECTIONS}


def dump_yaml(config: Config) -> str:
    """The config as YAML text (sections in schema order)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)


def save_config(config: Config, path: Union[str, Path]) -> Path:
    """Writes ``config`` as YAML to ``path`` (parents created); :func:`load_config` reads it back identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(config))
    return path
