"""A GCS-protocol storage server for the tests: ``gcp-storage-emulator`` (the real server, from pip) on 127.0.0.1,
started in its own process by :func:`start`, with one access rule added: every request for a bucket whose name
starts with ``forbidden`` is answered 403 (the emulator has no IAM; this is how the tests see a permission error),
and one protocol gap closed: the emulator's media downloads lack the ``x-goog-generation`` and
``x-goog-metageneration`` headers that Cloud Storage sends with every object read. TensorStore (orbax's OCDBT array
writes) reads an object's generation from them and fails with "Malformed StorageGeneration" without them.

``python tests/gcs_emulator.py PORT DATA_DIR`` runs the server (what :func:`start` launches; it then creates the
buckets through the JSON API).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from pathlib import Path

FORBIDDEN_PREFIX = "forbidden"


def _serve(port: int, data_dir: str) -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    handle = server.Router.handle

    def handle_with_rule(self, method):
        path = self._request_handler.path.split("?", 1)[0]
        if f"/b/{FORBIDDEN_PREFIX}" in path or path.startswith(f"/{FORBIDDEN_PREFIX}"):
            body = json.dumps({"error": {"code": 403, "message": "Forbidden: the test server's access rule"}})
            handler = self._request_handler
            handler.send_response(HTTPStatus.FORBIDDEN)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body.encode())
            return
        return handle(self, method)

    server.Router.handle = handle_with_rule

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # noqa: BLE001 - a missing object: the emulator's own handler answers 404
            pass
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is download:
                handlers[method] = download_with_generation
    server.create_server("127.0.0.1", port, in_memory=False, data_dir=data_dir).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir, buckets=("pmf-test",), log=None):
    """Starts the server; returns (process, "http://127.0.0.1:PORT") once it accepts connections."""
    port = free_port()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, str(port), str(data_dir)],
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the storage emulator exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.2)
            continue
        endpoint = f"http://127.0.0.1:{port}"
        for name in buckets:  # the JSON API's buckets.insert
            request = urllib.request.Request(f"{endpoint}/storage/v1/b?project=pmf-tests", method="POST",
                                             data=json.dumps({"name": name}).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=30).close()
            except urllib.error.HTTPError as err:
                if err.code != 409:  # 409: the server's data folder already has it
                    raise
        return proc, endpoint
    proc.kill()
    raise RuntimeError("the storage emulator did not start within 60 s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _serve(int(sys.argv[1]), sys.argv[2])
