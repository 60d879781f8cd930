"""Evaluation of pose retargeting on a dataset split: generate the test pairs' images, then score them.

    summary = generate(cfg, "outputs/eval/run1")                      # resumable; one PNG per pair
    results = score("outputs/eval/run1", "deepfashion_pairs", "256x176", data_dir)
    write_report(results, "outputs/eval/run1/scores")                 # scores.json + scores.md

``pmf eval generate`` / ``pmf eval score`` (pmf_jax/commands/eval.py) are thin wrappers around these.
"""

from pmf_jax.evaluation.generate import GenerationSummary, generate
from pmf_jax.evaluation.pairs import Pair, pair_filename, parse_dataset, read_pairs
from pmf_jax.evaluation.report import PUBLISHED, markdown, write_report
from pmf_jax.evaluation.score import METRICS, score

__all__ = ["GenerationSummary", "METRICS", "PUBLISHED", "Pair", "generate", "markdown",
           "pair_filename", "parse_dataset", "read_pairs", "score", "write_report"]
