"""Resolving ``path_or_repo_id`` to a local folder: a folder on disk, a URL (``gs://bucket/...``), or a repo already in
the Hugging Face cache.

A URL is read through a cached local copy (:func:`pmf_jax.storage.local_copy`: downloaded with a progress bar into
``$PMF_STORAGE_CACHE`` or ``~/.cache/pmf_jax/storage/<scheme>/<bucket>/<path>``, reused while the objects are
unchanged), so every reader after this (safetensors' memory map, orbax, tokenizers) sees local files.

No network access is attempted: a repo id that is not in the local cache is an error that says how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pmf_jax.errors import PMFInputError


def resolve_folder(path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = None,
                   revision: Optional[str] = None) -> Path:
    """Returns the local folder holding the model (``subfolder`` applied); a URL's whole folder is copied first
    (module docstring).

    Raises:
      PMFInputError: the path does not exist and is not a cached Hub repo, or the subfolder is missing; for a URL,
        an unreachable storage server, a missing bucket, a permission error or no objects under it.
    """
    from pmf_jax import storage

    text = os.fspath(path_or_repo_id) if isinstance(path_or_repo_id, os.PathLike) else str(path_or_repo_id)
    local = None if storage.is_url(text) else Path(text).expanduser()
    if local is None:
        root = storage.local_copy(text, desc=f"download {text}")
    elif local.is_dir():
        root = local
    elif local.exists():
        raise PMFInputError(f"{text!r} is a file; pass the model folder that holds config.json")
    else:
        root = _cached_snapshot(text, revision)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise PMFInputError(f"{text!r} has no subfolder {subfolder!r} (looked in {folder})")
    return folder


def _cached_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    looks_like_repo = repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise PMFInputError(f"model folder {repo_id!r} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        raise PMFInputError(
            f"{repo_id!r} is neither a local folder nor a repo in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it where you have network access (`hf download {repo_id}`) or pass a local folder") from err
