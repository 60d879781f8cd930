"""What the ``pmf`` commands write: checked before any work, and written whole or not at all.

A command that writes a folder (``--out DIR``: ``pmf retarget``, ``pmf eval generate``, ``pmf scaling``,
``pmf convert``) adds ``--out``/``--overwrite`` with :func:`add_out_arguments` and

1. checks ``--out`` at once, before it loads a model or computes anything (:func:`check_out_folder`): it is not a
   file, it is empty or absent unless ``--overwrite`` is given, and its nearest existing parent is a folder where a
   folder can be created (tried, not guessed from permission bits: root, read-only mounts and ACLs answer the same);
2. writes into a stage beside it and moves the stage into place when the run completes (:func:`staged_folder`).
   With ``--overwrite`` the old folder is replaced only then. A run that fails or is killed never leaves a
   half-written ``--out`` that looks complete, and two runs never mix their files.

The stage is ``.<name>.tmp-XXXXXXXX`` (deleted when the run fails; a killed run leaves it hidden) or, for commands
whose partial work is worth keeping, ``<name>.partial``: kept when the run stops (``partial="keep"``: scaling's
results so far, started afresh by the next run) or continued by the next run (``partial="resume"``:
``pmf eval generate``).

A command that writes files (``pmf enhance --out``, ``pmf eval score --out``, ``pmf pose``) checks them the same way
(:func:`check_out_file`) and writes each under a temporary name beside it, renamed over the target when complete
(:func:`staged_file`); an existing file is replaced, as a single file cannot mix two runs.

Stages are created with the user's umask (not ``tempfile``'s 0700 / 0600), and everything in a completed stage gets
the user's modes (:func:`pmf_jax.file_modes.give_user_modes`), so finished outputs have the permissions any other
file the user creates would have.

**URLs** (``gs://bucket/...``, :mod:`pmf_jax.storage`). Every function here also takes a URL, returned as an
:class:`etils.epath.Path` (local paths stay ``pathlib.Path``, as before). The checks are the storage server's: it is
reachable, the bucket exists and a probe object can be written there (:func:`pmf_jax.storage.check_writable`), and
without ``--overwrite`` no object lies under the prefix. The stage is always a **local** folder: a ``tempfile``
folder, or for ``partial="keep"``/``"resume"`` a folder keyed by the URL under
``<storage cache>/partial/<scheme>/<bucket>/<path>.partial`` (:func:`partial_folder`; the storage cache is
``$PMF_STORAGE_CACHE`` or ``~/.cache/pmf_jax/storage``), so a stopped ``pmf eval generate --out gs://...`` resumes on
the same machine. When the block completes the stage is uploaded with :func:`pmf_jax.storage.publish_folder`: the
files that mark a folder complete (its top-level ``*.json``/``*.yaml``) go last, which is the commit (object stores
have no folder rename); with ``--overwrite`` the old objects are deleted just before. A failed upload deletes what it
wrote; a killed one leaves objects without the index files, which no reader takes for a complete folder. A file
(:func:`staged_file`) is written to a local temporary file and uploaded as one object (complete or absent).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from pmf_jax import storage
from pmf_jax.errors import PMFInputError
from pmf_jax.file_modes import FILE_MODE, FOLDER_MODE, give_user_modes, umask

PARTIAL_SUFFIX = ".partial"
# "gs:/bucket/x": a URL that went through pathlib (which folds "//"); writing it would make a local folder "gs:".
_FOLDED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)")
PARTIAL_MODES = ("discard", "keep", "resume")


OUT_RULE = "must be empty or absent, unless --overwrite; written beside it and moved into place when complete"


def add_out_arguments(parser: argparse.ArgumentParser, help: str, metavar: str = "DIR",
                      rule: str = OUT_RULE) -> None:
    """Adds ``--out`` (a folder: ``help`` says what goes in it, ``rule`` what it may be) and ``--overwrite``."""
    parser.add_argument("--out", required=True, metavar=metavar, help=f"{help} ({rule})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (the old folder is replaced when the run completes)")


def check_can_create(path, flag: str = "--out") -> Path:
    """``path`` (absolute) if its folder exists or can be made: the nearest existing parent is a folder in which a
    folder can be created (tried, then removed). Else :class:`PMFInputError` naming ``flag``. A URL: the storage
    server is reachable, the bucket exists and an object can be written beside ``path``
    (:func:`pmf_jax.storage.check_writable`)."""
    if storage.is_url(path):
        return storage.check_writable(path, flag)
    path = _local(path, flag)
    storage.check_writable(path, flag)
    return path


def local_only(out, flag: str = "--out") -> Path:
    """``out`` for a command whose writer writes local files only: a URL is one :class:`PMFInputError` line naming
    ``flag`` (checked before anything is written or loaded)."""
    if storage.is_url(out):
        raise PMFInputError(f"{flag} {os.fspath(out)}: this command writes local files only; give a local path "
                            f"(and copy the result to the bucket afterwards)")
    return _local(out, flag)


def check_out_folder(out, overwrite: bool = False, flag: str = "--out") -> Path:
    """The absolute ``out`` if a run may write it (see the module docstring); else :class:`PMFInputError`. A URL is
    checked on its storage server (module docstring) and returned as an :class:`etils.epath.Path`."""
    if storage.is_url(out):
        return _check_url_folder(out, overwrite, flag)
    path = _local(out, flag)
    if path.exists() and not path.is_dir():
        raise PMFInputError(f"{flag} {str(path)!r} exists and is not a folder")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise PMFInputError(f"{flag} {str(path)!r} already exists and is not empty; choose another folder or "
                            f"pass --overwrite (its contents are replaced when the run completes)")
    return check_can_create(path, flag)


def check_out_file(out, flag: str = "--out") -> Path:
    """The absolute ``out`` if a file may be written there (an existing file is replaced); else
    :class:`PMFInputError`. A URL: as :func:`check_can_create`, and no folder (prefix with objects) of that name."""
    if storage.is_url(out):
        path = storage.check_writable(out, flag)
        if _remote(lambda: path.is_dir(), path, "read"):
            raise PMFInputError(f"{flag} {str(path)!r} is a folder; give a file name")
        return path
    path = _local(out, flag)
    if path.is_dir():
        raise PMFInputError(f"{flag} {str(path)!r} is a folder; give a file name")
    return check_can_create(path, flag)


def _local(out, flag: str) -> Path:
    """A local ``out`` as an absolute ``pathlib.Path``; a URL folded by pathlib ("gs:/b/x") is an error, not the
    local folder "gs:"."""
    if _FOLDED_URL.match(os.fspath(out)):
        raise PMFInputError(f"{flag} {os.fspath(out)!r} looks like a URL that lost a '/' (write gs://bucket/...)")
    return Path(out).expanduser().absolute()


def _remote(call, path, action: str):
    """``call()`` (a storage client call about ``path``); its errors as one PMFInputError line."""
    try:
        return call()
    except PMFInputError:
        raise
    except Exception as err:  # the clients raise OSError subclasses and their own HTTP errors
        raise storage.describe_error(err, path, action) from None


def _check_url_folder(out, overwrite: bool, flag: str):
    path = storage.check_writable(out, flag)  # reachable, the bucket exists, writable
    if _remote(lambda: path.is_file(), path, "read"):
        raise PMFInputError(f"{flag} {str(path)!r} exists and is not a folder")
    if not overwrite and _remote(lambda: storage.is_nonempty_folder(path), path, "read"):
        raise PMFInputError(f"{flag} {str(path)!r} already exists and is not empty; choose another folder or "
                            f"pass --overwrite (its contents are replaced when the run completes)")
    return path


def partial_folder(out) -> Path:
    """Where a run with ``partial="keep"`` or ``"resume"`` stages ``out``: ``<out>.partial`` beside it; for a URL,
    the local ``<storage cache>/partial/<scheme>/<bucket>/<path>.partial`` (module docstring)."""
    if storage.is_url(out):
        from urllib.parse import urlparse

        parsed = urlparse(os.fspath(out))
        inner = parsed.path.strip("/") or "_"
        return storage.cache_root() / "partial" / parsed.scheme / parsed.netloc / (inner + PARTIAL_SUFFIX)
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _make_stage(out: Path, partial: str, overwrite: bool) -> Path:
    if partial == "discard":  # a URL's in the local temporary folder
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=None if storage.is_url(out) else out.parent))
    else:
        stage = partial_folder(out)
        if stage.exists() and not stage.is_dir():
            raise PMFInputError(f"{str(stage)!r} (the stage of --out) exists and is not a folder; remove it")
        if stage.exists() and (partial == "keep" or overwrite):
            shutil.rmtree(stage)
        stage.mkdir(parents=storage.is_url(out), exist_ok=True)
    os.chmod(stage, FOLDER_MODE & ~umask())
    return stage


def _publish(stage: Path, out, overwrite: bool, partial: str, before_commit=None) -> None:
    """Uploads the finished ``stage`` to the URL ``out`` index files last (module docstring). A failed upload
    deletes the objects it wrote (``out`` was empty, or is replaced) and keeps a partial stage for the next run."""
    try:
        storage.publish_folder(stage, out, replace=overwrite, desc=f"upload {out}", before_index=before_commit)
    except BaseException as err:
        try:
            storage.remove_tree(out)
        except Exception:  # noqa: BLE001 - the server may be what failed; the missing index files still tell
            pass
        if partial == "discard":
            shutil.rmtree(stage, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, PMFInputError):
            raise storage.describe_error(err, out) from err
        raise


def _move_into_place(stage: Path, out: Path) -> None:
    if out.exists():  # --overwrite (or an empty folder): the old one goes aside first, so a failed rename loses nothing
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


@contextlib.contextmanager
def staged_folder(out, overwrite: bool = False, *, flag: str = "--out", partial: str = "discard",
                  before_commit=None) -> Iterator[Path]:
    """Yields the stage (a folder beside ``out``) to write into; when the block completes, the stage becomes ``out``
    (an old ``out`` is replaced only then). ``out`` is checked again first (:func:`check_out_folder`). For a URL the
    stage is local and is uploaded when the block completes (module docstring).

    ``partial``: "discard" (a fresh hidden stage, deleted when the block fails), "keep" (``<out>.partial``, emptied
    first, kept when the block fails unless empty) or "resume" (``<out>.partial`` as a previous run left it, kept
    when the block fails unless empty; ``overwrite`` empties it first).

    ``before_commit``: called once the block completes, just before the commit: before the stage is moved into
    place, or for a URL after the old objects are deleted and the stage's other files are uploaded, before its index
    files (where other processes add their parts of the folder, :func:`pmf_jax.evaluation.generate`). What it
    raises stops the commit: nothing is moved into place or indexed, and a ``partial`` stage is kept.
    """
    if partial not in PARTIAL_MODES:
        raise ValueError(f"partial={partial!r} must be one of {PARTIAL_MODES}")
    out = check_out_folder(out, overwrite, flag)
    url = storage.is_url(out)
    if not url:
        out.parent.mkdir(parents=True, exist_ok=True)
    stage = _make_stage(out, partial, overwrite)
    try:
        yield stage
    except BaseException:
        if partial == "discard":
            shutil.rmtree(stage, ignore_errors=True)
        elif not any(stage.iterdir()):  # nothing worth keeping
            stage.rmdir()
        raise
    give_user_modes(stage)  # what the writers made private (tempfile folders, safetensors files) included
    if url:
        _publish(stage, out, overwrite, partial, before_commit)
    else:
        if before_commit is not None:
            before_commit()
        _move_into_place(stage, out)


@contextlib.contextmanager
def staged_file(out, *, flag: str = "--out") -> Iterator[Path]:
    """Yields a temporary path beside ``out`` (same suffix, so image writers pick the format); when the block
    completes it is renamed to ``out`` (replacing an existing file), when it fails it is removed. For a URL the
    temporary file is local (the temporary folder) and is uploaded as one object when the block completes."""
    out = check_out_file(out, flag)
    url = storage.is_url(out)
    if not url:
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.tmp-", suffix=out.suffix, dir=None if url else out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE & ~umask())
        if url:
            _remote(lambda: storage.upload_file(tmp, out), out, "write")
        else:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
