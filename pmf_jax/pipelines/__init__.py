"""Sampling pipelines: pose retargeting (:class:`RetargetPipeline`) and text-guided enhancement
(:class:`EnhancePipeline`, InstructPix2Pix).

Imported lazily, so that ``pmf_jax.pipelines.images`` (PIL/numpy only) loads without JAX.
"""

_EXPORTS = {
    "RetargetPipeline": "pmf_jax.pipelines.retarget",
    "EnhancePipeline": "pmf_jax.pipelines.enhance",
    "MODES": "pmf_jax.pipelines.retarget",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
