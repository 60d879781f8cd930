"""The score report: a JSON file and a Markdown table with published numbers beside ours for context."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

# Published DeepFashion 256x176 results (the papers' main comparison tables; "—" where a paper gives no number).
PUBLISHED: Dict[str, List[Dict]] = {
    "deepfashion_pairs/256x176": [
        {"method": "PIDM", "ref": "Bhunia et al., Person Image Synthesis via Denoising Diffusion Model, CVPR 2023",
         "ssim": 0.7312, "lpips": 0.1678, "fid": 6.3671},
        {"method": "CFLD", "ref": "Lu et al., Coarse-to-Fine Latent Diffusion for Pose-Guided Person Image "
                                  "Synthesis, CVPR 2024",
         "ssim": 0.7378, "lpips": 0.1519, "fid": 6.804},
        {"method": "PCDMs", "ref": "Shen et al., Advancing Pose-Guided Image Synthesis with Progressive Conditional "
                                   "Diffusion Models, ICLR 2024",
         "ssim": 0.7357, "lpips": 0.1426, "fid": 7.128},
    ],
}
PROTOCOL_PAIRS = {"deepfashion_pairs/256x176": 8570}  # PATN's test pairs

# (key, column title, format)
COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("lpips", "LPIPS ↓", "{:.4f}"),
    ("fid", "FID ↓", "{:.3f}"),
    ("clip_score", "CLIP score ↑", "{:.2f}"),
)


def format_value(value, fmt: str) -> str:
    """A table cell: ``fmt`` for numbers, "—" for None, strings ("inf") as they are."""
    if value is None:
        return "—"
    if isinstance(value, str) or not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def markdown(results: Dict, label: str = "PMF (this run)") -> str:
    """The Markdown report of :func:`pmf_jax.evaluation.score.score`'s results."""
    dataset, metrics = results["dataset"], results["metrics"]
    lines = [f"# Evaluation: {dataset}, {results['split']} split ({results['num_pairs']} pairs)", "",
             f"Generated images: `{results['generated']}`; ground truth and references at "
             f"{results['image_size'][0]}x{results['image_size'][1]}.", ""]
    header = "| Method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines += [header, "| --- |" + " ---: |" * len(COLUMNS)]
    published = PUBLISHED.get(dataset, [])
    for i, row in enumerate(published, start=1):
        cells = " | ".join(format_value(row.get(k), "{}") for k, _, _ in COLUMNS)  # as the papers print them
        lines.append(f"| {row['method']} [{i}] | {cells} |")
    notes, ours = [], []
    for key, _, fmt in COLUMNS:
        entry = metrics.get(key)
        if entry is None:
            ours.append("not run")
        elif entry["available"]:
            ours.append(f"**{format_value(entry['value'], fmt)}**")
        else:
            notes.append(f"{key}: {entry['reason']}")
            ours.append(f"n/a ({len(notes)})")
    lines += [f"| {label} | " + " | ".join(ours) + " |", ""]
    if published:
        refs = "; ".join(f"[{i}] {row['method']}: {row['ref']}" for i, row in enumerate(published, start=1))
        lines += [f"Table: {dataset} test pairs. Published numbers as reported in the papers' DeepFashion 256x176 "
                  f"tables — {refs}. Their SSIM (scikit-image, Gaussian window σ=1.5, data range of the generated "
                  "image), LPIPS (AlexNet) and FID (Inception pool3 against the training images) follow the same "
                  "protocol as ours; their ground-truth files and resizing may differ slightly. \"—\": not reported.",
                  ""]
        expected = PROTOCOL_PAIRS.get(dataset)
        if expected and results["num_pairs"] != expected:
            lines += [f"**Note:** {results['num_pairs']} pairs were scored, not the protocol's {expected}: our numbers "
                      "are not comparable with the published ones.", ""]
    if notes:
        lines += ["Not computed:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, start=1)] + [""]
    temporal = results.get("temporal_consistency") or {}
    if temporal.get("available"):
        lines += [f"Temporal consistency (clips: {temporal['n']} consecutive frame pairs): mean |frame t+1 − frame t| "
                  f"{temporal['value']:.2f} (uint8 scale), ground truth {temporal['ground_truth']:.2f}, ratio "
                  f"{format_value(temporal['ratio'], '{:.2f}')} (above 1: flickers more than the ground truth).", ""]
    fid = metrics.get("fid", {})
    if fid.get("available"):
        lines += [f"FID: {fid['n']} generated images vs {fid['reference']} ({fid['features']}).", ""]
    lines += ["Protocol: " + "; ".join(f"{k}: {v}" for k, v in results.get("protocol", {}).items()) + ".", ""]
    return "\n".join(lines)


def report_paths(out_prefix) -> Tuple[Path, Path]:
    """``(<out_prefix>.json, <out_prefix>.md)``; a URL prefix gives URLs (:class:`etils.epath.Path`)."""
    from pmf_jax import storage

    out_prefix = storage.user_path(out_prefix)
    return out_prefix.with_name(out_prefix.name + ".json"), out_prefix.with_name(out_prefix.name + ".md")


def write_report(results: Dict, out_prefix) -> Tuple[Path, Path]:
    """Writes ``<out_prefix>.json`` (everything, per-pair values included) and ``<out_prefix>.md``, each whole or not
    at all (:func:`pmf_jax.out_folder.staged_file`; existing files are replaced). ``out_prefix`` may be a URL: each
    file is written locally and uploaded as one object."""
    from pmf_jax.out_folder import staged_file

    json_path, md_path = report_paths(out_prefix)
    with staged_file(json_path) as json_tmp, staged_file(md_path) as md_tmp:
        json_tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        md_tmp.write_text(markdown(results))
    return json_path, md_path
