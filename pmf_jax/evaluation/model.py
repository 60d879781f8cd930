"""The model ``pmf eval generate --model`` evaluates: a training run folder or a PMF export, built as everywhere else.

* A **run** (``RUN_DIR``, ``RUN_DIR/STEP`` or ``RUN_DIR/checkpoints/STEP``; it has ``components.json``): its own
  ``config.yaml`` (plus ``KEY=VALUE`` overrides) is the config, the parts are built as training built them and the
  trained parameters (their EMA when the run kept one) of the step (default the latest) replace them
  (:func:`load_run_parts`); the pipeline is :func:`~pmf_jax.pipelines.from_run.pipeline_from_run` of that.
* An **export** (``pmf convert to-diffusers``; any folder with ``unet/`` and ``controlnet/``):
  :meth:`~pmf_jax.pipelines.RetargetPipeline.from_pretrained`, with its own mode and reference settings; the config
  (``--config``) supplies the data and the ``sampling`` section.
* No ``--model``: the folders the config's ``model`` section names (:func:`pipeline_from_run` of the config).

The pipeline mode is a config override like any other: ``reference.mode=reference_only`` (with
``reference.method=attn+adain`` for Method 1 with AdaIN) or ``reference.mode=controlnet_only`` evaluates a run's or
an export's UNet and ControlNet as that baseline. A run's parts are built as it trained them (its own mode), then
sampled in the overridden one; an export's own reference settings hold except the ``reference.*`` keys overridden
(:attr:`EvalModel.reference_keys`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from pmf_jax.errors import PMFInputError


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """What ``--model`` names. kind: "run", "export" or "config" (no --model); path: absolute folder (None for
    "config"); step: a run's checkpoint step (resolved: the latest when not given)."""

    kind: str
    path: Optional[Path] = None
    step: Optional[int] = None
    #: the ``reference.*`` fields given as overrides (``mode``, ``method``, ...): they replace an export's own
    reference_keys: Tuple[str, ...] = ()

    def with_overrides(self, overrides: Sequence[str]) -> "EvalModel":
        """This model with :attr:`reference_keys` of the ``KEY=VALUE`` overrides."""
        keys = tuple(sorted({o.split("=", 1)[0][len("reference."):] for o in overrides
                             if o.split("=", 1)[0].startswith("reference.")}))
        return dataclasses.replace(self, reference_keys=keys)

    def describe(self) -> Dict[str, Any]:
        """What ``generation.json`` records of the model (with the config's ``model`` section)."""
        if self.kind == "config":
            return {"kind": "config"}
        return {"kind": self.kind, "path": str(self.path), **({"step": self.step} if self.kind == "run" else {})}


def resolve_model(model) -> EvalModel:
    """``--model`` -> :class:`EvalModel` (a run's step resolved now, so that a run that goes on training does not
    change what a resumed generation samples). Raises PMFInputError when it is neither a run nor a model folder.

    A URL (``gs://bucket/...``): a run is read where it is (orbax reads its checkpoints from the URL), an export is
    read from a cached local copy (:func:`pmf_jax.storage.local_copy`), whose path is what is recorded."""
    if model is None:
        return EvalModel("config")
    from pmf_jax import storage
    from pmf_jax.io.checkpoints import open_manager, resolve_run

    url = storage.is_url(model)
    run_dir, step = resolve_run(model)
    if (run_dir / "components.json").is_file():
        manager = open_manager(run_dir)
        try:
            steps = sorted(manager.all_steps())
        finally:
            manager.close()
        if not steps:
            raise PMFInputError(f"--model {str(model)!r}: the run has no complete checkpoint")
        if step is not None and step not in steps:
            raise PMFInputError(f"--model {str(model)!r}: no checkpoint at step {step}; available: {steps}")
        return EvalModel("run", run_dir if url else run_dir.absolute(), steps[-1] if step is None else step)
    folder = storage.local_copy(model) if url else Path(model).expanduser()
    if not folder.is_dir():
        raise PMFInputError(f"--model {str(model)!r} does not exist (give a training run or a PMF export folder)")
    if not (folder / "unet" / "config.json").is_file() or not (folder / "controlnet" / "config.json").is_file():
        raise PMFInputError(f"--model {str(model)!r} is neither a training run (components.json) nor a PMF export "
                            f"(unet/ and controlnet/)")
    return EvalModel("export", folder.absolute())


def eval_config(model: EvalModel, config: Optional[str], overrides: Sequence[str]):
    """The config of the evaluation: a run's own ``config.yaml``, else ``config`` (None: the schema's defaults);
    ``overrides`` on top."""
    from pmf_jax.config import load_config

    if model.kind == "run":
        if config:
            raise PMFInputError(f"--config: a training run brings its own config ({model.path / 'config.yaml'}); "
                                f"change it with KEY=VALUE overrides (e.g. data.data_dir=...)")
        from pmf_jax.pipelines.from_run import read_run_config

        return read_run_config(model.path, overrides)
    return load_config(config, overrides)


def load_run_parts(cfg, run_dir=None, step: Optional[int] = None, ema: bool = True) -> Tuple[Any, int]:
    """(:class:`~pmf_jax.pipelines.from_run.RunParts`, step): the parts built from ``cfg`` as training builds them,
    with the trained parameters of ``run_dir`` (default ``cfg.train.output_dir``) at ``step`` (default the latest)
    in place; ``ema``: their EMA copy when the run kept one."""
    import jax
    import jax.numpy as jnp

    from pmf_jax.io.checkpoints import restore_trained_params
    from pmf_jax.pipelines.from_run import RunParts
    from pmf_jax.training import components as components_lib

    comps, params, frozen = components_lib.build(cfg, jax.random.key(cfg.train.seed))
    trained, step = restore_trained_params(run_dir or cfg.train.output_dir, step, ema=ema)
    for part, tree in trained.items():
        params[part] = jax.tree_util.tree_map(jnp.asarray, tree)
    return RunParts(cfg, comps, params, frozen), step


def build_pipeline(cfg, model: EvalModel, allow_pickle: bool = False):
    """The :class:`~pmf_jax.pipelines.RetargetPipeline` of ``model`` (see the module docstring). ``allow_pickle``: as
    :func:`pmf_jax.io.from_pretrained`, for the model folders an export or the config names."""
    from pmf_jax.pipelines.from_run import pipeline_from_run

    if model.kind == "run":
        from pmf_jax.pipelines.from_run import read_run_config

        trained = read_run_config(model.path).reference.mode
        built = dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, mode=trained))
        run, _ = load_run_parts(built, model.path, model.step)
        if cfg.reference.mode == "acm" and "reference_unet" not in run.params:
            raise PMFInputError(f"--model {model.path}: the run trained in reference.mode={trained} and has no "
                                f"reference UNet for reference.mode=acm")
        return pipeline_from_run(run, mode=cfg.reference.mode)
    if model.kind == "export":
        from pmf_jax.pipelines import RetargetPipeline

        mode, _ = export_reference(model, cfg)
        return RetargetPipeline.from_pretrained(str(model.path), mode=mode, dtype=cfg.model.dtype,
                                                attention_backend=cfg.model.attention_backend,
                                                allow_pickle=allow_pickle)
    return pipeline_from_run(cfg, allow_pickle=allow_pickle)


def export_reference(model: EvalModel, cfg) -> Tuple[Optional[str], Any]:
    """(mode, ReferenceConfig) an export is sampled with: its own (``pmf_config.json``), with the ``reference.*``
    fields of :attr:`EvalModel.reference_keys` taken from ``cfg``; (None, None) for a run or a config (theirs are
    ``cfg.reference``)."""
    if model.kind != "export":
        return None, None
    from pmf_jax.convert import read_pmf_config, reference_config_of

    pmf_config = read_pmf_config(model.path) or {}
    reference = reference_config_of(pmf_config)
    names = {f.name for f in dataclasses.fields(reference)}
    given = {k: getattr(cfg.reference, k) for k in model.reference_keys if k in names}
    mode = cfg.reference.mode if "mode" in model.reference_keys else pmf_config.get("mode", "acm")
    return mode, dataclasses.replace(reference, **given)
