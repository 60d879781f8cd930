"""Shared test settings: fp32 'highest' matmul precision everywhere (parity tests compare against torch fp32), and
the runtime state an entry point sets (data/ builders importable, absl flags parsed, JAX's persistent compilation
cache in $PMF_JAX_CACHE_DIR or ~/.cache/pmf_jax/jax_cache): the test session is the entry point. The cache lets the
xdist workers and the many pipelines the tests build share compiled programs."""

import jax
import pytest

from pmf_jax import runtime

try:  # triton's library (diffusers' imports load it) segfaults when it loads after TensorFlow's (TFDS builds and
    import torch  # noqa: F401  TensorBoard writers in module fixtures); loaded first, both work
    import triton.runtime  # noqa: F401
except ImportError:  # pragma: no cover - torch is in the test extra; triton comes with torch on Linux x86
    pass

jax.config.update("jax_default_matmul_precision", "highest")
runtime.setup()


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in the test extra
        yield
        return
    torch.manual_seed(0)
    yield
