"""What ``pmf scaling`` reports about a compiled program, and the Markdown / JSON it writes.

:func:`program_report` turns one :class:`~pmf_jax.scaling.compile.CompiledProgram` into plain numbers (per device):
memory (``compiled.memory_analysis()`` plus the state's bytes by kind from its shardings), FLOPs and HBM bytes
(``compiled.cost_analysis()``), every collective of the compiled HLO (:mod:`pmf_jax.scaling.collectives`) and the
roofline prediction (:mod:`pmf_jax.scaling.roofline`). :func:`render_markdown` lays a whole plan out as a report.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from pmf_jax.scaling.collectives import KINDS, array_bytes, parse_collectives, summarize
from pmf_jax.scaling.roofline import Chip, predict

CPU_NOTE = ("Compiled by XLA:CPU for virtual host devices: collectives, fusion and buffer assignment are what the "
            "CPU compiler chose and can differ on TPU/GPU. In particular XLA:CPU reduces FSDP gradients with "
            "all-reduce (+ slicing) where TPU uses reduce-scatter, and it computes bf16 convolutions and matmuls in "
            "f32 and fuses less, so its temporaries and HBM bytes (the memory term) overstate a TPU/GPU program's, "
            "up to ~2x. FLOPs and collective sizes do not depend on that.")


def cost_numbers(compiled) -> Dict[str, float]:
    """{"flops", "bytes_accessed", "transcendentals"} per device from ``compiled.cost_analysis()``."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


def memory_numbers(compiled, state_bytes: Dict[str, int]) -> Dict[str, int]:
    """Per-device bytes: the state by kind, and the compiler's arguments / outputs / aliased / temporaries; ``peak``
    = arguments + temporaries + outputs not aliased to (donated) arguments."""
    out = dict(state_bytes)
    stats = compiled.memory_analysis()
    if stats is None:
        return out
    out.update(arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
               aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes))
    out["peak"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out


def _key(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(sorted(d for d in shape if d != 1))


def array_class(text: str, param_pieces: Set[Tuple[int, ...]]) -> str:
    """"params" for a (piece of a) parameter or gradient, "scalars" for tiny arrays (losses, norms), else
    "activations". ``text``: an HLO array shape such as ``f32[3,3,320,320]``."""
    dims = tuple(int(d) for d in text[text.index("[") + 1:-1].split(",") if d.strip())
    if math.prod(dims) <= 16:
        return "scalars"
    return "params" if _key(dims) in param_pieces else "activations"


def classify(shapes: Iterable[str], param_pieces: Set[Tuple[int, ...]]) -> str:
    """The class of a collective: "activations" if any of its arrays is one, else "params" if any is, else
    "scalars"."""
    kinds = {array_class(text, param_pieces) for text in shapes}
    return next((k for k in ("activations", "params") if k in kinds), "scalars")


def bytes_by_class(c, param_pieces: Set[Tuple[int, ...]]) -> Dict[str, int]:
    """A collective's ``bytes`` (per execution) split over its arrays' classes (combined all-reduces carry
    gradients and activations in one tuple)."""
    sizes = collections.Counter()
    for text in c.shapes:
        sizes[array_class(text, param_pieces)] += array_bytes(text)[0]
    total = sum(sizes.values()) or 1
    return {k: int(round(c.bytes * v / total)) for k, v in sizes.items()}


def program_report(prog, chip: Chip, param_pieces: Optional[Set[Tuple[int, ...]]] = None) -> Dict[str, Any]:
    """One compiled program → {"name", "devices", "mesh", "global_batch", "batch_per_device", "repeats",
    "compile_s", "memory", "cost", "collectives" (per kind), "collective_groups" (identical collectives merged),
    "prediction"}."""
    pieces = {_key(s) for s in (param_pieces or ())}
    found = parse_collectives(prog.hlo_text, prog.devices)
    groups: Dict[tuple, Dict[str, Any]] = collections.OrderedDict()
    for c in found:
        key = (c.kind, c.shapes, c.group_size, c.repeats)
        row = groups.setdefault(key, {"kind": c.kind, "shapes": list(c.shapes[:4]) + (["..."] if len(c.shapes) > 4
                                                                                       else []),
                                      "arrays": len(c.shapes), "group_size": c.group_size, "instructions": 0,
                                      "count": 0, "bytes": 0, "wire_bytes": 0.0,
                                      "what": classify(c.shapes, pieces) if pieces else "unknown"})
        row["instructions"] += 1
        row["count"] += c.repeats
        row["bytes"] += c.bytes * c.repeats
        row["wire_bytes"] += c.wire_bytes * c.repeats
    cost = cost_numbers(prog.compiled)
    prediction = predict(cost["flops"], cost["bytes_accessed"],
                         [{"wire_bytes": c.wire_bytes, "repeats": c.repeats, "groups": c.groups} for c in found], chip)
    per_kind = summarize(found)
    by_what: Dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
    if pieces:
        for c in found:
            by_what[c.kind].update({k: v * c.repeats for k, v in bytes_by_class(c, pieces).items()})
    for kind in KINDS:
        per_kind[kind]["by_what"] = dict(by_what[kind])
    return {"name": prog.name, "devices": prog.devices, "mesh": prog.mesh_shape, "global_batch": prog.global_batch,
            "batch_per_device": prog.batch_per_device, "repeats": prog.repeats,
            "lower_s": round(prog.lower_s, 2), "compile_s": round(prog.compile_s, 2),
            "memory": memory_numbers(prog.compiled, prog.state_bytes), "cost": cost, "collectives": per_kind,
            "collective_groups": sorted(groups.values(), key=lambda g: -g["bytes"]),
            "prediction": prediction.as_dict()}


# ------------------------------------------------------------------------------------------------ rendering

def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def _mesh_text(mesh: Dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


MEMORY_ROWS = (("params", "trained params (fp32 master)"), ("inference_params", "parameters (replicated)"),
               ("opt_state", "optimizer state"), ("ema", "EMA params"),
               ("frozen_params", "frozen UNet-like params"), ("frozen_other", "autoencoder + text context"),
               ("arguments", "all arguments (incl. batch)"), ("temporaries", "temporaries (activations, grads)"),
               ("outputs", "outputs"), ("aliased", "outputs aliased to donated arguments"),
               ("peak", "peak = arguments + temporaries + unaliased outputs"))


def _program_section(title: str, prog: Dict[str, Any], chip: Dict[str, Any], unit: str) -> List[str]:
    mem, cost, pred = prog["memory"], prog["cost"], prog["prediction"]
    lines = [f"## {title}", "",
             f"Mesh {_mesh_text(prog['mesh'])} ({prog['devices']} devices), global batch {prog['global_batch']} "
             f"({prog['batch_per_device']} per device); lowered in {prog['lower_s']:.1f} s, compiled in "
             f"{prog['compile_s']:.1f} s.", "", "Per-device memory:", ""]
    rows = [[label, fmt_bytes(mem[k])] for k, label in MEMORY_ROWS if k in mem]
    lines += _table(["what", "bytes per device"], rows)
    if "peak" in mem:
        fits = "fits" if mem["peak"] <= chip["hbm_bytes"] else "does NOT fit"
        lines += ["", f"Peak {fmt_bytes(mem['peak'])} vs {fmt_bytes(chip['hbm_bytes'])} HBM of a {chip['name']}: "
                      f"{fits} (CPU buffer assignment; see the note above)."]
    lines += ["", f"Collectives per {unit} (bytes = the unsharded size of the data, per device; wire = bytes one "
                  f"device sends with ring algorithms):", ""]
    rows = [[k, v["count"], fmt_bytes(v["bytes"]), fmt_bytes(v["wire_bytes"]),
             ", ".join(f"{w} {fmt_bytes(b)}" for w, b in sorted(v.get("by_what", {}).items())) or "-"]
            for k, v in prog["collectives"].items()]
    lines += _table(["collective", "count", "bytes", "wire bytes", "of what"], rows)
    top = prog["collective_groups"][:12]
    if top:
        lines += ["", "Largest collectives (identical instructions merged):", ""]
        def arrays(g):
            shown = " ".join(g["shapes"][:3])
            return " ".join(g["shapes"]) if g["arrays"] <= 4 else f"{g['arrays']} arrays: {shown} …"

        rows = [[g["kind"], g["count"], g["group_size"], g["what"], arrays(g), fmt_bytes(g["bytes"])] for g in top]
        lines += _table(["collective", "count", "group", "of what", "arrays", "bytes"], rows)
    lines += ["", f"FLOPs per {unit} per device: {fmt_flops(cost['flops'])}; HBM bytes accessed: "
                  f"{fmt_bytes(cost['bytes_accessed'])}.", "",
              f"Roofline on {chip['name']}: compute {fmt_seconds(pred['compute_s'])}, memory "
              f"{fmt_seconds(pred['memory_s'])}, communication {fmt_seconds(pred['communication_s'])} → "
              f"**{fmt_seconds(pred['step_s'])} per {unit}, {pred['limit']}-bound**."
              + (f" Without the memory term (if the chip's fused bf16 program is not HBM-bound): "
                 f"{fmt_seconds(max(pred['compute_s'], pred['communication_s']))}." if pred["limit"] == "memory"
                 else ""), ""]
    return lines


def render_markdown(plan: Dict[str, Any]) -> str:
    """The whole plan (see :func:`pmf_jax.scaling.planner.plan`) as a Markdown report."""
    chip, train = plan["chip"], plan["train_step"]
    lines = [f"# Scaling plan: {plan['config']}", "",
             f"{plan['devices']} devices, mesh {_mesh_text(plan['mesh'])}, {plan['batch_per_device']} images per "
             f"device (global batch {train['global_batch']}), chip {chip['name']} ({chip['peak_flops'] / 1e12:.0f} "
             f"TFLOP/s bf16, HBM {chip['hbm_bandwidth'] / 1e9:.0f} GB/s, link {chip['link_bandwidth'] / 1e9:.0f} "
             f"GB/s; {chip['source']}).", "",
             f"Compiled on {plan['platform']} with JAX {plan['jax']}; the whole plan took {plan['elapsed_s']:.0f} s.",
             "", f"> {plan['cpu_note']}" if plan.get("cpu_note") else "", ""]
    if plan.get("notes"):
        lines += ["Model parts (no weights read):", ""] + [f"- {n}" for n in plan["notes"]] + [""]
    params = plan.get("parameters", {})
    if params:
        rows = [[part, f"{p['count'] / 1e6:.1f} M", fmt_bytes(p["bytes"]), "yes" if p["trainable"] else "no"]
                for part, p in params.items()]
        lines += _table(["part", "parameters", "bytes", "trains"], rows) + [""]
    pred = train["prediction"]
    lines += [f"**Predicted train step: {fmt_seconds(pred['step_s'])} ({pred['limit']}-bound), "
              f"{train['global_batch'] / pred['step_s']:.1f} images/s on {plan['devices']} × {chip['name']}.**", ""]
    lines += _program_section("Train step", train, chip, "step")
    sampling = plan.get("sampling")
    if sampling:
        lines += _sampling_section(sampling, chip)
    if plan.get("sweep"):
        lines += _sweep_section(plan["sweep"], chip)
        if plan.get("plot"):
            lines += [f"![predicted images/s and weak-scaling efficiency vs devices]({plan['plot']})", ""]
    elif plan.get("plot"):
        lines += [f"![predicted compute, memory and communication time per program]({plan['plot']})", ""]
    if plan.get("measured"):
        m = plan["measured"]
        lines += ["## Measured", "", f"{m['iterations']} steps on {m['device_kind']}: {fmt_seconds(m['step_s'])} per "
                  f"step (median), predicted {fmt_seconds(pred['step_s'])} ({m['ratio']:.2f}× the prediction).", ""]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _sampling_section(sampling: Dict[str, Any], chip: Dict[str, Any]) -> List[str]:
    step = sampling["programs"]["sampling_step"]
    lines = [f"## Sampling ({sampling['scheduler']}, {sampling['steps']} steps, {sampling['rows']} guidance rows)", "",
             f"Retarget pipeline, data parallel over every device, parameters replicated: "
             f"{sampling['images']} images per call ({sampling['batch_per_device']} per device). Predicted "
             f"{fmt_seconds(sampling['call_s'])} per call = prologue + {sampling['steps']} × step + epilogue → "
             f"**{sampling['images_per_s']:.1f} images/s**.", ""]
    rows = [[name.replace("sampling_", ""), fmt_flops(p["cost"]["flops"]), fmt_bytes(p["memory"].get("peak", 0)),
             sum(v["count"] for v in p["collectives"].values()), fmt_seconds(p["prediction"]["step_s"]),
             p["prediction"]["limit"], f"{p['compile_s']:.1f} s"] for name, p in sampling["programs"].items()]
    lines += _table(["program", "FLOPs/device", "peak bytes/device", "collectives", "predicted", "limit",
                     "compile"], rows) + [""]
    lines += _program_section("Sampling step (one denoising step)", step, chip, "denoising step")[2:]
    return lines


def _sweep_section(sweep: List[Dict[str, Any]], chip: Dict[str, Any]) -> List[str]:
    lines = ["## Weak scaling", "",
             f"Fixed per-device batch; efficiency = per-device throughput relative to {sweep[0]['devices']} devices "
             f"(predicted, {chip['name']}).", ""]
    rows = [[p["devices"], _mesh_text(p["mesh"]), p["global_batch"], fmt_flops(p["flops"]),
             fmt_bytes(p["collective_bytes"]), fmt_seconds(p["step_s"]), p["limit"], f"{p['images_per_s']:.1f}",
             f"{100 * p['efficiency']:.1f}%", fmt_bytes(p["peak_bytes"]), f"{p['compile_s']:.0f} s"] for p in sweep]
    lines += _table(["devices", "mesh", "batch", "FLOPs/device", "collective bytes", "step", "limit", "images/s",
                     "efficiency", "peak/device", "compile"], rows)
    flagged = [p["devices"] for p in sweep if p.get("flag")]
    if flagged:
        lines += ["", f"Flagged: {', '.join(map(str, flagged))} devices — " + sweep[-1].get("flag", "")]
    return lines + [""]


def roofline_programs(plan: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any], Optional[float]]]:
    """(label, prediction, measured seconds or None) of the plan's programs, for
    :func:`pmf_jax.scaling.plot.plot_roofline`: the train step (measured after ``--measure``) and, when planned, one
    sampling step."""
    measured = (plan.get("measured") or {}).get("step_s")
    programs = [("train step", plan["train_step"]["prediction"], measured)]
    if plan.get("sampling"):
        programs.append(("sampling step", plan["sampling"]["programs"]["sampling_step"]["prediction"], None))
    return programs


def write_plot(plan: Dict[str, Any], path: Path) -> Path:
    """``scaling.png``: the weak-scaling sweep when the plan has one, else the roofline terms of its programs."""
    from pmf_jax.scaling.plot import plot_roofline, plot_sweep

    title = f"{plan['config']} on {plan['devices']} x {plan['chip']['name']} ({plan['batch_per_device']} images/device)"
    if plan.get("sweep"):
        return plot_sweep(plan["sweep"], path, title=title)
    return plot_roofline(roofline_programs(plan), path, title=title)


def write_outputs(plan: Dict[str, Any], out_dir: Path, *, plot: bool = True) -> Dict[str, Path]:
    """Writes ``scaling.json``, ``scaling.md`` and (``plot``) ``scaling.png`` (:func:`write_plot`) into
    ``out_dir`` (a local folder: ``pmf scaling`` writes its stage, uploaded afterwards for a URL ``--out``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "scaling.json", "markdown": out_dir / "scaling.md"}
    paths["json"].write_text(json.dumps(plan, indent=2, default=str) + "\n")
    if plot:
        paths["png"] = write_plot(plan, out_dir / "scaling.png")
        plan = dict(plan, plot=paths["png"].name)
    paths["markdown"].write_text(render_markdown(plan))
    return paths
