"""Checksums of checkpoint steps: a manifest written once a step is committed, verified before the step is restored.

Orbax (0.12: OCDBT + zarr3) checksums only each shard's index (crc32c), not the array bytes, so a checkpoint with
4 KB of a data file overwritten restores without an error and trains to NaN. ``<step>/checksums.json`` lists the
size and sha256 of every file of the step folder. It is written after orbax has committed the step (the trainer's
``train.checkpointing.RunCheckpoints``), so a step without one was written before manifests existed or by a process
killed between the commit and the manifest: it restores unverified, with a warning.

:func:`restore_newest_intact` is the one restore policy of the trainer and of the readers of a run (export,
evaluation, which pass the one step they read): the newest step that verifies and restores wins; every newer one is
skipped with a warning naming it.

A step folder on an object store (``gs://...``) lists each object's size and the crc32c the store computed when it
was written (read from the listing: nothing is downloaded); a local one each file's size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Tuple, TypeVar

from pmf_jax import storage
from pmf_jax.errors import PMFInputError

MANIFEST = "checksums.json"
CHUNK_BYTES = 1 << 22
REASON_CHARS = 300  # orbax/TensorStore messages embed whole JSON specs; one line keeps the start

T = TypeVar("T")


class CorruptCheckpoint(PMFInputError):
    """A checkpoint step whose files do not match its manifest, or that orbax could not restore."""


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entries(step_dir) -> Tuple[str, dict]:
    """(algorithm, {relative name: {"size", algorithm: value}}) of the files of a step folder, the manifest
    excluded."""
    if storage.is_url(step_dir):
        listing = storage.object_listing(step_dir)
        return "crc32c", {name: {"size": size, "crc32c": checksum} for name, (size, checksum) in listing.items()
                          if name != MANIFEST and not name.startswith(f".{MANIFEST}")}
    root = os.fspath(step_dir)
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = storage.as_path(os.path.join(folder, name))
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel != MANIFEST:
                files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    return "sha256", dict(sorted(files.items()))


def write_manifest(step_dir):
    """Writes ``step_dir/checksums.json`` ({"algorithm", "files": {relative path: {"size", algorithm}}})
    atomically (one object write on a store; a rename locally); returns its path."""
    step_dir = storage.as_path(step_dir)
    algorithm, files = _entries(step_dir)
    text = json.dumps({"algorithm": algorithm, "files": files}, indent=1) + "\n"
    path = step_dir / MANIFEST
    if storage.is_url(step_dir):
        path.write_text(text)
        return path
    partial = step_dir / f".{MANIFEST}.partial"
    partial.write_text(text)
    os.replace(partial, path)
    return path


def has_manifest(step_dir) -> bool:
    return (storage.as_path(step_dir) / MANIFEST).is_file()


def verify(step_dir) -> bool:
    """True when every file listed in the manifest has its size and checksum; False when there is no manifest.

    Raises:
      CorruptCheckpoint naming the first file that is missing, truncated or changed.
    """
    step_dir = storage.as_path(step_dir)
    if not has_manifest(step_dir):
        return False
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        algorithm, files = manifest.get("algorithm", "sha256"), manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpoint(f"its {MANIFEST} is unreadable ({err})") from None
    present = storage.object_listing(step_dir) if storage.is_url(step_dir) else None
    for name, entry in files.items():
        path = step_dir / name
        if present is not None:
            if name not in present:
                raise CorruptCheckpoint(f"{name} is missing")
            size, checksum = present[name]
        else:
            if not path.is_file():
                raise CorruptCheckpoint(f"{name} is missing")
            size, checksum = os.path.getsize(path), None
        if size != entry["size"]:
            raise CorruptCheckpoint(f"{name} has {size} bytes, {entry['size']} were written (truncated or appended)")
        if algorithm == "crc32c":
            if checksum != entry["crc32c"]:
                raise CorruptCheckpoint(f"{name} does not match its crc32c (its data changed after saving)")
        elif _sha256(path) != entry["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its sha256 (its data changed after saving)")
    return True


def reason(err: BaseException) -> str:
    """One line for an exception raised while restoring: the innermost cause's first line, shortened."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + " ..."


def _is_aborted_read(exc: BaseException, source=None) -> bool:
    """A late callback into the asyncio loop orbax closed, or one of orbax's abandoned read coroutines."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(source, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


@contextmanager
def quiet_aborted_reads():
    """Around an orbax restore: drops the tracebacks of the reads orbax abandons when it gives up on a damaged
    checkpoint.

    orbax stops at the first failed read and closes its asyncio loop while TensorStore still completes the others:
    each completion calls back into the closed loop (``RuntimeError: Event loop is closed``, printed through
    ``sys.excepthook``), each abandoned read coroutine reports its own error (``sys.unraisablehook``) and each
    abandoned future logs "exception was never retrieved" (the ``asyncio`` logger): thousands of tracebacks for one
    truncated file, after the failure was already reported in one line. The filter is set
    before the restore (the first callbacks can come before orbax's exception reaches us) and removed after a
    restore that succeeded; after a failed one it stays for the rest of the process, as the late callbacks do.
    Everything else still reaches the hooks installed before.
    """
    if getattr(sys.excepthook, "quiets_aborted_reads", False):
        yield
        return
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback):
        if not _is_aborted_read(value):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(unraisable):
        if not _is_aborted_read(unraisable.exc_value, unraisable.object):
            previous_unraisablehook(unraisable)

    def never_retrieved(record: logging.LogRecord) -> bool:  # False: drop the record
        return "exception was never retrieved" not in record.getMessage()

    excepthook.quiets_aborted_reads = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("asyncio").addFilter(never_retrieved)
    yield  # an exception from the restore leaves the filter in place
    sys.excepthook, sys.unraisablehook = previous_excepthook, previous_unraisablehook
    logging.getLogger("asyncio").removeFilter(never_retrieved)


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def restore_newest_intact(directory, steps: Iterable[int], restore: Callable[[int], T], *,
                          warn: Callable[[str], None] = warn_stderr) -> Tuple[T, int]:
    """Returns (``restore(step)``, step) for the newest of ``steps`` whose files match its manifest and that restores.

    A step that fails either check is skipped with a warning naming it and why; one without a manifest is restored
    unverified, with a warning. Raises CorruptCheckpoint (one line, every step's reason) when no step restores, and
    PMFInputError when ``steps`` is empty.
    """
    failures, steps = [], sorted(steps, reverse=True)
    for step in steps:
        step_dir = storage.as_path(directory) / str(step)
        try:
            if not verify(step_dir):
                warn(f"checkpoint {step_dir} has no {MANIFEST} (saved before checksums, or killed right after "
                     f"saving): restoring it unverified")
            with quiet_aborted_reads():
                restored = restore(step)
            return restored, step
        except Exception as err:  # noqa: BLE001 - orbax reports damage with many exception types, plain Exception too
            failures.append((step, err if isinstance(err, CorruptCheckpoint) else reason(err)))
            if step != steps[-1]:
                warn(f"checkpoint {step_dir} is incomplete or corrupt ({failures[-1][1]}); skipping it")
    if not failures:
        raise PMFInputError(f"no checkpoint in {directory}")
    if len(failures) == 1:
        raise CorruptCheckpoint(f"checkpoint {directory}/{steps[0]} is incomplete or corrupt: {failures[0][1]}")
    raise CorruptCheckpoint(f"no checkpoint in {directory} restores, each is incomplete or corrupt: "
                            + "; ".join(f"step {step}: {why}" for step, why in failures))
