"""The three benchmarks run in ``--tiny`` mode (CPU, tiny models) and report a ratio for every row they ran.

One test runs bench/unet.py, bench/train_step.py and bench/retarget.py as subprocesses side by side (each pins
itself to one CPU thread per side, so the two cores are shared, not oversubscribed). The timings of a loaded CI box
are not asserted — only that every case has our row and a torch peer row with a speedup, in the printed table and in
the JSON, and that torch.compile says why it was skipped.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {"unet": [], "train_step": [], "retarget": ["--steps", "2"]}  # 2 sampling steps: the loop, shorter


@pytest.mark.slow
def test_benches_tiny_report_ratios(tmp_path):
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one device per process (the benches add their thread flags)
    procs = {}
    for name, extra in BENCHES.items():
        cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--tiny", "--json", str(tmp_path / f"{name}.json"),
               *extra]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    outputs = {name: proc.communicate(timeout=600) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"bench/{name}.py --tiny failed:\n{outputs[name][1][-3000:]}"

    for name in BENCHES:
        stdout = outputs[name][0]
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["bench"] == name and data["mode"] == "tiny" and data["iters"] >= 20
        assert "peer_ms / our_ms" in data["speedup_definition"]
        cases = sorted({row["case"] for row in data["rows"]})
        assert cases
        for case in cases:
            rows = {row["impl"]: row for row in data["rows"] if row["case"] == case}
            assert rows["pmf_jax"]["status"] == "ok" and rows["pmf_jax"]["speedup"] == 1.0
            peer = rows["torch eager"]
            assert peer["status"] == "ok", peer
            assert math.isfinite(peer["speedup"]) and peer["speedup"] > 0
            assert math.isclose(peer["speedup"], peer["ms"] / rows["pmf_jax"]["ms"], rel_tol=1e-9)
            assert rows["torch.compile"]["status"] == "skipped" and "--compile" in rows["torch.compile"]["note"]
        for row in data["rows"]:
            assert row["status"] != "ok" or (row["speedup"] is not None and row["iters"] >= 20), row
            # every row of the JSON is a line of the printed table, with its ratio
            line = next(ln for ln in stdout.splitlines() if ln.startswith(f"| {row['case']} ") and
                        f"| {row['impl']} " in ln)
            if row["status"] == "ok":
                assert f"{row['speedup']:.2f}x" in line
            else:
                assert row["status"] in line
        assert "speedup = peer_ms / our_ms" in stdout
    print(f"bench smoke: {time.perf_counter() - start:.1f} s; " + "; ".join(
        f"{name}: " + ", ".join(f"{r['impl']} {r['speedup']:.2f}x" for r in json.loads(
            (tmp_path / f"{name}.json").read_text())["rows"] if r["status"] == "ok" and r["impl"] != "pmf_jax")
        for name in BENCHES))


def test_bench_models_match_across_frameworks():
    """The benches build each model on both sides from one config: the same architecture (parameter count, tiny
    configs), and the SD1.5 configs are SD1.5 (859.52M UNet, 361.28M ControlNet, 83.65M VAE, 123.06M text encoder;
    counted on torch's meta device — tracing our SD1.5 models here would cost ~15 s)."""
    import jax
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import models
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from pmf_jax.io.registry import model_class

    names = {"unet": "UNet2DConditionModel", "controlnet": "ControlNetModel", "vae": "AutoencoderKL",
             "clip": "CLIPTextModel"}
    expected_sd15 = {"unet": 859_520_964, "controlnet": 361_279_120, "vae": 83_653_863, "clip": 123_060_480}
    for tiny in (True, False):
        cfg = models.model_configs(tiny)
        for kind, name in names.items():
            with torch.device("meta"):
                theirs = models.param_count(models.torch_model(kind, cfg[kind], device=torch.device("meta"),
                                                               dtype=torch.float32))
            if not tiny:
                assert theirs == expected_sd15[kind], (kind, theirs)
                continue
            module = model_class(name).from_config(cfg[kind])
            ours = sum(x.size for x in jax.tree_util.tree_leaves(module.abstract_params()))
            assert ours == theirs, (kind, ours, theirs)
