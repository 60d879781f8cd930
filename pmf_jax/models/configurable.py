"""Config-driven construction of the Flax models from diffusers/transformers ``config.json`` dicts.

Each model class declares which config keys it implements (its dataclass fields) and which options it accepts only
at their default value; :func:`parse_config` turns a config dict into constructor arguments and raises one clear
error naming every unsupported option or unknown key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Mapping

from pmf_jax.errors import PMFInputError


def _hashable(value):
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def parse_config(cls, config: Mapping[str, Any], *, default_only: Mapping[str, Any] = (),
                 ignored: Iterable[str] = ()) -> Dict[str, Any]:
    """Maps a config dict onto the dataclass fields of ``cls``.

    Args:
      cls: a Flax module class whose dataclass fields named in ``cls.CONFIG_KEYS`` are config keys.
      config: the parsed ``config.json``.
      default_only: option -> the only value we implement (e.g. ``{"class_embed_type": None}``).
      ignored: keys with no effect on the forward pass (metadata, dropout rates, init ranges).
    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are metadata and skipped.
    """
    default_only = dict(default_only)
    ignored = set(ignored)
    fields = {f.name for f in dataclasses.fields(cls)}
    keys = set(cls.CONFIG_KEYS)
    assert keys <= fields, keys - fields
    kwargs, unsupported, unknown = {}, [], []
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in keys:
            kwargs[key] = _hashable(value)
        elif key in default_only:
            if _hashable(value) != _hashable(default_only[key]):
                unsupported.append(f"{key}={value!r} (only {default_only[key]!r} is implemented)")
        else:
            unknown.append(key)
    problems = []
    if unsupported:
        problems.append("unsupported options: " + ", ".join(unsupported))
    if unknown:
        problems.append("unknown config keys: " + ", ".join(sorted(unknown)))
    if problems:
        raise PMFInputError(f"{cls.__name__} config: " + "; ".join(problems))
    return kwargs


def config_of(module) -> Dict[str, Any]:
    """The config dict of a model instance (its ``CONFIG_KEYS`` fields, JSON-ready)."""
    return {key: _jsonable(getattr(module, key)) for key in type(module).CONFIG_KEYS}


class PretrainedMixin:
    """What every loadable model class provides to :mod:`pmf_jax.io` (mixed into a ``flax.linen.Module``).

    Subclasses set ``CONFIG_KEYS`` (config keys that are dataclass fields), ``DEFAULT_ONLY`` (options implemented
    at their default only), ``IGNORED_KEYS``, ``WEIGHTS_STEM`` and implement ``dummy_inputs()``.
    """

    CONFIG_KEYS: tuple = ()
    DEFAULT_ONLY: Mapping[str, Any] = {}
    IGNORED_KEYS: tuple = ()
    WEIGHTS_STEM = "diffusion_pytorch_model"
    IGNORE_UNEXPECTED: tuple = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **module_kwargs):
        """Builds the module from a config dict; ``module_kwargs`` sets dtype, attention_backend, ..."""
        kwargs = parse_config(cls, config, default_only=cls.DEFAULT_ONLY, ignored=cls.IGNORED_KEYS)
        kwargs.update(module_kwargs)
        return cls(**kwargs)

    def to_config(self) -> Dict[str, Any]:
        config = config_of(self)
        config["_class_name"] = type(self).__name__
        config["_diffusers_version"] = "0.30.0"
        return config

    @classmethod
    def normalize_state_dict(cls, state: Dict[str, Any]) -> Dict[str, Any]:
        """Renames checkpoint keys written by other library versions to the keys this class saves (default: as is)."""
        return state

    def dummy_inputs(self) -> tuple:
        """Small positional inputs for ``init`` (shapes only matter)."""
        raise NotImplementedError

    def init_params(self, rng):
        return self.init(rng, *self.dummy_inputs())["params"]

    def abstract_params(self):
        """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
        import jax

        return jax.eval_shape(self.init_params, jax.random.key(0))
