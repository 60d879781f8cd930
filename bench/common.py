"""What the three benchmarks share: command-line options and devices, device-synchronised timing of runners (ours
and the peers), FLOP and memory counts, and the report (table + JSON).

Timing rule (every row): ``warmup`` untimed calls first (compilation, autotuning, CUDA-graph capture), then ``iters``
(>= 20) calls, each timed alone between device synchronisations (``jax.block_until_ready`` /
``torch.cuda.synchronize``); the table shows the median and the 10th-90th percentiles.

Order: on the CPU every implementation is built first and the timed calls are interleaved (ours, peer, peer, ours,
...), so that a shared host's load drifts over all rows alike. On the GPU the peers run first, one at a time, and
torch's cached memory is released before ours runs (JAX's allocator keeps what it has used, torch's can give it back).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import models

MIN_ITERS = 20
_START = time.perf_counter()
SPEEDUP = "speedup = peer_ms / our_ms (> 1: pmf_jax is faster)"
OURS = "pmf_jax"

# ------------------------------------------------------------------------------------------------- options, devices

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, float32 (the CI smoke mode; ratios only)")
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "cudnn"),
                   help="pmf_jax attention backend (default auto: cuDNN flash on GPU for long sequences)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="compute dtype of both sides (default: bfloat16, float32 with --tiny)")
    p.add_argument("--iters", type=int, default=MIN_ITERS, help=f"timed calls per row (>= {MIN_ITERS})")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (>= 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile(mode='reduce-overhead') (default: on GPU yes, on CPU no)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU threads for each side (XLA intra-op and torch); 0 = the libraries' defaults "
                        "(default: 1 with --tiny, else 0). One thread each keeps CPU ratios meaningful on a shared "
                        "2-vCPU box, where torch's OpenMP threads collapse under oversubscription")
    p.add_argument("--order", default="auto", choices=("auto", "interleaved", "sequential"),
                   help="auto: interleaved on CPU; sequential (peers first, torch memory released, then ours) on GPU")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file too")
    return p


@dataclasses.dataclass
class Env:
    """The device both sides run on, and the run's settings."""

    args: argparse.Namespace
    platform: str             # jax platform: "cpu" | "gpu"
    torch_device: Any         # torch.device on the same hardware
    dtype: str                # compute dtype name, both sides
    compile: bool             # time torch.compile too
    compile_skip_reason: str  # why not, when compile is False
    cfg: Dict[str, Any]       # model_configs(...)

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    def jnp_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> Dict[str, Any]:
        import jax
        import torch

        dev = jax.devices()[0]
        info = {"jax_device": f"{dev.platform}:{dev.device_kind}", "jax_device_count": jax.device_count(),
                "torch_device": str(self.torch_device), "host": platform.node(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                # other processes on the host skew CPU timings (torch's OpenMP threads most): recorded with each run
                "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
        if self.torch_device.type == "cuda":
            info["torch_device_name"] = torch.cuda.get_device_name(self.torch_device)
        return info


def setup(args: argparse.Namespace) -> Env:
    """Picks the device (the same one for JAX and torch), the dtype and whether torch.compile runs.

    Must run before anything imports jax: ``--tiny`` pins JAX to the CPU.
    """
    if args.iters < MIN_ITERS:
        raise SystemExit(f"--iters {args.iters}: medians are taken over at least {MIN_ITERS} calls")
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first call compiles)")
    if args.tiny:
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX and torch share the GPU in one process: JAX must not grab 75% of it up front (its allocator still keeps
    # and reuses what it has used, so our timings are unaffected).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    threads = args.cpu_threads if args.cpu_threads is not None else (1 if args.tiny else 0)
    if threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={threads}").strip()
    import jax
    import torch

    if threads:
        torch.set_num_threads(threads)
    args.cpu_threads = threads
    # ref UNet, ControlNet and UNet share diffusers' forward code object, so their compiled variants share one dynamo
    # cache: room for all of them (past the limit dynamo would silently run eager)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    plat = jax.default_backend()
    if plat == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("JAX runs on the GPU but torch sees no CUDA device: the peer must run on the same device")
        device = torch.device("cuda", 0)
    elif plat == "cpu":
        device = torch.device("cpu")
    else:
        raise SystemExit(f"JAX runs on {plat}; the torch peer cannot run there (use a GPU, or --tiny for the CPU)")
    if args.backend == "cudnn" and plat != "gpu":
        raise SystemExit("--backend cudnn needs a GPU")
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    compile_on = args.compile if args.compile is not None else plat == "gpu"
    reason = "" if compile_on else ("--no-compile" if args.compile is False else
                                    "skipped on CPU (slow to compile; pass --compile to include it)")
    cfg = models.model_configs(args.tiny)
    if not args.tiny and plat == "cpu":
        print("warning: full SD1.5 shapes on the CPU will be very slow; use --tiny for the CPU smoke mode",
              file=sys.stderr)
    return Env(args, plat, device, dtype, compile_on, reason, cfg)


# ---------------------------------------------------------------------------------------------------------- timing

def log(message: str) -> None:
    """Progress on stderr, with the seconds since the bench started (where set-up and compile time go)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Timing:
    times_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def jax_sync(out):
    import jax

    return jax.block_until_ready(out)


def torch_sync_for(device) -> Callable[[Any], None]:
    import torch

    if device.type == "cuda":
        return lambda _out: torch.cuda.synchronize(device)
    return lambda _out: None  # CPU ops are synchronous


@dataclasses.dataclass
class Runner:
    """One implementation of one case, ready to time: ``call()`` is one measured unit, ``sync(out)`` waits for it.

    ``peak_bytes`` is known up front (XLA memory analysis); ``peak_after()`` reads an allocator's peak after the
    timed calls (reset by ``before()``). ``flops`` on a peer's runner defaults to our count for the same case.
    """

    case: str
    impl: str
    call: Callable[[], Any]
    sync: Callable[[Any], Any]
    warmup: int = 1
    flops: Optional[float] = None
    peak_bytes: Optional[int] = None
    peak_after: Optional[Callable[[], Optional[int]]] = None
    before: Optional[Callable[[], None]] = None
    peak_source: str = ""
    note: str = ""


def _time_once(runner: Runner) -> float:
    start = time.perf_counter()
    runner.sync(runner.call())
    return (time.perf_counter() - start) * 1e3


def measure(runners: Sequence[Runner], iters: int) -> List[Timing]:
    """Warms every runner up, then times ``iters`` rounds of one call each (interleaved when several)."""
    for runner in runners:
        if runner.before is not None:
            runner.before()
        for _ in range(runner.warmup):
            runner.sync(runner.call())
    times: List[List[float]] = [[] for _ in runners]
    for _ in range(iters):
        for i, runner in enumerate(runners):
            times[i].append(_time_once(runner))
    return [Timing(t) for t in times]


# (case or cases, impl, build -> the runners of those cases)
Factory = Tuple[Any, str, Callable[[], Sequence[Runner]]]


def run_all(report: "Report", env: "Env", ours: Sequence[Factory], peers: Sequence[Factory],
            release_peers: Callable[[], None] = lambda: None) -> None:
    """Builds and times every runner (see the module docstring for the order) and adds the rows to ``report``.

    A factory returns the runners it built (one per case it covers). A peer factory that raises becomes a
    'failed' row for its (case, impl); ours must work.
    """
    order = env.args.order if env.args.order != "auto" else ("interleaved" if env.platform == "cpu" else "sequential")
    env.args.order = order
    if order == "interleaved":
        built = [r for _, _, f in ours for r in f()]
        for case, impl, factory in peers:
            built += _try_build(report, case, impl, factory)
        log(f"built {len(built)} runners; timing them interleaved")
        for runner, timing in zip(built, measure(built, env.args.iters)):
            report.add(runner, timing, runner.peak_after() if runner.peak_after else None)
        return
    for case, impl, factory in peers:
        for runner in _try_build(report, case, impl, factory):
            try:
                timing = measure([runner], env.args.iters)[0]
                report.add(runner, timing, runner.peak_after() if runner.peak_after else None)
            except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                report.fail(runner.case, runner.impl, err)
    release_peers()
    gc.collect()
    _release_torch_memory(env)
    for _, _, factory in ours:
        for runner in factory():
            timing = measure([runner], env.args.iters)[0]
            report.add(runner, timing, runner.peak_after() if runner.peak_after else None)


def _try_build(report, cases, impl, factory) -> List[Runner]:
    try:
        return list(factory())
    except Exception as err:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
        for case in ([cases] if isinstance(cases, str) else cases):
            report.fail(case, impl, err)
        return []


def _release_torch_memory(env) -> None:
    import torch

    if env.torch_device.type == "cuda":
        torch.cuda.synchronize(env.torch_device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- FLOPs and memory

def compiled_flops(compiled) -> Optional[float]:
    """XLA's FLOP count of a compiled program (``compiled.cost_analysis()['flops']``)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def lowered_flops(lowered) -> Optional[float]:
    """FLOPs of a lowered (not compiled) program: XLA's cost analysis of the unoptimised HLO. Within 0.1% of the
    compiled count for our models on the CPU; used where the compiled program hides work in custom calls (cuDNN
    attention) whose FLOPs XLA does not count."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def program_flops(compiled, xla_lowering: Optional[Callable[[], Any]] = None) -> Optional[float]:
    """FLOPs of a timed program; ``xla_lowering()`` lowers the same computation with XLA attention, used when the
    timed program runs a non-XLA attention kernel (its FLOPs are invisible to the cost analysis)."""
    if xla_lowering is not None:
        return lowered_flops(xla_lowering())
    return compiled_flops(compiled)


def compiled_peak_bytes(compiled) -> Optional[int]:
    """Device memory a compiled program needs: arguments + outputs + temporaries − donated (aliased) buffers."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def jax_device_peak_bytes() -> Optional[int]:
    """The device allocator's peak so far (GPU); None where the backend keeps no statistics (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def torch_reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def torch_peak_bytes(device) -> Optional[int]:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def uses_xla_attention(env: Env) -> bool:
    """Whether all our attention runs as XLA ops (then XLA's cost analysis sees every FLOP): on the CPU always, on
    the GPU with ``--backend xla`` (``auto`` picks cuDNN flash for long sequences there)."""
    return env.platform != "gpu" or env.args.backend == "xla"


# ---------------------------------------------------------------------------------------------------------- report

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


def torch_runner(env: Env, case: str, impl: str, call: Callable[[], Any], *, compiled: bool = False,
                 note: str = "") -> Runner:
    """A peer's runner: synchronised on its device, peak from ``torch.cuda.max_memory_allocated`` (reset before its
    warm-up), three warm-up calls when compiled (compile, CUDA-graph recording, first replay)."""
    device = env.torch_device
    if compiled:
        note = (note + "; " if note else "") + "reduce-overhead" + (
            " (CUDA graphs)" if device.type == "cuda" else " (no CUDA graphs on CPU)")
    return Runner(case, impl, call, torch_sync_for(device), warmup=max(env.args.warmup, 3 if compiled else 1),
                  before=lambda: torch_reset_peak(device), peak_after=lambda: torch_peak_bytes(device),
                  peak_source="max_memory_allocated", note=note)


def skip_compile_rows(report: "Report", env: Env, cases: Sequence[str]) -> None:
    for case in cases:
        report.skip(case, "torch.compile", env.compile_skip_reason)
