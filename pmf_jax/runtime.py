"""Process-wide settings that only entry points set: the ``pmf`` CLI (every command), ``python -m train``, the
demo and the bench scripts call :func:`setup` once, before anything compiles. Library code (pipelines, loaders,
the trainer's functions) changes no global state.

What :func:`setup` sets:
  * JAX's persistent compilation cache (:func:`enable_compilation_cache`), so that a second run of the same program
    loads it instead of compiling;
  * ``data/`` on ``sys.path``: the TFDS builders there import each other by top-level name (``pairs_common``), the
    way ``tfds build data/<name>`` imports them, so both register one builder class;
  * absl's flags marked parsed: grain's worker processes read its absl flags, and programs that do not parse absl
    flags themselves get the defaults.

No JAX import at module level: the CLI imports this before it knows whether a command needs JAX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

from pmf_jax.errors import PMFInputError

DEFAULT_CACHE_DIR = Path("~/.cache/pmf_jax/jax_cache")
CACHE_ENV = "PMF_JAX_CACHE_DIR"
# The repository's data/ folder (the builders are not installed; run from a checkout).
BUILDERS_DIR = Path(__file__).resolve().parent.parent / "data"

CacheSetting = Union[str, os.PathLike, None, bool]


def enable_compilation_cache(cache_dir: CacheSetting = None) -> Optional[Path]:
    """Turns on JAX's persistent compilation cache so that a second run of the same program starts fast.

    Args:
      cache_dir: a folder; ``None`` (or ``True``) = ``$PMF_JAX_CACHE_DIR`` or ``~/.cache/pmf_jax/jax_cache``;
        ``False`` = leave the cache as it is. A cache directory the user already configured for JAX
        (``JAX_COMPILATION_CACHE_DIR``) is kept.
    Returns:
      The cache folder in use, or None.
    """
    if cache_dir is False:
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    given = None if cache_dir is True else cache_dir
    folder = Path(given or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PMFInputError(f"cannot create the compilation cache folder {folder}: {err}") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def add_dataset_builders() -> None:
    """Puts ``data/`` on ``sys.path`` (once) so that :mod:`pmf_jax.input_pipeline` can import the TFDS builders."""
    if str(BUILDERS_DIR) not in sys.path:
        sys.path.insert(0, str(BUILDERS_DIR))


def mark_absl_flags_parsed() -> None:
    """Marks absl's flags parsed (their defaults) unless the program parsed them already."""
    try:
        from absl import flags
    except ImportError:  # absl comes with the data extra (grain); without it there is nothing to mark
        return

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def setup(compilation_cache: CacheSetting = None) -> Optional[Path]:
    """Everything an entry point sets up (module docstring). ``compilation_cache``: as ``cache_dir`` of
    :func:`enable_compilation_cache` (``False``: leave JAX's cache setting alone). Returns the cache folder in use,
    or None."""
    add_dataset_builders()
    mark_absl_flags_parsed()
    return enable_compilation_cache(compilation_cache)


__all__ = ["BUILDERS_DIR", "CACHE_ENV", "DEFAULT_CACHE_DIR", "add_dataset_builders", "enable_compilation_cache",
           "mark_absl_flags_parsed", "setup"]
