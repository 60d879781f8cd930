"""Shared test settings: fp32 'highest' matmul precision everywhere (parity tests compare against torch fp32), and
the runtime state an entry point sets (data/ builders importable, absl flags parsed) without the persistent
compilation cache: tests that want the cache run the CLI or the trainer with PMF_JAX_CACHE_DIR."""

import jax
import pytest

from pmf_jax import runtime

jax.config.update("jax_default_matmul_precision", "highest")
runtime.setup(compilation_cache=False)


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in the test extra
        yield
        return
    torch.manual_seed(0)
    yield
