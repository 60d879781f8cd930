"""``pmf serve``: a web page (joint editor, doodle, uploads) and an HTTP API that retarget with one model, loaded and
compiled once at start (:mod:`pmf_jax.serve`)."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from pmf_jax.commands import model_options, options
from pmf_jax.commands.pose import add_detector_arguments
from pmf_jax.constants import DEFAULT_GUIDANCE_SCALE
from pmf_jax.errors import PMFInputError

DEFAULT_MODEL = "outputs/demo/export"  # what `make demo` exports
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="a web page and an HTTP API that retarget with one model",
        description="Serves a page (upload or pick a source photo; drag the joints of an OpenPose skeleton, draw a "
                    "stick figure or upload a pose; generate with a progress bar; download the PNGs and the pose "
                    "JSON) and the HTTP API it uses (POST /api/retarget, GET /api/health). The model loads and "
                    "compiles once at start; requests run one at a time through a bounded queue.")
    model_options.add_model_arguments(p, default_model=DEFAULT_MODEL)
    sampling = p.add_argument_group("request defaults", "what a request that does not say uses")
    options.add_sampling_args(sampling)
    sampling.add_argument("--guidance-scale", type=float,
                          help=f"text guidance (default: the export's, else {DEFAULT_GUIDANCE_SCALE})")
    model_options.add_reference_arguments(p)
    poses = p.add_argument_group("poses")
    add_detector_arguments(poses)
    poses.add_argument("--examples", metavar="DIR|GLOB",
                       help="example source images the page offers (default: test_source*.png beside the model "
                            "folder, where `make demo` writes its held-out source)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s, this "
                                                             "machine only)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0: any free one)")
    server.add_argument("--queue-size", type=int, default=4,
                        help="requests that may wait while one generates; more get 503 (default: %(default)s)")
    server.add_argument("--max-upload-mb", type=float, default=20.0,
                        help="largest request body in MB (default: %(default)s)")
    options.add_runtime_args(p)
    return p


def run(args) -> int:
    from pmf_jax.pipelines.images import check_resolution
    from pmf_jax.pipelines.memory import memory_limit_setting

    start = time.monotonic()
    check_resolution(args.height, args.width)
    memory_limit_setting()
    model_options.check_model_arguments(args)
    if args.queue_size < 0:
        raise PMFInputError(f"--queue-size {args.queue_size} must be 0 or more")
    if not args.max_upload_mb > 0:
        raise PMFInputError(f"--max-upload-mb {args.max_upload_mb} must be positive")
    if args.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        raise PMFInputError(f"no model at {DEFAULT_MODEL} (the demo's export): run `make demo` first, or pass "
                            f"--model EXPORT_OR_SD_FOLDER")
    _check_server_packages()
    sock = _bind(args.host, args.port)  # a taken port fails now, not after the model has loaded

    from pmf_jax.serve.app import create_app
    from pmf_jax.serve.job_queue import GenerationQueue
    from pmf_jax.serve.model import ServedModel

    print(f"loading {args.model}", flush=True)
    model = ServedModel(args)
    loaded = time.monotonic()
    height, width = model.default_size()
    print(f"compiling for {height}x{width}, {model.sampling['steps']} {model.sampling['scheduler']} steps "
          f"(mode {model.pipe.mode})", flush=True)
    model.warm_up()
    ready = time.monotonic()
    app = create_app(model, GenerationQueue(args.queue_size), int(args.max_upload_mb * 1e6))
    sock.listen(128)  # connections from now on wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    print(f"ready in {ready - start:.1f} s (model {loaded - start:.1f} s, first image {ready - loaded:.1f} s): "
          f"serving http://{_url_host(host)}:{port}/ (Ctrl-C stops)", flush=True)
    _serve(app, sock)
    return 0


def _check_server_packages() -> None:
    import importlib.util

    missing = [name for name, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("python-multipart", "python_multipart"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise PMFInputError(f"pmf serve needs {', '.join(missing)}: pip install 'pmf_jax[serve]'")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PMFInputError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _serve(app, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        print("stopped", file=sys.stderr, flush=True)
