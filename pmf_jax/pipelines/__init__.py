"""Sampling pipelines: pose retargeting (:class:`RetargetPipeline`), text-guided enhancement (:class:`EnhancePipeline`,
InstructPix2Pix, optionally masked), the two chained (:class:`PMFPipeline`: retarget, then enhance every result), and
the retarget pipeline of a training run or config (:func:`pipeline_from_run`, :func:`sampling_kwargs`).

Imported lazily, so that ``pmf_jax.pipelines.images`` (PIL/numpy only) loads without JAX.
"""

_EXPORTS = {
    "RetargetPipeline": "pmf_jax.pipelines.retarget",
    "RetargetBatch": "pmf_jax.pipelines.retarget_inputs",
    "RetargetStatic": "pmf_jax.pipelines.retarget_inputs",
    "EnhancePipeline": "pmf_jax.pipelines.enhance",
    "EnhanceBatch": "pmf_jax.pipelines.enhance",
    "EnhanceStatic": "pmf_jax.pipelines.enhance",
    "PMFPipeline": "pmf_jax.pipelines.pmf",
    "PMFOutput": "pmf_jax.pipelines.pmf",
    "SamplingStatic": "pmf_jax.pipelines.base",
    "Programs": "pmf_jax.pipelines.base",
    "MODES": "pmf_jax.pipelines.retarget",
    "pipeline_from_run": "pmf_jax.pipelines.from_run",
    "sampling_kwargs": "pmf_jax.pipelines.from_run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
