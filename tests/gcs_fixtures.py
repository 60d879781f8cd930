"""One GCS-protocol server per test module (tests/gcs_emulator.py): ``gcs`` starts it in ``tmp_path_factory``, points
``$STORAGE_EMULATOR_HOST`` (and what :func:`pmf_jax.storage.use_storage_emulator` derives from it) at it for
in-process code, gives the environment for ``pmf`` subprocesses, and kills the server at teardown::

    from gcs_fixtures import gcs  # noqa: F401  (the pytest fixture)

    def test_x(gcs):
        subprocess.run([... "--out", gcs.url("run/export")], env=gcs.env)

Buckets: ``pmf-test`` (readable, writable) and ``forbidden-x`` (every request answered 403).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import gcs_emulator

BUCKET = "pmf-test"
FORBIDDEN = "forbidden-x"
DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@dataclasses.dataclass(frozen=True)
class GCS:
    endpoint: str      # http://127.0.0.1:PORT
    data_dir: Path     # the server's files
    cache: Path        # $PMF_STORAGE_CACHE of the tests (local copies, URL stages)
    env: dict          # os.environ for `pmf` subprocesses

    def url(self, name: str, bucket: str = BUCKET) -> str:
        return f"gs://{bucket}/{name}"

    def names(self, prefix: str, bucket: str = BUCKET) -> list:
        """The object names under ``gs://bucket/prefix`` (relative to it), sorted; [] when none."""
        from pmf_jax import storage

        fs, inner = storage.filesystem(self.url(prefix, bucket))
        fs.invalidate_cache()
        return sorted(name[len(inner):].lstrip("/") for name in fs.find(inner))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    from pmf_jax import storage

    root = tmp_path_factory.mktemp("gcs")
    proc, endpoint = gcs_emulator.start(root / "server", (BUCKET, FORBIDDEN))
    saved = {k: os.environ.get(k) for k in (storage.EMULATOR_ENV, storage.CACHE_ENV, *DERIVED)}
    for name in DERIVED:  # derived again from this server's address
        os.environ.pop(name, None)
    os.environ[storage.EMULATOR_ENV] = endpoint
    os.environ[storage.CACHE_ENV] = str(root / "cache")
    storage.use_storage_emulator()
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PMF_JAX_CACHE_DIR=str(root / "jax_cache"))
    try:
        yield GCS(endpoint, root / "server", root / "cache", env)
    finally:
        proc.kill()
        proc.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
