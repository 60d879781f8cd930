"""Shared test settings: fp32 'highest' matmul precision everywhere (parity tests compare against torch fp32)."""

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in the test extra
        yield
        return
    torch.manual_seed(0)
    yield
