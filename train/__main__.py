"""``python -m train --config configs/<name>.yaml [key=value ...]``: load the config, train, resume if possible."""

from __future__ import annotations

import argparse
import sys

from pmf_jax.errors import PMFInputError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config (schema: pmf_jax/config.py)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this call")
    parser.add_argument("-v", "--verbose", action="store_true", default=None,
                        help="show the libraries' log lines (absl/orbax, TFDS, TensorFlow's C++ log), hidden by "
                             "default (also: PMF_VERBOSE=1)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickled torch weights (.bin, .ckpt) of the config's model folders, which can "
                             "run arbitrary code: only for files you trust (sets model.allow_pickle=true)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 mesh.data=-1")
    args = parser.parse_intermixed_args(argv)  # flags may follow the key=value overrides
    from pmf_jax import runtime

    runtime.set_verbosity(args.verbose)  # before the trainer's imports; its runtime.setup keeps this choice
    from pmf_jax.config import load_config
    from train.loop import TrainingDiverged, train_and_evaluate

    try:
        cfg = load_config(args.config, args.overrides + (["model.allow_pickle=true"] if args.allow_pickle else []))
        metrics = train_and_evaluate(cfg, max_steps=args.max_steps)
    except PMFInputError as err:
        print(f"error: {err.cli_message or err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(f"done: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
