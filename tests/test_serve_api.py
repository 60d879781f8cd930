"""`pmf serve`'s HTTP API against the real server process (serve_fixtures): the same request gives the same PNG
bytes and reuses the program compiled at start; every bad input gets its 400 (413 for a body over the limit) with
one line and the server keeps serving; a full queue answers 503 with Retry-After; no model, one `error:` line."""

import base64
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import requests
from PIL import Image

from pmf_jax.pose.openpose_json import openpose_data
from pmf_jax.serve.standing_pose import standing_pose
from serve_fixtures import PIXEL_LIMIT, QUEUE_SIZE, STEPS, UPLOAD_MB, served, tiny_export, tiny_run  # noqa: F401

POSE = json.dumps(openpose_data(standing_pose(64, 64), 64, 64))


def post(server, files=None, data=None, png=False, path="/api/retarget", **kw):
    headers = {"Accept": "image/png"} if png else {}
    return requests.post(server.url + path, files=files, data=data, headers=headers, timeout=120, **kw)


def source_file(server):
    return {"source": ("me.png", server.source.read_bytes(), "image/png")}


def test_same_request_same_png_and_the_program_compiled_at_start_is_reused(served):
    compiled = requests.get(served.url + "/api/health", timeout=10).json()["compiled_programs"]
    assert compiled == 3  # prologue, loop, epilogue of the default request, compiled before "serving"
    fields = {"pose": POSE, "seed": "5"}
    first, second = (post(served, source_file(served), fields, png=True) for _ in range(2))
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == second.content
    assert Image.open(io.BytesIO(first.content)).size == (64, 64)
    settings = json.loads(first.headers["X-PMF-Settings"])
    assert settings["seed"] == 5 and settings["steps"] == STEPS and settings["mode"] == "acm"

    as_json = post(served, source_file(served), fields).json()  # the JSON answer holds the very same PNG
    assert base64.b64decode(as_json["images"][0]) == first.content
    received = np.asarray(as_json["pose"]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    np.testing.assert_allclose(received, standing_pose(64, 64), atol=1e-3)
    assert as_json["settings"]["pose_input"] == "keypoints" and len(as_json["images"]) == 1

    other = post(served, None, {"example": "person.png", "pose": POSE, "seed": "6"}, png=True)
    assert other.status_code == 200 and other.content != first.content
    assert requests.get(served.url + "/api/health", timeout=10).json()["compiled_programs"] == compiled


def test_bad_inputs_get_one_clear_message_and_the_server_keeps_serving(served):
    pose = {"pose": POSE}
    outside = standing_pose(64, 64)
    outside[4, 0] = 70.0  # right wrist beyond the 64-pixel-wide source
    big = io.BytesIO()
    Image.new("RGB", (1000, 1000), (9, 9, 9)).save(big, format="PNG")  # 1 MP, over the server's pixel limit
    cases = [
        ({"source": ("a.png", b"this is not an image", "image/png")}, pose, 400, "not a readable image"),
        (source_file(served), {"pose": '{"people": [{"pose_keypoints_2d": [1, 2,'}, 400, "not valid JSON"),
        (source_file(served), {"pose": json.dumps(openpose_data(outside, 64, 64))}, 400,
         "'right_wrist' at (70.0, "),
        (source_file(served), dict(pose, mode="dreamy"), 400, "mode 'dreamy' is not one of"),
        (None, dict(pose, example="../../../etc/passwd"), 400, "not one of the server's examples"),
        (source_file(served), dict(pose, path="/etc/passwd"), 400, "unknown field 'path'"),
        (source_file(served), dict(pose, steps="0"), 400, "steps=0 must lie in"),
        ({"source": ("big.png", big.getvalue(), "image/png")}, pose, 400, f"more than the limit of {PIXEL_LIMIT:,}"),
        ({"source": ("huge.png", b"\0" * int(UPLOAD_MB * 1e6 + 1), "image/png")}, pose, 413, "more than the limit"),
    ]
    for files, data, status, message in cases:
        answer = post(served, files, data)
        assert answer.status_code == status, (message, answer.text)
        error = answer.json()["error"]
        assert message in error and "\n" not in error and "/tmp" not in error, error
    doodle = post(served, path="/api/fit-doodle", json={"strokes": [[[1, 2], [100, 2]]], "width": 64, "height": 64})
    assert doodle.status_code == 400 and "lies outside the 64x64 image" in doodle.json()["error"]
    assert post(served, data={"x": "1"}, path="/api/fit-doodle").status_code == 400  # not JSON
    health = requests.get(served.url + "/api/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert post(served, source_file(served), pose, png=True).status_code == 200


def test_twenty_concurrent_requests_against_a_queue_of_four(served):
    body = {"pose": POSE, "seed": "1"}
    start = threading.Barrier(20)
    answers = []

    def one():
        start.wait()
        answers.append(post(served, source_file(served), body, png=True))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(a.status_code for a in answers)
    assert len(codes) == 20 and set(codes) <= {200, 503}, codes
    assert QUEUE_SIZE <= codes.count(200) < 20, codes  # the queue took at least its capacity, and was full
    for refused in (a for a in answers if a.status_code == 503):
        assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["error"]
    assert len({a.content for a in answers if a.status_code == 200}) == 1  # all the same image
    health = requests.get(served.url + "/api/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue"]["waiting"] == 0 and health["queue"]["refused"] >= 1
    assert served.process.poll() is None


def test_serve_without_the_demo_model_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pmf_jax.cli", "serve"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: no model at outputs/demo/export (the demo's export): run `make demo` first, or pass --model "
        "EXPORT_OR_SD_FOLDER"]
