"""The report of one bench: its rows grouped by case, speedups against our row, the printed table and the JSON."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from typing import Any, Dict, List, Optional, Sequence

from common import OURS, SPEEDUP, Env, Runner, Timing, log

@dataclasses.dataclass
class Row:
    case: str
    impl: str
    status: str = "ok"                 # "ok" | "skipped" | "failed"
    ms: Optional[float] = None         # median
    p10_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    iters: int = 0
    flops: Optional[float] = None      # per call; a peer's is our count for the same work
    tflops_per_s: Optional[float] = None
    peak_bytes: Optional[int] = None
    peak_source: str = ""
    speedup: Optional[float] = None    # peer_ms / our_ms; 1.0 on our own row
    note: str = ""


IMPL_ORDER = (OURS, "torch eager", "torch.compile")


class Report:
    """The rows of one bench, grouped by case (in the order cases are declared), ours first in each."""

    def __init__(self, bench: str, env: "Env", cases: Sequence[str], settings: Dict[str, Any]):
        self.bench, self.env, self.cases, self.settings = bench, env, list(cases), settings
        self.rows: List[Row] = []

    def add(self, runner: Runner, timing: Timing, peak_after: Optional[int] = None) -> Row:
        row = Row(runner.case, runner.impl, ms=timing.median, p10_ms=timing.percentile(0.1),
                  p90_ms=timing.percentile(0.9), iters=len(timing.times_ms), flops=runner.flops,
                  peak_bytes=peak_after if peak_after is not None else runner.peak_bytes,
                  peak_source=runner.peak_source, note=runner.note)
        self.rows.append(row)
        log(f"[{row.case}] {row.impl}: {row.ms:.2f} ms")
        return row

    def skip(self, case: str, impl: str, reason: str) -> None:
        self.rows.append(Row(case, impl, status="skipped", note=reason))

    def fail(self, case: str, impl: str, err: BaseException) -> None:
        text = str(err).strip().splitlines()
        self.rows.append(Row(case, impl, status="failed",
                             note=f"{type(err).__name__}: {text[0][:160] if text else ''}"))
        log(f"[{case}] {impl} failed: {type(err).__name__}: {err}")

    def _finalize(self) -> None:
        """Speedups against our row of each case, the peers' FLOPs from ours, TFLOP/s; rows in display order."""
        ours = {r.case: r for r in self.rows if r.impl == OURS and r.status == "ok"}
        for r in self.rows:
            if r.status != "ok":
                continue
            if r.flops is None and r.case in ours:
                r.flops = ours[r.case].flops
            if r.flops:
                r.tflops_per_s = r.flops / (r.ms * 1e-3) / 1e12
            if r.case in ours:
                r.speedup = 1.0 if r.impl == OURS else r.ms / ours[r.case].ms
        order = lambda r: (self.cases.index(r.case) if r.case in self.cases else len(self.cases),  # noqa: E731
                           IMPL_ORDER.index(r.impl) if r.impl in IMPL_ORDER else len(IMPL_ORDER))
        self.rows.sort(key=order)

    # -- output
    def table(self) -> str:
        header = ("case", "impl", "median ms", "p10-p90 ms", "GFLOP", "TFLOP/s", "peak GiB", "speedup", "note")
        lines = []
        for r in self.rows:
            if r.status != "ok":
                lines.append((r.case, r.impl, r.status, "", "", "", "", "", r.note))
                continue
            lines.append((r.case, r.impl, f"{r.ms:.2f}", f"{r.p10_ms:.2f}-{r.p90_ms:.2f}",
                          f"{r.flops / 1e9:.2f}" if r.flops else "-",
                          f"{r.tflops_per_s:.3f}" if r.tflops_per_s else "-",
                          f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes else "-",
                          f"{r.speedup:.2f}x" if r.speedup else "-", r.note))
        widths = [max(len(str(x[i])) for x in [header] + lines) for i in range(len(header))]
        fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in lines])

    def summary(self) -> Dict[str, Any]:
        import diffusers
        import flax
        import jax
        import torch

        args = self.env.args
        return {
            "bench": self.bench, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "mode": "tiny" if args.tiny else "full", "dtype": self.env.dtype, "attention_backend": args.backend,
            "iters": args.iters, "warmup": args.warmup, "cpu_threads": args.cpu_threads or "library defaults",
            "timing_order": "interleaved" if args.order == "interleaved" else "sequential: peers first, then ours",
            "torch_compile": self.env.compile or self.env.compile_skip_reason,
            "speedup_definition": SPEEDUP, "settings": self.settings,
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                         "torch": torch.__version__, "diffusers": diffusers.__version__},
            "device": self.env.describe(),
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def finish(self) -> Dict[str, Any]:
        """Prints the table (stdout) and writes the JSON file when ``--json`` was given."""
        self._finalize()
        data = self.summary()
        dev, versions = data["device"], data["versions"]
        print(f"\n## {self.bench} — {data['mode']} mode, {self.env.dtype}, {dev['jax_device']} (torch "
              f"{dev['torch_device']}), jax {versions['jax']}, torch {versions['torch']}, diffusers "
              f"{versions['diffusers']}, host load {dev['load_average_1m']}")
        print(f"settings: {json.dumps(self.settings)}")
        print(self.table())
        print(f"{SPEEDUP}; medians of {self.env.args.iters} timed calls ({data['timing_order']}) after warm-up; "
              f"peak: ours = arguments + outputs + temporaries − donated (XLA memory_analysis) or the device "
              f"allocator's peak, torch = torch.cuda.max_memory_allocated; '-' = not available on this device")
        if self.env.args.json:
            self.env.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.env.args.json.write_text(json.dumps(data, indent=2) + "\n")
            print(f"wrote {self.env.args.json}")
        return data


def skip_compile_rows(report: "Report", env: Env, cases: Sequence[str]) -> None:
    for case in cases:
        report.skip(case, "torch.compile", env.compile_skip_reason)
