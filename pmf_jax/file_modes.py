"""The permissions of what pmf_jax writes: those any file or folder the user creates gets, ``0666 & ~umask`` for a
file and ``0777 & ~umask`` for a folder (``0644`` / ``0755`` under the usual umask 022), as diffusers' and
transformers' ``save_pretrained`` give.

Outputs are written into a stage and moved into place (:mod:`pmf_jax.out_folder`, :func:`pmf_jax.io.save_pretrained`);
the stage comes from ``tempfile`` (mode 0700) and some writers create private files (safetensors: 0600), so a stage
gets :func:`give_user_modes` before it is moved into place.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o666
FOLDER_MODE = 0o777
EXECUTABLE_BITS = 0o111


def umask() -> int:
    """The process's umask (read from /proc where it can be; else set and put back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path, mask: int) -> int:
    """The mode ``path`` would have had, created by the user under ``mask``: a folder's, an executable's or a
    file's."""
    if os.path.isdir(path) or os.stat(path).st_mode & EXECUTABLE_BITS:
        return FOLDER_MODE & ~mask
    return FILE_MODE & ~mask


def give_user_modes(root) -> None:
    """Sets every folder and file under ``root`` (``root`` included) to the user's modes; symlinks are left alone."""
    mask = umask()
    root = Path(root)
    paths = [root]
    for folder, folders, files in os.walk(root):
        paths += [Path(folder) / name for name in (*folders, *files)]
    for path in paths:
        if not path.is_symlink():
            os.chmod(path, user_mode(path, mask))


__all__ = ["FILE_MODE", "FOLDER_MODE", "give_user_modes", "umask", "user_mode"]
