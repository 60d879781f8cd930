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
