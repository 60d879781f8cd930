"""Argument helpers shared by the sampling subcommands (no heavy imports)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from pmf_jax import constants

DTYPES = ("auto",) + constants.DTYPES  # auto: bfloat16 on GPU/TPU, float32 on CPU


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"{value} must lie in [0, 2**32)")
    return value


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling options shared by the commands: negative prompt, steps, scheduler, seed, resolution. Steps and
    scheduler default to None: the command resolves them (:func:`pmf_jax.pipelines.defaults.resolve_sampling`: the
    flag, else the export's pmf_config.json, else the built-in default)."""
    parser.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    parser.add_argument("--steps", type=positive_int,
                        help=f"denoising steps (default: the export's, from its pmf_config.json, else "
                             f"{constants.DEFAULT_STEPS})")
    parser.add_argument("--scheduler", choices=constants.SCHEDULER_NAMES,
                        help=f"sampler (default: the export's, from its pmf_config.json, else "
                             f"{constants.DEFAULT_SCHEDULER})")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--height", type=int, help="output height, a multiple of 8 (default: the model's native "
                                                   "resolution, its UNet's sample_size times the autoencoder's "
                                                   "factor or an export's training size; for models trained at "
                                                   "512 or more the input's aspect-ratio bucket, sides from "
                                                   "256/384/512/640/768 and the native size)")
    parser.add_argument("--width", type=int, help="output width, a multiple of 8 (give both or neither)")


def add_guidance_args(parser) -> None:
    """The guidance flags of the retarget commands (``pmf retarget``, ``pmf animate``): ``--guidance-scale`` (None:
    the export's, else the default), ``--appearance-guidance-scale`` (None: off), ``--controlnet-scale``."""
    parser.add_argument("--guidance-scale", type=float,
                        help=f"text guidance (default: the export's, from its pmf_config.json, else "
                             f"{constants.DEFAULT_GUIDANCE_SCALE}; a model without a text encoder has no text to guide)")
    parser.add_argument("--appearance-guidance-scale", type=float,
                        help="separate appearance guidance (3 guidance rows); default: off, the unconditional row "
                             "reads the reference by --style-fidelity")
    parser.add_argument("--controlnet-scale", type=float, default=1.0, help="(default: %(default)s)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Dtype, attention backend, the persistent compilation cache and the progress bar."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="parameter and compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    group.add_argument("--attention-backend", choices=constants.ATTENTION_BACKENDS, default="auto")
    group.add_argument("--cache-dir", help="JAX persistent compilation cache (default: $PMF_JAX_CACHE_DIR or "
                                           "~/.cache/pmf_jax/jax_cache)")
    group.add_argument("--no-cache", action="store_true", help="do not use the persistent compilation cache")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_allow_pickle_arg(group)
    use_compilation_cache(parser)


def add_allow_pickle_arg(parser) -> None:
    """``--allow-pickle`` (``args.allow_pickle``, passed down as ``allow_pickle`` to :func:`pmf_jax.io.from_pretrained`)
    for every command that reads a model; :func:`add_runtime_args` adds it."""
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickled torch weights (.bin, .ckpt, .pt, .pth) where a model folder has no "
                             "safetensors: loading a pickle can run arbitrary code, so only for files you trust")


def use_compilation_cache(parser: argparse.ArgumentParser) -> None:
    """Marks a command as one that compiles sampling programs: the CLI turns JAX's persistent compilation cache on
    for it (:func:`compilation_cache`)."""
    parser.set_defaults(uses_compilation_cache=True)


def compilation_cache(args):
    """What :func:`pmf_jax.runtime.setup` gets for a parsed command line: ``False`` (leave JAX's cache setting alone)
    for commands that compile no sampling programs and with ``--no-cache``, else ``--cache-dir`` (None: the
    default folder)."""
    if not getattr(args, "uses_compilation_cache", False) or getattr(args, "no_cache", False):
        return False
    return getattr(args, "cache_dir", None)


def runtime_kwargs(args) -> dict:
    """Keyword arguments of the pipelines' ``from_pretrained`` from the runtime options."""
    return dict(dtype=args.dtype, attention_backend=args.attention_backend, allow_pickle=args.allow_pickle)


def write_settings(path: Path, args, **extra) -> None:
    """The command's arguments and the resolved values as JSON."""
    import jax

    settings = {k: v for k, v in sorted(vars(args).items()) if k not in ("func", "uses_compilation_cache")}
    settings.update(extra)
    settings["environment"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                               "devices": jax.device_count(), "python": platform.python_version(),
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(settings, indent=2, default=str) + "\n")
