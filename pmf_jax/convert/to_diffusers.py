"""``pmf convert to-diffusers``: a training run's checkpoint -> a folder that diffusers (PyTorch) and the JAX pipelines
open.

The folder (``out``)::

    unet/ reference_unet/ controlnet/   config.json + diffusion_pytorch_model.safetensors (diffusers
                                        UNet2DConditionModel / ControlNetModel); trained parts from the checkpoint,
                                        the others from where the run got them (the base's unet/, model.controlnet)
    vae/ text_encoder/ tokenizer/       copied (or linked) from the base; left out by pixel-space runs (identity
                                        autoencoder, inferred from the UNet's 3·p² channels) and prompt-free runs
    scheduler/scheduler_config.json     the run's noise schedule and train.prediction_type
    model_index.json                    the base's, when it has one (parts not exported set to null)
    ip_adapter/ip_adapter.safetensors   the run's IP-Adapter (model.ip_adapter; trained when part ip_adapter trained)
    image_encoder/                      in the public format, its CLIP image encoder beside
                                        (:mod:`pmf_jax.convert.ip_adapter_export`)
    pmf_config.json                     mode, reference settings, autoencoder, where every part came from, the
                                        training resolution and the sampling defaults (the run's sampling
                                        section: scheduler, steps, guidance_scale), which pmf retarget uses
                                        when no flag is given

reference_unet/ is written for mode "acm" only (in "reference_only" the UNet writes its own reference). A run
without a ControlNet (stage 1) gets the one of ``model.controlnet``, or none when that is null.

Weights: the EMA copy by default when the run kept one; fp32 or ``dtype`` fp16/bf16; safetensors only. The whole
folder is written under a temporary name and renamed at the end (:func:`~pmf_jax.out_folder.staged_folder`); an
``out`` URL (``gs://bucket/...``) is written in a local stage and uploaded with its index files
(``model_index.json``, ``pmf_config.json``) last, so an interrupted upload never looks like a complete export.
Checkpoints are read onto the host whatever mesh saved them (:func:`pmf_jax.io.checkpoints.restore_trained_params`).
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
from flax import traverse_util

from pmf_jax.convert.folders import copy_model_folder, model_folder, parse_dtype, write_pmf_config
from pmf_jax.errors import PMFInputError
from pmf_jax.io import from_pretrained, save_pretrained
from pmf_jax.io.checkpoints import read_run_info, resolve_run, restore_trained_params
from pmf_jax.io.hub import resolve_folder
from pmf_jax.io.naming import check_match
from pmf_jax.out_folder import check_out_folder, staged_folder

PARTS = ("unet", "reference_unet", "controlnet")


def export_to_diffusers(checkpoint, out, *, ema: Optional[bool] = None, base=None, dtype=None, link: bool = False,
                        overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Writes the export folder ``out`` (see the module docstring) and returns its path.

    Args:
      checkpoint: ``RUN_DIR`` (latest step), ``RUN_DIR/STEP`` or ``RUN_DIR/checkpoints/STEP``.
      ema: True: the EMA weights (error if the run kept none); False: the raw weights; None: EMA when there is one.
      base: the SD folder / cached repo id of the run's base, when it moved (default: the run's ``model.base``).
      dtype: "fp32" (default), "fp16" or "bf16" for the exported UNets/ControlNet (copied base parts keep theirs).
      link: symlink the base's vae/text_encoder/tokenizer files instead of copying them.
      overwrite: replace an existing ``out`` (atomically); default: an existing ``out`` is an error.
      allow_pickle: as :func:`pmf_jax.io.from_pretrained`, for the base's untrained parts.
    Raises:
      PMFInputError: no run / step / complete checkpoint, an untrained part with nothing to copy it from, ``out``
        exists, a base that cannot be found. Nothing is left under ``out`` then.
    """
    out = check_out_folder(out, overwrite)  # a URL as an epath.Path, checked on its storage server
    save_dtype = parse_dtype(dtype)
    from pmf_jax import storage

    run_dir, step = resolve_run(checkpoint)  # a URL run is read where it is (orbax reads gs:// itself)
    if not storage.as_path(run_dir).is_dir():
        raise PMFInputError(f"--checkpoint {str(checkpoint)!r}: no such run folder")
    info = _run_info(run_dir)
    cfg = _run_config(run_dir)
    use_ema = _use_ema(ema, cfg)
    base_folder = _base_folder(base, info)
    mode = (info.get("reference") or {}).get("mode", cfg.reference.mode)
    sources = _part_sources(info, cfg, base_folder, mode)
    trained, step = _restore(run_dir, step, use_ema)
    if set(trained) != set(info["trainable"]):
        raise PMFInputError(f"checkpoint {run_dir}/checkpoints/{step} holds {sorted(trained)}, but components.json "
                            f"lists the trained parts {sorted(info['trainable'])}")

    with staged_folder(out, overwrite) as tmp:
        written = {}
        for part, source in sources.items():
            if source == "checkpoint":
                module = _module_for(part, info["models"][part])
                _check_tree(module, trained[part], f"{run_dir} step {step}, part {part}")
                save_pretrained(module, trained[part], tmp / part, dtype=save_dtype)
            else:
                module, params = from_pretrained(source, param_dtype=np.float32, allow_pickle=allow_pickle)
                save_pretrained(module, params, tmp / part, dtype=save_dtype)
            written[part] = "checkpoint" if source == "checkpoint" else str(source)
            if part == "unet":
                unet_config = module.to_config()
        autoencoder = _write_base_parts(tmp, cfg, base_folder, unet_config, link)
        _write_scheduler(tmp, cfg, base_folder)
        if "ip_adapter" in trained or cfg.model.ip_adapter:  # the public file format + its image encoder
            from pmf_jax.convert.ip_adapter_export import export_ip_adapter

            export_ip_adapter(trained.get("ip_adapter"), cfg, tmp, dtype=save_dtype, link=link,
                              allow_pickle=allow_pickle or cfg.model.allow_pickle)
            written["ip_adapter"] = "checkpoint" if "ip_adapter" in trained else str(cfg.model.ip_adapter)
        if base_folder is not None and (base_folder / "model_index.json").is_file():
            _write_model_index(tmp, base_folder, set(written) | set(autoencoder["copied"]) | {"scheduler"})
        write_pmf_config(tmp, {
            "mode": mode, "reference": _reference_settings(info, cfg),
            "prediction_type": cfg.train.prediction_type, "autoencoder": autoencoder["config"],
            "text_encoder": "text_encoder" in autoencoder["copied"], "parts": written, "dtype": str(save_dtype),
            "resolution": list(cfg.data.height_width), "sampling": _sampling_defaults(cfg),
            "source": {"run": str(run_dir if storage.is_url(run_dir) else Path(run_dir).absolute()), "step": int(step),
                       "weights": "ema" if use_ema else "params",
                       "base": str(base_folder) if base_folder is not None else None}})
    return out


# ------------------------------------------------------------------------------------------------------ the run

def _run_info(run_dir: Path) -> dict:
    try:
        info = read_run_info(run_dir)
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{run_dir}/components.json is not valid JSON: {err}") from None
    if not isinstance(info.get("models"), dict) or not isinstance(info.get("trainable"), list):
        raise PMFInputError(f"{run_dir}/components.json lacks 'models' or 'trainable'")
    return info


def _restore(run_dir: Path, step: Optional[int], ema: bool):
    try:
        return restore_trained_params(run_dir, step, ema=ema)
    except PMFInputError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds of errors for damaged files
        where = f"{run_dir}/checkpoints/{step}" if step is not None else f"the latest step in {run_dir}/checkpoints"
        raise PMFInputError(f"checkpoint {where} is incomplete or corrupt: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from err


def _run_config(run_dir: Path):
    from pmf_jax.pipelines.from_run import read_run_config

    return read_run_config(run_dir)


def _use_ema(ema: Optional[bool], cfg) -> bool:
    if ema and cfg.train.ema_decay is None:
        raise PMFInputError("--ema: the run kept no EMA weights (train.ema_decay is null); use --no-ema")
    return cfg.train.ema_decay is not None if ema is None else bool(ema)


def _base_folder(base, info) -> Optional[Path]:
    """The local folder of the run's base (``base`` overrides components.json's); None for runs without one."""
    name = base if base is not None else info.get("base")
    if base is not None and not info.get("base"):
        raise PMFInputError("--base: the run was trained without a base (model.base null); it needs none")
    if not name:
        return None
    try:
        return resolve_folder(name)
    except PMFInputError as err:
        raise PMFInputError(f"the run's base {name!r} cannot be found ({err}); pass --base with its new location"
                            ) from None


def _part_sources(info, cfg, base_folder: Optional[Path], mode: str) -> Dict[str, Any]:
    """part -> "checkpoint" (trained) or the model folder an untrained part is copied from."""
    trainable = set(info["trainable"])
    m = cfg.model
    wanted = ["unet"] + (["reference_unet"] if mode == "acm" else [])
    if info["models"].get("controlnet") is not None or m.controlnet:
        wanted.append("controlnet")
    sources = {}
    for part in wanted:
        if part in trainable:
            sources[part] = "checkpoint"
            continue
        if part == "unet":
            folder, why = _sub(base_folder, "unet"), "model.base is null"
        elif part == "reference_unet":
            folder = model_folder(m.reference_unet, part) if m.reference_unet else _sub(base_folder, "unet")
            why = "model.reference_unet and model.base are null"
        else:
            folder = model_folder(m.controlnet, part) if m.controlnet else None
            why = "model.controlnet is null: it was initialised from the UNet"
        if folder is None:
            raise PMFInputError(f"the run did not train {part!r} (train.trainable={sorted(trainable)}) and has no "
                                f"pretrained source for it ({why}), so it cannot be exported")
        sources[part] = folder
    return sources


def _sub(folder: Optional[Path], name: str) -> Optional[Path]:
    return None if folder is None else folder / name


def _module_for(part: str, config: Optional[dict]):
    from pmf_jax.io.registry import model_class

    if config is None:
        raise PMFInputError(f"components.json has no config for the trained part {part!r}")
    cls = model_class("ControlNetModel" if part == "controlnet" else "UNet2DConditionModel")
    return cls.from_config(config)


def _check_tree(module, params, source: str) -> None:
    """The checkpoint's tree must be exactly the module's (names and shapes)."""
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(module.abstract_params()).items()}
    have = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
    check_match(f"{source} (config from components.json)", sorted(set(want) - set(have)),
                sorted(set(have) - set(want)),
                sorted(f"{k}: {have[k]} in checkpoint, model expects {want[k]}" for k in want
                       if k in have and have[k] != want[k]), "parameters")


def _reference_settings(info, cfg) -> Dict[str, Any]:
    from pmf_jax.reference import ReferenceConfig

    names = {f.name for f in dataclasses.fields(ReferenceConfig)}
    ref = info.get("reference") or dataclasses.asdict(cfg.reference)
    return {k: v for k, v in ref.items() if k in names}


def _sampling_defaults(cfg) -> Dict[str, Any]:
    """The run's sampling section as pmf_config.json "sampling" (:func:`pmf_jax.pipelines.defaults.sampling_defaults`
    reads it)."""
    s = cfg.sampling
    return {"scheduler": s.scheduler, "steps": int(s.steps), "guidance_scale": float(s.text_guidance_scale)}


# ------------------------------------------------------------------------------------------------ other parts

def _write_base_parts(tmp: Path, cfg, base_folder: Optional[Path], unet_config: dict, link: bool):
    """vae/, text_encoder/, tokenizer/ from the base as the run used them. Returns the autoencoder description."""
    from pmf_jax.models.identity_vae import patch_size_for_channels

    m = cfg.model
    copied = []
    if m.autoencoder == "vae":
        if base_folder is None:
            raise PMFInputError("the run used a VAE (model.autoencoder=vae) but has no base to copy it from")
        copy_model_folder(base_folder / "vae", tmp / "vae", link=link)
        copied.append("vae")
        description = {"type": "vae"}
    else:
        patch = patch_size_for_channels(unet_config["out_channels"])
        if patch is None or patch != m.pixel_patch_size:
            raise PMFInputError(f"pixel-space run: the UNet's {unet_config['out_channels']} output channels are not "
                                f"3·p² for model.pixel_patch_size p={m.pixel_patch_size}")
        description = {"type": "identity", "patch_size": patch}
    if base_folder is not None and m.text_encoder:
        for part, weights in (("text_encoder", True), ("tokenizer", False)):
            copy_model_folder(base_folder / part, tmp / part, link=link, weights=weights)
            copied.append(part)
    return {"config": description, "copied": copied}


def _write_scheduler(tmp: Path, cfg, base_folder: Optional[Path]) -> None:
    """The base's scheduler config, or the run's default noise schedule (what the trainer used), with the run's
    prediction type."""
    from pmf_jax.schedulers import make_scheduler
    from pmf_jax.training import components as components_lib

    path = None if base_folder is None else base_folder / "scheduler" / "scheduler_config.json"
    if path is not None and path.is_file():
        config = components_lib.noise_schedule_config(cfg, json.loads(path.read_text()))
    else:
        noise = make_scheduler("ddpm", components_lib.noise_schedule_config(cfg, None))
        config = components_lib.sampling_scheduler_config(types.SimpleNamespace(noise_scheduler=noise),
                                                          cfg.train.prediction_type)
        config = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0", **config}
    config["prediction_type"] = cfg.train.prediction_type
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_model_index(tmp: Path, base_folder: Path, present: set) -> None:
    """The base's model_index.json with the parts this folder lacks (safety checker, ...) set to null, so diffusers
    pipelines open the folder."""
    index = json.loads((base_folder / "model_index.json").read_text())
    for key, value in list(index.items()):
        if not key.startswith("_") and isinstance(value, list) and key not in present:
            index[key] = [None, None]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["export_to_diffusers", "PARTS"]
