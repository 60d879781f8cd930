"""``pmf convert``: ``to-diffusers`` (a training run's checkpoint -> diffusers folders for PyTorch) and
``from-diffusers`` (diffusers folders -> an orbax checkpoint training starts from). See :mod:`pmf_jax.convert`."""

from __future__ import annotations

import argparse

from pmf_jax.commands.options import add_allow_pickle_arg
from pmf_jax.constants import DTYPE_SHORT_NAMES
from pmf_jax.out_folder import add_out_arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert checkpoints to and from diffusers folders",
                              description="Converts a training run's checkpoint to diffusers folders (PyTorch), or "
                                          "diffusers folders to an orbax checkpoint that training starts from.")
    sub = p.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    to = sub.add_parser(
        "to-diffusers", help="a training run's checkpoint -> diffusers folders + pmf_config.json",
        description="Writes OUT/unet, OUT/reference_unet, OUT/controlnet (diffusers UNet2DConditionModel / "
                    "ControlNetModel folders, safetensors), the base's vae/, text_encoder/, tokenizer/, a "
                    "scheduler/ with the run's noise schedule and prediction type, and OUT/pmf_config.json (mode and "
                    "reference settings). Pixel-space runs get no vae/ (identity autoencoder). Nothing appears "
                    "under OUT unless the whole export succeeds.")
    to.add_argument("--checkpoint", required=True, help="RUN_DIR (latest step), RUN_DIR/STEP or "
                                                        "RUN_DIR/checkpoints/STEP")
    add_out_arguments(to, "output folder")
    to.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                    help="export the EMA weights (default: when the run kept them) or, with --no-ema, the raw ones")
    to.add_argument("--base", help="the run's base SD folder or cached repo id, if it moved since training")
    to.add_argument("--dtype", choices=tuple(DTYPE_SHORT_NAMES), default="fp32",
                    help="of the exported models (default: %(default)s)")
    add_allow_pickle_arg(to)
    to.add_argument("--link", action="store_true", help="symlink the base's vae/text_encoder/tokenizer files "
                                                        "instead of copying them")

    frm = sub.add_parser(
        "from-diffusers", help="diffusers folders -> an orbax checkpoint folder for training",
        description="Writes CKPT_DIR with each model's config.json and its parameters as an orbax checkpoint "
                    "(CKPT_DIR/<part>/orbax_params), plus tokenizer/ and scheduler/. Train from it with "
                    "model.base=CKPT_DIR (and model.controlnet / model.reference_unet = CKPT_DIR for the parts it "
                    "holds).")
    frm.add_argument("--model", required=True, help="SD pipeline folder or cached repo id (or a PMF export)")
    frm.add_argument("--controlnet", help="ControlNet folder or cached repo id (replaces the model's controlnet/)")
    frm.add_argument("--reference-unet", help="reference UNet (ACM) folder (replaces the model's reference_unet/)")
    add_out_arguments(frm, "output checkpoint folder", metavar="CKPT_DIR")
    frm.add_argument("--dtype", choices=tuple(DTYPE_SHORT_NAMES), default="fp32",
                     help="stored parameters (default: %(default)s)")
    frm.add_argument("--revision", help="Hub revision of --model")
    add_allow_pickle_arg(frm)
    return p


def run(args) -> int:
    if args.convert_command == "to-diffusers":
        from pmf_jax.convert import export_to_diffusers

        out = export_to_diffusers(args.checkpoint, args.out, ema=args.ema, base=args.base, dtype=args.dtype,
                                  link=args.link, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
        print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
        return 0
    from pmf_jax.convert import import_from_diffusers

    out = import_from_diffusers(args.model, args.out, controlnet=args.controlnet, reference_unet=args.reference_unet,
                                dtype=args.dtype, revision=args.revision, allow_pickle=args.allow_pickle,
                                overwrite=args.overwrite)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
