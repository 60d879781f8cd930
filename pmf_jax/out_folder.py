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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from pmf_jax.errors import PMFInputError
from pmf_jax.file_modes import FILE_MODE, FOLDER_MODE, give_user_modes, umask

PARTIAL_SUFFIX = ".partial"
PARTIAL_MODES = ("discard", "keep", "resume")


OUT_RULE = "must be empty or absent, unless --overwrite; written beside it and moved into place when complete"


def add_out_arguments(parser: argparse.ArgumentParser, help: str, metavar: str = "DIR",
                      rule: str = OUT_RULE) -> None:
    """Adds ``--out`` (a folder: ``help`` says what goes in it, ``rule`` what it may be) and ``--overwrite``."""
    parser.add_argument("--out", required=True, metavar=metavar, help=f"{help} ({rule})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (the old folder is replaced when the run completes)")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_can_create(path, flag: str = "--out") -> Path:
    """``path`` (absolute) if its folder exists or can be made: the nearest existing parent is a folder in which a
    folder can be created (tried, then removed). Else :class:`PMFInputError` naming ``flag``."""
    path = Path(path).expanduser().absolute()
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise PMFInputError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pmf-write-check-", dir=existing))
    except OSError as err:
        raise PMFInputError(f"{flag} {str(path)!r}: cannot write in {str(existing)!r} "
                            f"({err.strerror or err}); choose a writable location") from None
    return path


def check_out_folder(out, overwrite: bool = False, flag: str = "--out") -> Path:
    """The absolute ``out`` if a run may write it (see the module docstring); else :class:`PMFInputError`."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise PMFInputError(f"{flag} {str(path)!r} exists and is not a folder")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise PMFInputError(f"{flag} {str(path)!r} already exists and is not empty; choose another folder or "
                            f"pass --overwrite (its contents are replaced when the run completes)")
    return check_can_create(path, flag)


def check_out_file(out, flag: str = "--out") -> Path:
    """The absolute ``out`` if a file may be written there (an existing file is replaced); else
    :class:`PMFInputError`."""
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise PMFInputError(f"{flag} {str(path)!r} is a folder; give a file name")
    return check_can_create(path, flag)


def partial_folder(out) -> Path:
    """Where a run with ``partial="keep"`` or ``"resume"`` stages ``out``: ``<out>.partial`` beside it."""
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _make_stage(out: Path, partial: str, overwrite: bool) -> Path:
    if partial == "discard":
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        stage = partial_folder(out)
        if stage.exists() and not stage.is_dir():
            raise PMFInputError(f"{str(stage)!r} (the stage of --out) exists and is not a folder; remove it")
        if stage.exists() and (partial == "keep" or overwrite):
            shutil.rmtree(stage)
        stage.mkdir(exist_ok=True)
    os.chmod(stage, FOLDER_MODE & ~umask())
    return stage


def _move_into_place(stage: Path, out: Path) -> None:
    if out.exists():  # --overwrite (or an empty folder): the old one goes aside first, so a failed rename loses nothing
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


@contextlib.contextmanager
def staged_folder(out, overwrite: bool = False, *, flag: str = "--out", partial: str = "discard") -> Iterator[Path]:
    """Yields the stage (a folder beside ``out``) to write into; when the block completes, the stage becomes ``out``
    (an old ``out`` is replaced only then). ``out`` is checked again first (:func:`check_out_folder`).

    ``partial``: "discard" (a fresh hidden stage, deleted when the block fails), "keep" (``<out>.partial``, emptied
    first, kept when the block fails unless empty) or "resume" (``<out>.partial`` as a previous run left it, kept
    when the block fails unless empty; ``overwrite`` empties it first).
    """
    if partial not in PARTIAL_MODES:
        raise ValueError(f"partial={partial!r} must be one of {PARTIAL_MODES}")
    out = check_out_folder(out, overwrite, flag)
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
    _move_into_place(stage, out)


@contextlib.contextmanager
def staged_file(out, *, flag: str = "--out") -> Iterator[Path]:
    """Yields a temporary path beside ``out`` (same suffix, so image writers pick the format); when the block
    completes it is renamed to ``out`` (replacing an existing file), when it fails it is removed."""
    out = check_out_file(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE & ~umask())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
