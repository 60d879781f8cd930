"""``pmf scaling`` as library calls: :func:`plan` (compile for a mesh and a sweep, predict) and :func:`measure` (run
the same step on real devices and compare).

A plan compiles, from shapes alone (:mod:`pmf_jax.scaling.abstract`), the real train step for the requested mesh
and, unless turned off, the retarget pipeline's sampling programs; then the train step once per sweep point, with
the mesh of each point from :func:`~pmf_jax.scaling.roofline.sweep_mesh` (tensor kept, fsdp kept where the devices
allow, data takes the rest) and the same per-device batch (weak scaling).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax

from pmf_jax.errors import PMFInputError
from pmf_jax.parallel import param_piece_shapes, resolve_mesh_shape
from pmf_jax.scaling.abstract import AbstractRun, abstract_run, tree_bytes, tree_count
from pmf_jax.scaling.compile import compile_sampling_step, compile_train_step, mesh_for
from pmf_jax.scaling.report import CPU_NOTE, program_report
from pmf_jax.scaling.roofline import Chip, sweep_mesh, weak_scaling

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_mesh(sizes: Dict[str, int], devices: int) -> Dict[str, int]:
    """{"data", "fsdp", "tensor"} for ``devices`` with a -1 filled in (PMFInputError when they do not multiply up)."""
    return dict(zip(("data", "fsdp", "tensor"), resolve_mesh_shape(sizes, devices)))


def parameter_table(run: AbstractRun) -> Dict[str, Dict[str, Any]]:
    return {part: {"count": tree_count(tree), "bytes": tree_bytes(tree), "trainable": part in run.components.trainable}
            for part, tree in run.all_params().items()}


def _chip_dict(chip: Chip) -> Dict[str, Any]:
    return dataclasses.asdict(chip)


def _sweep_point(report: Dict[str, Any], chip: Chip) -> Dict[str, Any]:
    pred, mem = report["prediction"], report["memory"]
    point = {"devices": report["devices"], "mesh": report["mesh"], "global_batch": report["global_batch"],
             "flops": report["cost"]["flops"], "bytes_accessed": report["cost"]["bytes_accessed"],
             "collective_bytes": sum(v["bytes"] for v in report["collectives"].values()),
             "collective_counts": {k: v["count"] for k, v in report["collectives"].items() if v["count"]},
             "compute_s": pred["compute_s"], "memory_s": pred["memory_s"],
             "communication_s": pred["communication_s"], "step_s": pred["step_s"], "limit": pred["limit"],
             "peak_bytes": mem.get("peak", 0), "compile_s": report["compile_s"] + report["lower_s"]}
    if chip.slow_bandwidth is None and report["devices"] > chip.domain:
        point["flag"] = (f"more than one {chip.name} pod ({chip.domain} chips): traffic between pods (data centre "
                         f"network) is not modelled; the ICI bandwidth is used")
    return point


def _train_report(run: AbstractRun, mesh_sizes: Dict[str, int], batch_per_device: int, chip: Chip,
                  log: Log, start: float) -> Dict[str, Any]:
    mesh = mesh_for(mesh_sizes)
    log(f"[{time.perf_counter() - start:6.0f} s] train step on {mesh.size} devices {mesh_sizes}: compiling")
    prog = compile_train_step(run, mesh, batch_per_device)
    report = program_report(prog, chip, param_piece_shapes(run.all_params(), mesh_sizes))
    log(f"[{time.perf_counter() - start:6.0f} s]   lowered in {prog.lower_s:.0f} s, compiled in "
        f"{prog.compile_s:.0f} s; predicted {report['prediction']['step_s'] * 1e3:.1f} ms/step "
        f"({report['prediction']['limit']})")
    return report


def sampling_report(run: AbstractRun, mesh_sizes: Dict[str, int], batch_per_device: int, chip: Chip,
                    log: Log = _stderr, start: Optional[float] = None) -> Dict[str, Any]:
    """The retarget pipeline's programs for the mesh's devices (parameters cast to the compute dtype, as the
    pipeline runs them on accelerators)."""
    start = time.perf_counter() if start is None else start
    mesh = mesh_for(mesh_sizes)
    dtype = jax.numpy.dtype(run.cfg.model.dtype)
    cast = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)  # noqa: E731
    inference = dataclasses.replace(run, state=run.state.replace(params=cast(run.state.params)),
                                    frozen_params=cast(run.frozen_params))
    log(f"[{time.perf_counter() - start:6.0f} s] sampling programs on {mesh.size} devices: compiling")
    programs = compile_sampling_step(inference, mesh, batch_per_device)
    pieces = param_piece_shapes(inference.all_params(), mesh_sizes)
    reports = {name: program_report(p, chip, pieces) for name, p in programs.items()}
    s = run.cfg.sampling
    rows = 3 if s.reference_guidance_scale is not None else 2
    seconds = {name: r["prediction"]["step_s"] for name, r in reports.items()}
    call_s = seconds["sampling_prologue"] + s.steps * seconds["sampling_step"] + seconds["sampling_epilogue"]
    images = reports["sampling_step"]["global_batch"]
    compile_s = sum(r["compile_s"] + r["lower_s"] for r in reports.values())
    log(f"[{time.perf_counter() - start:6.0f} s]   compiled in {compile_s:.0f} s; predicted {images / call_s:.1f} "
        f"images/s")
    return {"scheduler": s.scheduler, "steps": s.steps, "rows": rows, "images": images,
            "batch_per_device": batch_per_device, "call_s": call_s, "images_per_s": images / call_s,
            "programs": reports}


def plan(cfg, *, config_name: str, devices: int, mesh: Dict[str, int], chip: Chip, batch_per_device: int,
         sweep: Sequence[int] = (), sampling: bool = True, log: Log = _stderr,
         on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Compiles and predicts; returns the plan dict that :func:`~pmf_jax.scaling.report.render_markdown` renders.

    ``mesh``: sizes (one may be -1) for ``devices``; ``sweep``: device counts for the weak-scaling sweep.
    ``on_progress(plan_so_far)`` is called after each compiled point (e.g. to save partial results).
    """
    start = time.perf_counter()
    mesh = resolve_mesh(mesh, devices)
    if jax.device_count() < max([devices, *sweep]):
        raise PMFInputError(f"this process has {jax.device_count()} devices, the plan needs {max([devices, *sweep])}"
                            f" (run through `pmf scaling`, which starts itself with enough virtual CPU devices)")
    run = abstract_run(cfg)
    log(f"[{time.perf_counter() - start:6.0f} s] abstract model built ({', '.join(run.components.trainable)} train)")
    platform = jax.devices()[0].platform
    result: Dict[str, Any] = {
        "config": config_name, "devices": devices, "mesh": mesh, "batch_per_device": batch_per_device,
        "chip": _chip_dict(chip), "platform": f"{platform} ({jax.device_count()} devices)", "jax": jax.__version__,
        "cpu_note": CPU_NOTE if platform == "cpu" else "", "notes": list(run.notes),
        "parameters": parameter_table(run)}
    result["train_step"] = train = _train_report(run, mesh, batch_per_device, chip, log, start)
    result["elapsed_s"] = time.perf_counter() - start
    if on_progress:
        on_progress(result)
    if sampling and run.components.controlnet is not None:
        result["sampling"] = sampling_report(run, mesh, batch_per_device, chip, log, start)
    points = {devices: _sweep_point(train, chip)} if devices in sweep else {}
    for n in sorted(set(sweep) - set(points)):
        result["sweep"] = weak_scaling(list(points.values()))
        result["elapsed_s"] = time.perf_counter() - start
        if on_progress:
            on_progress(result)
        points[n] = _sweep_point(_train_report(run, sweep_mesh(mesh, n), batch_per_device, chip, log, start), chip)
    result["sweep"] = weak_scaling(list(points.values()))
    result["elapsed_s"] = time.perf_counter() - start
    log(f"[{result['elapsed_s']:6.0f} s] done")
    return result


def measure_program(prog, iterations: int, log: Log = _stderr) -> Dict[str, Any]:
    """Runs a compiled train step ``iterations`` times (after one warm-up call) on its devices, with the state,
    frozen parts and batch filled with zeros; returns {"iterations", "device_kind", "platform", "step_s" (median),
    "mean_s", "images_per_s"}."""
    args = prog.args
    shardings = jax.tree.map(lambda s: s.sharding, args)
    zeros = jax.jit(lambda: jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), args),
                    out_shardings=shardings)()
    state, rest = zeros[0], zeros[1:]
    times = []
    for i in range(iterations + 1):
        begin = time.perf_counter()
        state, metrics = prog.compiled(state, *rest)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - begin
        if i:
            times.append(elapsed)
        log(f"step {i}: {elapsed * 1e3:.1f} ms" + (" (warm-up)" if not i else ""))
    step_s = statistics.median(times)
    return {"iterations": iterations, "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform, "step_s": step_s, "mean_s": statistics.mean(times),
            "images_per_s": prog.global_batch / step_s}


def measure(cfg, *, config_name: str, mesh: Dict[str, int], chip: Chip, batch_per_device: int, iterations: int,
            log: Log = _stderr) -> Dict[str, Any]:
    """Compiles the train step for this process's devices, predicts it for ``chip`` and runs it ``iterations``
    times (:func:`measure_program`); returns {..., "train_step": report, "measured": {..., "ratio"}}."""
    devices = jax.device_count()
    mesh = resolve_mesh(mesh, devices)
    run = abstract_run(cfg)
    prog = compile_train_step(run, mesh_for(mesh), batch_per_device)
    report = program_report(prog, chip, param_piece_shapes(run.all_params(), mesh))
    measured = measure_program(prog, iterations, log)
    measured["ratio"] = measured["step_s"] / report["prediction"]["step_s"]
    return {"config": config_name, "devices": devices, "mesh": mesh, "batch_per_device": batch_per_device,
            "chip": _chip_dict(chip), "train_step": report, "measured": measured}
