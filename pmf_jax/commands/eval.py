"""``pmf eval generate``, ``pmf eval score`` and ``pmf eval compare``: retarget a dataset split's pairs, score the
images against the ground truth (SSIM, PSNR, LPIPS, FID, CLIP score), and put scored runs side by side. The work is
in :mod:`pmf_jax.evaluation`."""

from __future__ import annotations

import argparse
import json

from pmf_jax.commands import options
from pmf_jax.out_folder import add_out_arguments

METRICS = ("ssim", "psnr", "lpips", "fid", "clip_score")  # = pmf_jax.evaluation.METRICS (no JAX import here)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="generate a dataset split's pairs and score them",
                              description="Evaluation on a prepared TFDS pose-pair dataset "
                                          "(see data/<name>/README.md).")
    sub = p.add_subparsers(dest="eval_command", metavar="STEP", required=True)

    g = sub.add_parser(
        "generate", help="run the retarget pipeline over a split's pairs (resumable)",
        description="Writes <source>___<target>.png for every pair of the split into --out, skipping pairs already "
                    "there, and generation.json (the settings). The model is --model (a training run folder or a "
                    "PMF export) or the folders the config's model.* names; dataset, resolution, batch size and "
                    "sampling come from the config (pmf_jax/config.py): data.*, sampling.*, reference.* (a run's "
                    "own config.yaml; an export keeps its own mode and reference settings except the reference.* "
                    "keys given). The pipeline mode is an override: reference.mode=reference_only (Method 1; with "
                    "reference.method=attn+adain for AdaIN) or reference.mode=controlnet_only evaluates the model "
                    "as that baseline. A new generation is "
                    "written into OUT.partial and moved to --out when every image exists; a stopped run is "
                    "continued by the next one with the same settings, and so is a complete --out. Launched as a "
                    "multi-process run (the trainer's JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID or "
                    "PMF_DISTRIBUTED=1), every process makes its share of the images and process 0 commits --out, "
                    "which must be a URL (gs://...) or a filesystem every process sees.")
    g.add_argument("--model", metavar="EXPORT_OR_RUN",
                   help="a training run folder (RUN_DIR, its latest checkpoint; or RUN_DIR/checkpoints/STEP) or a "
                        "PMF export (pmf convert to-diffusers); default: the config's model.* folders")
    g.add_argument("--config", help="YAML config (default: a run's own config.yaml, else the schema's defaults)")
    g.add_argument("--split", help="split to generate (default: the config's data.eval_split)")
    add_out_arguments(g, "output folder of the images", rule="must be empty or absent, or a generation with the same "
                      "settings, unless --overwrite; staged in OUT.partial")
    g.add_argument("--prompt", default="", help="text prompt for every pair (default: empty; recorded for CLIP score)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--limit", type=options.positive_int,
                   help="only the first N pairs (recorded in generation.json: pmf eval score scores those)")
    g.add_argument("--sequence", action="store_true",
                   help="pairs of one source and the frames of one video (TikTok) are animated as clips, in frame "
                        "order (pmf animate's pipeline: one bank, one initial noise per clip); pmf eval score then "
                        "adds their temporal consistency")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    options.add_allow_pickle_arg(g)
    g.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. sampling.steps=50")
    options.use_compilation_cache(g)

    s = sub.add_parser(
        "score", help="score generated images against the ground truth",
        description="SSIM and PSNR (scikit-image's protocol settings), LPIPS (AlexNet), FID (Inception, against the "
                    "training images) and, for prompted runs, CLIP score. Metric weights are read from --weights-dir, "
                    "$PMF_METRIC_WEIGHTS or the torch hub cache, never downloaded: a metric without them is "
                    "reported unavailable with the reason; when none of the requested metrics can be computed, "
                    "the command fails (exit 2). Generated images must have the ground truth's size unless "
                    "--resize. Writes <out>.json and <out>.md (replacing them).")
    s.add_argument("--generated", required=True, help="folder of <source>___<target>.png images (pmf eval generate)")
    s.add_argument("--dataset", default="deepfashion_pairs/256x176", help="NAME[/CONFIG] (default: %(default)s)")
    s.add_argument("--data-dir", help="TFDS data_dir the dataset was built into (default: TFDS's)")
    s.add_argument("--split", default="test", help="(default: %(default)s)")
    s.add_argument("--fid-reference", default="train",
                   help="FID reference: a split (its distinct images) or an .npz of statistics (default: %(default)s)")
    s.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset (default: all)")
    s.add_argument("--weights-dir", help="folder with alexnet-owt-7be5be79.pth (LPIPS) and "
                                         "pt_inception-2015-12-05-6726825d.pth (FID)")
    s.add_argument("--clip-model", default="openai/clip-vit-base-patch16",
                   help="CLIP folder or repo id in the local Hugging Face cache (default: %(default)s)")
    s.add_argument("--prompt", help="prompt for CLIP score (default: the one in generation.json)")
    s.add_argument("--stats-cache", help="FID reference statistics cache (default: ~/.cache/pmf_jax/fid_stats)")
    s.add_argument("--batch-size", type=options.positive_int, default=16, help="(default: %(default)s)")
    s.add_argument("--ssim-sigma", type=float, default=1.5, help="SSIM Gaussian sigma (default: %(default)s; "
                                                                  "PCDMs' script used 1.2)")
    s.add_argument("--resize", action="store_true",
                   help="resize generated images of another size to the ground truth's (bicubic); default: an error, "
                        "as the protocol scores at the ground truth's size")
    s.add_argument("--out", help="report path without extension (default: <generated>/scores); <out>.json and "
                                 "<out>.md are replaced when the scores are complete")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser(
        "compare", help="put scored runs side by side: one table, one image grid",
        description="Reads each folder's scores.json (pmf eval score) and writes <out>.json and <out>.md (every "
                    "metric per run, the dataset's published rows beside them labelled as literature) and <out>.png "
                    "(the same pairs in every run: source | pose | run 1 | ... | ground truth). The runs must be of "
                    "one dataset and split; a mode is a pmf eval generate override (reference.mode=...).")
    c.add_argument("runs", nargs="+", metavar="RUN", help="scored pmf eval generate folders")
    c.add_argument("--labels", help="comma-separated names, one per RUN (default: the folder names)")
    c.add_argument("--out", required=True, help="report path without extension: <out>.json, <out>.md, <out>.png "
                                                "are replaced when complete")
    c.add_argument("--data-dir", help="TFDS data_dir of the runs' dataset, for the grid's sources, poses and ground "
                                      "truth (default: TFDS's)")
    c.add_argument("--pairs", type=options.positive_int, default=8, help="pairs in the grid (default: %(default)s)")
    return p


def run(args) -> int:
    return {"generate": _generate, "score": _score, "compare": _compare}[args.eval_command](args)


def _compare(args) -> int:
    from pmf_jax.evaluation.compare import compare, output_paths, write_comparison
    from pmf_jax.out_folder import check_out_file

    for path in output_paths(args.out):  # before anything is read: a folder in the way, a read-only location
        check_out_file(path)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    comparison = compare(args.runs, labels)
    written = write_comparison(comparison, args.out, data_dir=args.data_dir, pairs=args.pairs)
    for run in comparison["runs"]:
        values = ", ".join(f"{k} {v:.4f}" for k, v in run["metrics"].items() if v is not None)
        print(f"{run['label']} ({run['mode']}): {values}")
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _generate(args) -> int:
    from pmf_jax.evaluation import generate
    from pmf_jax.evaluation.model import eval_config, resolve_model
    from pmf_jax.parallel import distributed

    if distributed.initialize_from_environment():  # launched as a multi-process run (the trainer's variables)
        command = {k: v for k, v in vars(args).items() if k not in ("func", "no_progress")}
        distributed.check_same_run(json.loads(json.dumps(command, default=str)), what="command line")
    model = resolve_model(args.model).with_overrides(args.overrides)
    cfg = eval_config(model, args.config, args.overrides)
    summary = generate(cfg, args.out, split=args.split, prompt=args.prompt, negative_prompt=args.negative_prompt,
                       model=model, limit=args.limit, progress=not args.no_progress, allow_pickle=args.allow_pickle,
                       overwrite=args.overwrite, sequence=args.sequence)
    import jax

    if jax.process_index() == 0:
        processes = f", by {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(f"{summary.out_dir}: {summary.generated} images generated{processes}, {summary.skipped} already there "
              f"({summary.total} pairs)")
    return 0


def _score(args) -> int:
    from pmf_jax.errors import PMFInputError
    from pmf_jax.evaluation import parse_dataset, score, write_report
    from pmf_jax.evaluation.report import COLUMNS, format_value, report_paths
    from pmf_jax.out_folder import check_out_file

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise PMFInputError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    name, config = parse_dataset(args.dataset)
    from pmf_jax import storage

    generated = storage.user_path(args.generated)
    out = args.out or generated / "scores"  # a URL's report is uploaded beside its images
    for path in report_paths(out):  # before anything is scored: a folder in the way, a read-only location
        check_out_file(path)
    results = score(args.generated, name, config, args.data_dir, split=args.split, fid_reference=args.fid_reference,
                    weights_dir=args.weights_dir, clip_model=args.clip_model, prompt=args.prompt, metrics=metrics,
                    stats_cache=args.stats_cache, batch_size=args.batch_size, ssim_sigma=args.ssim_sigma,
                    resize=args.resize, progress=not args.no_progress)
    json_path, md_path = write_report(results, out)
    for key, title, fmt in COLUMNS:
        entry = results["metrics"].get(key)
        if entry is not None:
            text = format_value(entry["value"], fmt) if entry["available"] else f"unavailable ({entry['reason']})"
            print(f"{title.rstrip(' ↑↓')}: {text}")
    print(f"wrote {json_path} and {md_path}")
    return 0
