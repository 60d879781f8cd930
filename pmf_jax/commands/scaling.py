"""``pmf scaling``: plan a multi-chip training run from compiled programs — memory per device, collectives, FLOPs,
a roofline step time per chip and weak scaling over a sweep of device counts (see :mod:`pmf_jax.scaling`).

Planning compiles for virtual CPU devices: when this process has fewer devices than the plan needs, the command
starts itself again with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu``.
``--measure N`` instead runs the train step N times on this process's (real) devices and compares; launched as a
multi-process run (the trainer's launch variables), on every process's devices, process 0 writing ``--out``.

``--out`` may be a URL (``gs://bucket/...``): the reports are written in a local stage (the results so far in
``<storage cache>/partial/gs/<bucket>/<path>.partial``, :func:`pmf_jax.out_folder.partial_folder`) and uploaded when
the plan is complete (:mod:`pmf_jax.out_folder`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pmf_jax.commands.options import positive_int
from pmf_jax.errors import PMFInputError
from pmf_jax.out_folder import add_out_arguments, check_out_folder, staged_folder

CHIPS = ("tpu-v5p", "tpu-v5e", "h100", "a100")  # = pmf_jax.scaling.roofline.CHIPS (no JAX import here; tested)
CHILD_ENV = "PMF_SCALING_CHILD"
# The programs are compiled, never run, on the CPU: skip LLVM's expensive optimisations (HLO, collectives, buffer
# assignment and cost analysis do not change; the compile gets ~25% faster).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def mesh_arg(text: str) -> dict:
    """``data=8,fsdp=32,tensor=1`` → {"data": 8, "fsdp": 32, "tensor": 1} (missing axes: 1; one may be -1)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, value = part.partition("=")
        if not sep or axis.strip() not in ("data", "fsdp", "tensor"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected axis=size pairs over data, fsdp, tensor "
                                             f"(e.g. data=8,fsdp=32,tensor=1)")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: size {value!r} of {axis} is not an integer") from None
    if not sizes:
        raise argparse.ArgumentTypeError("empty mesh")
    return {axis: sizes.get(axis, 1) for axis in ("data", "fsdp", "tensor")}


def sweep_arg(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated device counts, e.g. 8,32,128") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: device counts must be positive")
    return sorted(set(values))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scaling", help="plan a multi-chip training run: memory, collectives, FLOPs, roofline step time",
        description="Compiles the real train step (and the sampling programs) for a device mesh ahead of time, from "
                    "shapes only (no weights are read), on virtual CPU devices, and reports per-device memory, every "
                    "collective of the compiled program, FLOPs, a roofline step time for a chip, and weak-scaling "
                    "efficiency over a sweep of device counts. Writes DIR/scaling.md, scaling.json and scaling.png (the "
                    "sweep's images/s and efficiency with --sweep, else each program's roofline terms); with "
                    "--measure, DIR/measure.json and scaling.png (the measured step beside the prediction). While "
                    "it plans, the results so far are in DIR.partial/scaling.partial.json.")
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/sd15_stage2.yaml)")
    p.add_argument("--devices", type=positive_int, help="devices of the planned run (default with --measure: all)")
    p.add_argument("--mesh", type=mesh_arg, help="mesh sizes, e.g. data=8,fsdp=32,tensor=1 (default: the config's "
                                                 "mesh section; one size may be -1)")
    p.add_argument("--chip", choices=CHIPS, default="tpu-v5p", help="chip of the roofline (default: %(default)s)")
    p.add_argument("--batch-per-device", type=positive_int, default=4,
                   help="examples per data-parallel shard (data x fsdp); default %(default)s")
    p.add_argument("--sweep", type=sweep_arg, default=[], metavar="N,N,...",
                   help="device counts for the weak-scaling sweep, e.g. 8,32,128,512")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling programs")
    p.add_argument("--measure", type=positive_int, metavar="N",
                   help="run the train step N times on this process's devices (or, launched as a multi-process run "
                        "with the trainer's JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, every "
                        "process's) and print measured vs predicted")
    add_out_arguments(p, "output folder")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.resolution=512")
    return p


def _check(args) -> None:
    if not Path(args.config).is_file():
        raise PMFInputError(f"--config {args.config!r} does not exist")
    if args.measure is None and args.devices is None:
        raise PMFInputError("--devices is required (the device count of the planned run)")
    check_out_folder(args.out, args.overwrite)


def child_argv(args) -> list:
    """The command line that repeats this invocation (for the re-started process)."""
    argv = ["scaling", "--config", args.config, "--devices", str(args.devices), "--chip", args.chip,
            "--batch-per-device", str(args.batch_per_device), "--out", args.out]
    if args.mesh:
        argv += ["--mesh", ",".join(f"{k}={v}" for k, v in args.mesh.items())]
    if args.sweep:
        argv += ["--sweep", ",".join(map(str, args.sweep))]
    if args.no_sampling:
        argv.append("--no-sampling")
    if args.overwrite:
        argv.append("--overwrite")
    return argv + list(args.overrides)


def child_env(devices: int, env=None) -> dict:
    env = dict(os.environ if env is None else env)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    flags += [f"--xla_force_host_platform_device_count={devices}"]
    flags += [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in " ".join(flags)]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **{CHILD_ENV: "1"})
    return env


def run(args) -> int:
    _check(args)
    from pmf_jax.config import load_config
    from pmf_jax.scaling.planner import resolve_mesh
    from pmf_jax.scaling.roofline import get_chip, sweep_mesh

    cfg = load_config(args.config, args.overrides)  # errors in the config are reported before anything starts
    mesh = args.mesh or {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    chip = get_chip(args.chip)
    import jax

    if args.measure is not None:
        return _measure(args, cfg, mesh, chip, _out_path(args.out))
    resolved = resolve_mesh(mesh, args.devices)  # a bad mesh or sweep fails before anything compiles
    for n in args.sweep:
        sweep_mesh(resolved, n)
    needed = max([args.devices, *args.sweep])
    if jax.device_count() < needed:
        if os.environ.get(CHILD_ENV) == "1":
            raise PMFInputError(f"the restarted process has {jax.device_count()} devices, needs {needed}")
        print(f"pmf scaling: restarting with {needed} virtual CPU devices", file=sys.stderr, flush=True)
        return subprocess.call([sys.executable, "-m", "pmf_jax.cli", *child_argv(args)], env=child_env(needed))

    from pmf_jax.scaling import planner, report

    out = _out_path(args.out)
    # The stage (DIR.partial) keeps the results so far if planning is stopped; DIR appears when the plan is complete.
    with staged_folder(out, args.overwrite, partial="keep") as stage:
        def save(partial):
            (stage / "scaling.partial.json").write_text(json.dumps(partial, indent=2, default=str) + "\n")

        result = planner.plan(cfg, config_name=args.config, devices=args.devices, mesh=mesh, chip=chip,
                              batch_per_device=args.batch_per_device, sweep=args.sweep,
                              sampling=not args.no_sampling, on_progress=save)
        paths = report.write_outputs(result, stage)
        (stage / "scaling.partial.json").unlink(missing_ok=True)
    pred = result["train_step"]["prediction"]
    print(f"train step on {args.devices} x {chip.name}: {pred['step_s'] * 1e3:.1f} ms ({pred['limit']}-bound), "
          f"{result['train_step']['global_batch'] / pred['step_s']:.1f} images/s -> "
          + ", ".join(str(out / p.name) for p in paths.values()))
    return 0


def _out_path(out):
    """``--out`` as a path: a URL as an :class:`etils.epath.Path`, a local folder made absolute."""
    from pmf_jax import storage

    return storage.user_path(out, absolute=True)


def _measure(args, cfg, mesh, chip, out: Path) -> int:
    """``--measure N`` on this process's devices, or, launched as a multi-process run (the trainer's launch
    variables: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or PMF_DISTRIBUTED=1), on every process's
    devices: each process runs its part of the sharded step, process 0 writes ``--out`` and prints."""
    import jax

    from pmf_jax.parallel import distributed
    from pmf_jax.scaling import planner, report

    if distributed.initialize_from_environment():
        distributed.check_same_run({"command": child_argv(args), "measure": args.measure}, what="command line")
    if args.devices is not None and args.devices != jax.device_count():
        raise PMFInputError(f"--measure runs on all {jax.device_count()} device(s) of this run; --devices "
                            f"{args.devices} differs (omit it)")
    result = planner.measure(cfg, config_name=args.config, mesh=mesh, chip=chip,
                             batch_per_device=args.batch_per_device, iterations=args.measure)
    result["processes"] = jax.process_count()
    if jax.process_index() != 0:
        return 0
    with staged_folder(out, args.overwrite) as stage:
        (stage / "measure.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        report.write_plot(result, stage / "scaling.png")
    m, pred = result["measured"], result["train_step"]["prediction"]
    on = f"{jax.process_count()} processes, " if jax.process_count() > 1 else ""
    print(f"measured on {on}{jax.device_count()} x {m['device_kind']} ({m['platform']}): "
          f"{m['step_s'] * 1e3:.2f} ms/step (median of {m['iterations']}), {m['images_per_s']:.2f} images/s")
    print(f"predicted for {chip.name}: {pred['step_s'] * 1e3:.2f} ms/step ({pred['limit']}-bound: compute "
          f"{pred['compute_s'] * 1e3:.2f} ms, memory {pred['memory_s'] * 1e3:.2f} ms, communication "
          f"{pred['communication_s'] * 1e3:.2f} ms); measured / predicted = {m['ratio']:.2f}")
    if m["platform"] == "cpu":
        print("note: measured on CPU devices; the prediction is for the chip, so the ratio says nothing about it")
    return 0
