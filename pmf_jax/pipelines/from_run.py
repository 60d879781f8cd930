"""The retarget pipeline of a training run or a config, and what a config's ``sampling`` section means to it.

One place for what the trainer's previews, the demo's evaluation (``train/retarget_eval.py``), ``pmf eval generate``
and ``pmf scaling`` each need:

  * :func:`pipeline_from_run`: the :class:`~pmf_jax.pipelines.RetargetPipeline` of a run in memory
    (:class:`RunParts`: components, parameters, frozen parts; parameters may be ShapeDtypeStructs for
    ahead-of-time compiles) or of a config naming model folders (``model.base``, ``model.controlnet``,
    ``model.reference_unet``, ``model.ip_adapter`` + ``model.image_encoder``). The mode is ``reference.mode``: "acm"
    gives the pipeline the run's reference UNet, "reference_only" lets the denoising UNet write its own bank,
    "controlnet_only" reads no bank, "ip_adapter" reads the IP-Adapter's image prompt instead (which acm and
    reference_only read too when ``model.ip_adapter`` is set).
  * :func:`sampling_kwargs`: ``cfg.sampling`` + ``cfg.reference`` as the pipeline call's keyword arguments, meaning
    what the CLI's options mean (``sampling.reference_guidance_scale`` null: no appearance guidance, 2 guidance
    rows; a number: ``appearance_guidance_scale``, 3 rows; ``sampling.ip_adapter_scale``: ``ip_adapter_scale`` when
    the pipeline has an IP-Adapter).
  * :func:`sampling_static`: the static settings of that call (what the compiled programs are specialised on).
  * :func:`read_run_config`: a run folder's ``config.yaml``, the folder local or a URL (``gs://bucket/run``; its
    orbax checkpoints are read by orbax from the URL itself, :mod:`pmf_jax.io.checkpoints`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines.retarget import RetargetPipeline
from pmf_jax.pipelines.retarget_inputs import RetargetStatic


@dataclasses.dataclass(frozen=True)
class RunParts:
    """A training run in memory.

    cfg: its :class:`~pmf_jax.config.Config`; components: :class:`pmf_jax.training.components.Components`;
    params: {part: tree} of the UNet-like parts ("unet", "controlnet", "reference_unet"); frozen: {"autoencoder":
    tree, "context": [1, T, D] the empty prompt's text context}.
    """

    cfg: Any
    components: Any
    params: Dict[str, Any]
    frozen: Dict[str, Any]


def read_run_config(run_dir, overrides=()):
    """The :class:`~pmf_jax.config.Config` of a training run's ``config.yaml`` (``overrides`` on top); ``run_dir``
    local or a URL."""
    from pmf_jax import storage
    from pmf_jax.config import load_config

    path = storage.as_path(run_dir) / "config.yaml"
    try:
        present = path.is_file()
    except Exception as err:  # the storage clients' errors (permission, missing bucket)
        raise storage.describe_error(err, path, "read") from None
    if not present:
        raise PMFInputError(f"{run_dir} is not a pmf_jax training run (no config.yaml)")
    return load_config(path, overrides)


def run_mode(cfg, mode: Optional[str] = None) -> str:
    """The pipeline mode: ``mode`` if given, else the config's ``reference.mode``."""
    return mode or cfg.reference.mode


def pipeline_params(mode: str, params: Dict[str, Any], frozen: Dict[str, Any]) -> Dict[str, Any]:
    """A run's parameters as :attr:`RetargetPipeline.params` for ``mode`` (for
    :meth:`~pmf_jax.pipelines.base.SamplingPipeline.set_params` on a pipeline of :func:`pipeline_from_run`)."""
    out = {"unet": params["unet"], "controlnet": params["controlnet"], "vae": frozen["autoencoder"]}
    if mode == "acm":
        out["reference"] = params["reference_unet"]
    if "ip_adapter" in params and mode != "controlnet_only":  # as RetargetPipeline holds an IP-Adapter
        from pmf_jax.training.image_prompt import merge_ip_kernels

        out["unet"] = merge_ip_kernels(params["unet"], params["ip_adapter"]["attn2"])
        out["image_proj"] = params["ip_adapter"]["image_proj"]
        out["image_encoder"] = frozen["image_encoder"]
    return out


def _context(frozen) -> np.ndarray:
    """The fixed text context [T, D] of a prompt-free pipeline: the run's empty-prompt context (zeros of its shape
    when the run is abstract: only the shape matters there)."""
    context = frozen["context"]
    if isinstance(context, jax.ShapeDtypeStruct):
        return np.zeros(context.shape[1:], np.float32)
    return np.asarray(context[0])


def pipeline_from_run(run, *, mode: Optional[str] = None, allow_pickle: bool = False) -> RetargetPipeline:
    """The retarget pipeline of ``run``: a :class:`RunParts` (a run in memory), or a config whose ``model``
    section names folders (``model.base`` an SD folder; ``model.reference_unet`` null: the base UNet, an untrained
    ACM). ``mode``: default the config's ``reference.mode``. ``allow_pickle``: as :func:`pmf_jax.io.from_pretrained`
    (folders only)."""
    if isinstance(run, RunParts):
        return _from_parts(run, run_mode(run.cfg, mode))
    return _from_folders(run, run_mode(run, mode), allow_pickle)


def _from_parts(run: RunParts, mode: str) -> RetargetPipeline:
    from pmf_jax.training.components import sampling_scheduler_config

    comps = run.components
    if comps.controlnet is None:
        raise PMFInputError("the retarget pipeline needs a pose ControlNet (config train.stage=2)")
    if mode == "ip_adapter" and "ip_adapter" not in run.params:
        raise PMFInputError("mode ip_adapter needs a run with an IP-Adapter (config model.ip_adapter)")
    params = pipeline_params(mode, run.params, run.frozen)
    image_prompt = {}
    if "ip_adapter" in run.params and mode != "controlnet_only":
        from pmf_jax.training.image_prompt import ip_adapter_weights

        parts = comps.image_prompt  # the pipeline merges the adapter's kernels into the UNet itself
        image_prompt = dict(ip_adapter=ip_adapter_weights(parts, run.params["ip_adapter"]),
                            image_encoder=(parts.image_encoder, params["image_encoder"]),
                            image_processor=parts.processor)
    pipe = RetargetPipeline(
        unet=(comps.unet, run.params["unet"] if image_prompt else params["unet"]),
        controlnet=(comps.controlnet, params["controlnet"]),
        vae=(comps.autoencoder, params["vae"]),  # the identity autoencoder too (its patch size)
        reference_unet=(comps.reference_unet, params["reference"]) if mode == "acm" else None, mode=mode,
        context=_context(run.frozen), native_size=run.cfg.data.height_width,
        scheduler_config=sampling_scheduler_config(comps, run.cfg.train.prediction_type), **image_prompt)
    if image_prompt:
        pipe.ip_adapter_scale = run.cfg.sampling.ip_adapter_scale
    return pipe


def _from_folders(cfg, mode: str, allow_pickle: bool = False) -> RetargetPipeline:
    model = cfg.model
    if model.controlnet is None:
        raise PMFInputError("config model.controlnet is null; the retarget pipeline needs the pose ControlNet")
    # null reference_unet: the ACM as initialised, i.e. the base model's UNet (load_model finds <base>/unet).
    reference_unet = (model.reference_unet or model.base) if mode == "acm" else None
    ip_adapter = image_encoder = None
    if model.ip_adapter and mode != "controlnet_only":  # a plain ControlNet baseline of an IP-Adapter config
        from pmf_jax.training.image_prompt import image_encoder_folder, ip_adapter_file

        ip_adapter, image_encoder = ip_adapter_file(model.ip_adapter), image_encoder_folder(model)
    elif mode == "ip_adapter":
        raise PMFInputError("reference.mode=ip_adapter needs config model.ip_adapter (an IP-Adapter weight file) "
                            "and its model.image_encoder")
    pipe = RetargetPipeline.from_pretrained(model.base, controlnet=model.controlnet, reference_unet=reference_unet,
                                            mode=mode, dtype=model.dtype, attention_backend=model.attention_backend,
                                            revision=model.revision, allow_pickle=allow_pickle or model.allow_pickle,
                                            ip_adapter=ip_adapter, image_encoder=image_encoder)
    if pipe.ip_adapter is not None:
        pipe.ip_adapter_scale = cfg.sampling.ip_adapter_scale  # the default of every call
    return pipe


def sampling_kwargs(cfg, mode: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments of :meth:`RetargetPipeline.__call__` from ``cfg.sampling`` and ``cfg.reference`` (all but
    the seed, the inputs and the output): steps, scheduler, text / appearance guidance, ControlNet scale and the
    reference settings. Mode "controlnet_only" reads no reference, so it gets no appearance guidance.

    ``sampling.eta`` is not read: the DDIM sampler is deterministic (η = 0) only."""
    s = cfg.sampling
    appearance = None if run_mode(cfg, mode) == "controlnet_only" else s.reference_guidance_scale
    kwargs = dict(num_inference_steps=s.steps, scheduler=s.scheduler, guidance_scale=s.text_guidance_scale,
                  appearance_guidance_scale=appearance, controlnet_conditioning_scale=s.controlnet_scale,
                  reference_config=cfg.reference.to_reference_config())
    if cfg.model.ip_adapter and run_mode(cfg, mode) != "controlnet_only":
        kwargs["ip_adapter_scale"] = s.ip_adapter_scale
    return kwargs


def sampling_static(pipe: RetargetPipeline, cfg, size: Tuple[int, int], output_type: str = "np",
                    mode: Optional[str] = None) -> RetargetStatic:
    """The static settings of ``pipe`` called with :func:`sampling_kwargs` at ``size`` (H, W)."""
    kw = sampling_kwargs(cfg, mode or pipe.mode)
    return pipe.make_static(size, num_inference_steps=kw["num_inference_steps"], scheduler=kw["scheduler"],
                            appearance_guidance=kw["appearance_guidance_scale"] is not None,
                            reference_config=kw["reference_config"], output_type=output_type)


__all__ = ["RunParts", "pipeline_from_run", "pipeline_params", "read_run_config", "run_mode", "sampling_kwargs",
           "sampling_static"]
