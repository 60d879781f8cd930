"""``pmf eval compare``: several scored ``pmf eval generate`` folders side by side — one table, one image grid.

    comparison = compare(["outputs/eval/acm", "outputs/eval/reference_only", "outputs/eval/controlnet_only"])
    write_comparison(comparison, "outputs/eval/compare", data_dir=...)   # compare.json, compare.md, compare.png

Each folder must hold ``scores.json`` (``pmf eval score``); the numbers are copied from there, never recomputed, so the
table equals each run's own report. All runs must be of the same dataset and split. The published rows of that
dataset (:data:`pmf_jax.evaluation.report.PUBLISHED`) are kept beside ours, labelled as literature. The grid shows the
same K pairs in every run: source | target pose | run A | run B | ... | ground truth (uint8 [K·H, (n + 3)·W, 3]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.evaluation.report import COLUMNS, PUBLISHED, format_value

SCORES_FILE = "scores.json"


def _read_scores(folder: Path) -> Dict:
    path = folder / SCORES_FILE
    if not folder.is_dir():
        raise PMFInputError(f"{str(folder)!r} is not a folder (give pmf eval generate output folders)")
    if not path.is_file():
        raise PMFInputError(f"{str(folder)!r} has no {SCORES_FILE}: score it first (pmf eval score --generated "
                            f"{folder})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PMFInputError(f"{path}: not a readable scores file ({err})") from None


def describe_mode(generation: Optional[Dict]) -> str:
    """The pipeline mode a generation ran in (``acm``, ``reference_only`` + its method, ``controlnet_only``), from
    its ``generation.json`` settings; "?" when unknown."""
    reference = (generation or {}).get("reference") or {}
    mode = reference.get("mode", "?")
    method = reference.get("method", "attn")
    return f"{mode} ({method})" if mode in ("acm", "reference_only") and method != "attn" else mode


def compare(folders: Sequence, labels: Optional[Sequence[str]] = None) -> Dict:
    """The comparison of the scored ``folders``: ``{"dataset", "split", "runs": [{"label", "folder", "mode",
    "num_pairs", "metrics": {key: value or None}, "unavailable": {key: reason}}], "literature": [...]}``.

    labels: one per folder (default: each folder's name). Raises PMFInputError for a folder without scores, runs of
    different datasets or splits, or a label count that does not match."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise PMFInputError("give at least one scored pmf eval generate folder")
    if labels is not None and len(labels) != len(folders):
        raise PMFInputError(f"--labels has {len(labels)} names for {len(folders)} folders")
    labels = list(labels) if labels is not None else [f.name for f in folders]
    if len(set(labels)) != len(labels):
        raise PMFInputError(f"run labels must differ (got {labels}); name them with --labels")
    runs = []
    for folder, label in zip(folders, labels):
        scores = _read_scores(folder)
        metrics = scores.get("metrics") or {}
        runs.append({
            "label": label, "folder": str(folder), "mode": describe_mode(scores.get("generation")),
            "dataset": scores.get("dataset"), "split": scores.get("split"), "num_pairs": scores.get("num_pairs"),
            "resolution": (scores.get("generation") or {}).get("resolution") or scores.get("image_size"),
            "metrics": {k: (metrics[k]["value"] if metrics.get(k, {}).get("available") else None) for k, _, _ in COLUMNS},
            "unavailable": {k: metrics[k].get("reason", "") for k, _, _ in COLUMNS
                            if k in metrics and not metrics[k].get("available")},
        })
    for key in ("dataset", "split"):
        values = {r[key] for r in runs}
        if len(values) > 1:
            found = ", ".join(f"{r['label']}: {r[key]}" for r in runs)
            raise PMFInputError(f"the runs were scored on different {key}s ({found}); compare runs of one {key}")
    dataset = runs[0]["dataset"]
    return {"dataset": dataset, "split": runs[0]["split"], "runs": runs,
            "literature": [dict(row, label=f"{row['method']} (literature)") for row in PUBLISHED.get(dataset, [])]}


def markdown(comparison: Dict, grid_name: Optional[str] = None) -> str:
    """One Markdown table: every metric per run (our rows from each ``scores.json``), then the literature rows."""
    lines = [f"# Comparison: {comparison['dataset']}, {comparison['split']} split", "",
             "| Run | Mode | Pairs | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(COLUMNS)]
    for run in comparison["runs"]:
        cells = " | ".join(format_value(run["metrics"][k], fmt) if k not in run["unavailable"] else "n/a"
                           for k, _, fmt in COLUMNS)
        lines.append(f"| {run['label']} | {run['mode']} | {run['num_pairs']} | {cells} |")
    for row in comparison["literature"]:
        cells = " | ".join(format_value(row.get(k), "{}") for k, _, _ in COLUMNS)
        lines.append(f"| {row['label']} | published | — | {cells} |")
    lines.append("")
    if comparison["literature"]:
        refs = "; ".join(f"{row['method']}: {row['ref']}" for row in comparison["literature"])
        lines += [f"Literature rows: the papers' own numbers on the full protocol ({refs}); they are context, not "
                  "runs of this tool, and are comparable only on the same pairs and protocol.", ""]
    reasons = sorted({f"{k}: {why}" for run in comparison["runs"] for k, why in run["unavailable"].items()})
    if reasons:
        lines += ["n/a: not computed —", ""] + [f"- {r}" for r in reasons] + [""]
    lines += ["Runs: " + "; ".join(f"{r['label']} = `{r['folder']}`" for r in comparison["runs"]) + ".", ""]
    if grid_name:
        names = " | ".join(["source", "target pose"] + [r["label"] for r in comparison["runs"]] + ["ground truth"])
        lines += [f"![the same pairs in every run]({grid_name})", "", f"Columns: {names}.", ""]
    return "\n".join(lines)


def grid(comparison: Dict, data_dir=None, pairs: int = 8) -> np.ndarray:
    """uint8 [K·H, (n + 3)·W, 3]: the first ``pairs`` pairs (split order) generated by every run, as source | pose |
    run 1..n | ground truth. Sources, poses and ground truth are read from the dataset as ``pmf eval generate``
    prepared them."""
    from PIL import Image

    from pmf_jax.evaluation.pairs import image_source, parse_dataset, read_pairs
    from pmf_jax.input_pipeline import prepare_pair

    name, config = parse_dataset(comparison["dataset"])
    split = comparison["split"]
    runs = comparison["runs"]
    common = [p for p in read_pairs(name, config, split, data_dir)
              if all((Path(r["folder"]) / p.filename).is_file() for r in runs)]
    if not common:
        raise PMFInputError("the runs have no generated pair in common")
    chosen = list({p.filename: p for p in reversed(common)}.values())[::-1][:pairs]
    size = tuple(runs[0]["resolution"])
    source = image_source(name, config, split, data_dir)
    to_u8 = lambda x, low: np.round((x - low) / (1.0 - low) * 255).astype(np.uint8)  # noqa: E731
    rows = []
    for pair in chosen:
        example = prepare_pair(source[pair.index], size, None)
        cells = [to_u8(example["source"], -1.0), to_u8(example["pose"], 0.0)]
        for run in runs:
            image = Image.open(Path(run["folder"]) / pair.filename).convert("RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BICUBIC)
            cells.append(np.asarray(image))
        cells.append(to_u8(example["target"], -1.0))
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def output_paths(out_prefix) -> List[Path]:
    """``<out>.json``, ``<out>.md``, ``<out>.png`` (URLs for a URL ``out_prefix``: uploaded when complete)."""
    from pmf_jax import storage

    out_prefix = storage.user_path(out_prefix)
    return [out_prefix.with_name(out_prefix.name + ext) for ext in (".json", ".md", ".png")]


def write_comparison(comparison: Dict, out_prefix, data_dir=None, pairs: int = 8) -> List[Path]:
    """Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (:func:`grid`), each whole or not at all."""
    from PIL import Image

    from pmf_jax.out_folder import staged_file

    json_path, md_path, png_path = output_paths(out_prefix)
    image = grid(comparison, data_dir, pairs)
    with staged_file(json_path) as j, staged_file(md_path) as m, staged_file(png_path) as p:
        j.write_text(json.dumps(comparison, indent=2, allow_nan=False) + "\n")
        m.write_text(markdown(comparison, png_path.name))
        Image.fromarray(image).save(p, format="PNG")
    return [json_path, md_path, png_path]
