"""Converting between training runs, diffusers (PyTorch) folders and orbax checkpoints (``pmf convert``).

* :func:`export_to_diffusers` — a run's checkpoint -> diffusers folders + ``pmf_config.json`` (PyTorch users run it
  with :class:`pmf_jax.torch_compat.pipeline.PMFTorchPipeline`; the JAX pipelines open it too).
* :func:`import_from_diffusers` — diffusers folders -> an orbax checkpoint folder that training starts from.
"""

from pmf_jax.convert.folders import PMF_CONFIG, read_pmf_config, reference_config_of
from pmf_jax.convert.from_diffusers import import_from_diffusers, is_pretrained_checkpoint
from pmf_jax.convert.to_diffusers import export_to_diffusers

__all__ = ["PMF_CONFIG", "export_to_diffusers", "import_from_diffusers", "is_pretrained_checkpoint",
           "read_pmf_config", "reference_config_of"]
