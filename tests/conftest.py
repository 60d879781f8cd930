"""Shared test settings: fp32 'highest' matmul precision everywhere (parity tests compare against torch fp32), and
the runtime state an entry point sets (data/ builders importable, absl flags parsed, JAX's persistent compilation
cache in $PMF_JAX_CACHE_DIR or ~/.cache/pmf_jax/jax_cache): the test session is the entry point. The cache lets the
xdist workers and the many pipelines the tests build share compiled programs."""

import jax
import pytest

from pmf_jax import runtime

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
