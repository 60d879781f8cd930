"""Process-wide settings that only entry points set: the ``pmf`` CLI (every command), ``python -m train``, the
demo and the bench scripts call :func:`setup` once, before anything compiles. Library code (pipelines, loaders,
the trainer's functions) changes no global state.

What :func:`setup` sets:
  * JAX's persistent compilation cache (:func:`enable_compilation_cache`), so that a second run of the same program
    loads it instead of compiling;
  * ``data/`` on ``sys.path``: the TFDS builders there import each other by top-level name (``pairs_common``), the
    way ``tfds build data/<name>`` imports them, so both register one builder class;
  * absl's flags marked parsed: grain's worker processes read its absl flags, and programs that do not parse absl
    flags themselves get the defaults;
  * quiet library logs (:func:`set_verbosity`), unless ``-v`` / ``$PMF_VERBOSE=1`` asks for them: absl's Python
    logger at ERROR (orbax's "Given directory is read only" on every read of a run, TFDS's "Variant folder ... has no
    dataset_info.json" for every folder it probes), and TensorFlow's C++ INFO/WARNING lines and oneDNN banner
    (``TF_CPP_MIN_LOG_LEVEL=2``, ``TF_ENABLE_ONEDNN_OPTS=0``; TensorFlow only reads and writes TFDS files here, so
    its oneDNN kernels change no result). The environment variables reach the processes the entry point starts
    (grain workers, the demo's ``python -m train`` and ``pmf`` runs); values the user set are kept.

No JAX import at module level: the CLI imports this before it knows whether a command needs JAX.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Union

from pmf_jax import progress
from pmf_jax.errors import PMFInputError

DEFAULT_CACHE_DIR = Path("~/.cache/pmf_jax/jax_cache")
CACHE_ENV = "PMF_JAX_CACHE_DIR"
# The repository's data/ folder (the builders are not installed; run from a checkout).
BUILDERS_DIR = Path(__file__).resolve().parent.parent / "data"

CacheSetting = Union[str, os.PathLike, None, bool]

VERBOSE_ENV = "PMF_VERBOSE"
# Read by TensorFlow when it loads (TFDS loads it), so they are set before anything imports it.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
QUIET_LOGGERS = {"absl": logging.ERROR}  # orbax and TFDS log through absl


def enable_compilation_cache(cache_dir: CacheSetting = None) -> Optional[Path]:
    """Turns on JAX's persistent compilation cache so that a second run of the same program starts fast.

    Args:
      cache_dir: a folder; ``None`` (or ``True``) = ``$PMF_JAX_CACHE_DIR`` or ``~/.cache/pmf_jax/jax_cache``;
        ``False`` = leave the cache as it is. A cache directory the user already configured for JAX
        (``JAX_COMPILATION_CACHE_DIR``) is kept. A URL (``gs://bucket/jax_cache``) is used as it is: JAX writes
        its cache through ``etils.epath``; it is checked writable (:func:`pmf_jax.storage.check_writable`: the
        server is reachable, the bucket exists) instead of created.
    Returns:
      The cache folder in use, or None.
    """
    if cache_dir is False:
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        from pmf_jax import storage

        return storage.user_path(current)
    given = None if cache_dir is True else cache_dir
    setting = given or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    from pmf_jax import storage

    if storage.is_url(setting):  # no mkdir: object stores have no folders
        folder = storage.check_writable(setting, "compilation cache")
        jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
        return folder
    folder = Path(setting).expanduser()
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


def set_verbosity(verbose: Optional[bool] = None) -> bool:
    """Quiet library logs (the default) or the libraries' own levels (``verbose``), for this process and the
    processes it starts (module docstring). ``verbose=None``: ``$PMF_VERBOSE`` decides (``1`` = verbose). Verbose
    sets ``$PMF_VERBOSE=1`` for the child processes and changes nothing else. Returns whether verbose."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return True
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    return False


def setup(compilation_cache: CacheSetting = None, verbose: Optional[bool] = None) -> Optional[Path]:
    """Everything an entry point sets up (module docstring). ``compilation_cache``: as ``cache_dir`` of
    :func:`enable_compilation_cache` (``False``: leave JAX's cache setting alone). ``verbose``: as
    :func:`set_verbosity` (None: ``$PMF_VERBOSE``). Returns the cache folder in use, or None."""
    set_verbosity(verbose)
    progress.interval_s()  # a bad $PMF_PROGRESS_INTERVAL is an input error before any work, not after it
    add_dataset_builders()
    mark_absl_flags_parsed()
    return enable_compilation_cache(compilation_cache)


__all__ = ["BUILDERS_DIR", "CACHE_ENV", "DEFAULT_CACHE_DIR", "QUIET_ENVIRONMENT", "QUIET_LOGGERS", "VERBOSE_ENV",
           "add_dataset_builders", "enable_compilation_cache", "mark_absl_flags_parsed", "set_verbosity", "setup"]
