"""The ``pmf`` console script: a dispatcher over subcommands, each a module of :mod:`pmf_jax.commands`.

A subcommand module exports ``add_parser(subparsers)`` (adds its argparse sub-parser) and ``run(args) -> int``
(the exit status); register it in :data:`COMMANDS`. Modules keep their heavy imports (JAX, models) inside ``run``,
so ``pmf X --help`` and input errors answer at once. A :class:`~pmf_jax.errors.PMFInputError` anywhere becomes one
line ``error: ...`` on stderr (its ``cli_message`` when it has one: the flags' spelling) and exit status 2, without a
traceback.

Before a command runs, :func:`pmf_jax.runtime.setup` sets the process-wide state (the persistent compilation cache
for the commands that compile sampling programs: :func:`pmf_jax.commands.options.compilation_cache`; quiet library
logs unless ``pmf -v COMMAND`` or ``$PMF_VERBOSE=1``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from pmf_jax import __version__, runtime
from pmf_jax.commands import options
from pmf_jax.errors import PMFInputError

# name -> module (imported when the parser is built; imports must stay light)
COMMANDS = {
    "retarget": "pmf_jax.commands.retarget",
    "animate": "pmf_jax.commands.animate",
    "enhance": "pmf_jax.commands.enhance",
    "pose": "pmf_jax.commands.pose",
    "eval": "pmf_jax.commands.eval",
    "scaling": "pmf_jax.commands.scaling",
    "convert": "pmf_jax.commands.convert",
    "serve": "pmf_jax.commands.serve",
}

INPUT_ERROR_STATUS = 2


VERBOSE_HELP = ("show the libraries' log lines (absl/orbax, TFDS, TensorFlow's C++ log), which are hidden by default "
                "(also: PMF_VERBOSE=1)")


class CommandParser(argparse.ArgumentParser):
    """Every subcommand's parser (and theirs, e.g. ``pmf eval generate``) also takes ``-v``, anywhere after it.

    Its default is SUPPRESS so that a subcommand's parse leaves the top-level ``pmf -v`` alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmf", description="PoseMaster Fusion: diffusion-based 2D human pose "
                                                             "retargeting in JAX.")
    parser.add_argument("--version", action="version", version=f"pmf_jax {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=None, help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def one_line(message: str) -> str:
    """A multi-line message (e.g. a list of missing checkpoint keys) joined into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runtime.setup(options.compilation_cache(args), verbose=args.verbose)
        return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
    except PMFInputError as err:
        print(f"error: {one_line(err.cli_message or err)}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
