"""Loading and saving model folders (diffusers/transformers ⇄ Flax params), IP-Adapter files, HF-cache lookup."""

from pmf_jax.io.ip_adapter import IPAdapterWeights, load_ip_adapter
from pmf_jax.io.naming import ConversionError, params_to_state_dict, state_dict_to_params
from pmf_jax.io.pretrained import from_pretrained, load_state_dict, read_config, save_pretrained

__all__ = ["ConversionError", "IPAdapterWeights", "from_pretrained", "load_ip_adapter", "load_state_dict",
           "params_to_state_dict", "read_config", "save_pretrained", "state_dict_to_params"]
