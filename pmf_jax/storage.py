"""Where pmf_jax reads and writes: a local path or a URL (``gs://bucket/...``, and through the same layer any
``etils.epath``/fsspec URL), one type for both: :class:`etils.epath.Path` (what orbax and TFDS use too).

* :func:`as_path` turns what a user gave (a config value, a ``--out`` flag) into that type: URLs as they are, local
  paths made absolute. Never ``pathlib`` on a user-given location: ``Path("gs://b/run").absolute()`` is the local
  folder ``./gs:/b/run``.
* :func:`check_writable` checks a location before any work (a storage server that cannot be reached, a missing
  bucket, a permission error: one :class:`~pmf_jax.errors.PMFInputError` line naming the location).
* :func:`publish_folder` uploads a finished local stage to a URL, the files that mark a folder complete (its
  top-level ``*.json``/``*.yaml``: ``model_index.json``, ``config.json``, ``generation.json``...) last, so a killed
  upload never leaves a folder that looks complete. Object stores have no folder rename; this is the commit.
* :func:`local_copy` stages a remote folder into a local cache (with a progress bar) for readers that need local
  files (safetensors' memory map, array_record's reader), reused while the remote listing is unchanged.

**One storage-server setting.** ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (the variable of Google's client
libraries) sends every ``gs://`` read and write to that server: :func:`use_storage_emulator` (run when this module is
imported) passes it on to gcsfs (anonymous, no zonal-bucket probe), to TensorStore, which writes orbax's arrays
(``TENSORSTORE_GCS_HTTP_URL``, and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` so that it asks no metadata server for
credentials), and to the child processes pmf_jax starts. Values the user set are kept.

``etils.epath`` is told to use fsspec/gcsfs rather than TensorFlow's GCS file system for ``gs://``
(``EPATH_USE_TF=false``): TensorFlow's does not read ``STORAGE_EMULATOR_HOST``, and one client everywhere is one
behaviour to test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path as LocalPath
from typing import Callable, Iterable, Optional, Union
from urllib.parse import urlparse

from etils import epath

from pmf_jax.errors import PMFInputError

Path = epath.Path
Location = Union[str, os.PathLike]

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
GCS_HOST = "storage.googleapis.com"
REACH_TIMEOUT_S = 5.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The files that mark a published folder complete: uploaded last.
INDEX_SUFFIXES = (".json", ".yaml", ".yml")
DEFAULT_CACHE = LocalPath("~/.cache/pmf_jax/storage")
CACHE_ENV = "PMF_STORAGE_CACHE"
LISTING = ".pmf-listing.json"


def _fresh_listings() -> None:
    """gcsfs caches folder listings per process; other processes (the hosts of a pod, a resumed run) write the same
    prefixes, so every listing is read from the store."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def use_storage_emulator(environ=os.environ) -> Optional[str]:
    """Passes ``$STORAGE_EMULATOR_HOST`` on to every client that needs its own setting (module docstring); returns
    the server's URL, or None when the variable is not set."""
    environ.setdefault("EPATH_USE_TF", "false")
    _fresh_listings()
    host = environ.get(EMULATOR_ENV, "").strip()
    if not host:
        return None
    url = host if "://" in host else f"http://{host}"
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "storage-emulator")
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")
    return url


use_storage_emulator()


def is_url(location: Location) -> bool:
    """True for ``scheme://...`` (``gs://b/x``, ``s3://``, ``memory://``), also when given as an epath.Path."""
    return bool(_URL.match(os.fspath(location)))


def as_path(location: Location) -> Path:
    """The :class:`etils.epath.Path` of a user-given location: a URL as it is, a local path with ``~`` expanded and
    made absolute."""
    text = os.fspath(location)
    if is_url(text):
        return Path(text)
    return Path(os.path.abspath(os.path.expanduser(text)))


def user_path(location: Location, absolute: bool = False) -> Union[Path, LocalPath]:
    """A user-given location as the path type its writers use: a URL as :class:`etils.epath.Path`, a local path as
    ``pathlib.Path`` (as given, or made ``absolute``)."""
    if is_url(location):
        return Path(os.fspath(location))
    local = LocalPath(location)
    return local.absolute() if absolute else local


def as_local(location: Location) -> LocalPath:
    """A local location as ``pathlib.Path``; a URL is a :class:`PMFInputError` (for the few writers that can only
    write local files, e.g. a browser's download folder)."""
    if is_url(location):
        raise PMFInputError(f"{os.fspath(location)} is a URL; this needs a local path")
    return LocalPath(os.path.abspath(os.path.expanduser(os.fspath(location))))


def filesystem(location: Location):
    """``(fsspec filesystem, path in it)`` of a URL."""
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(location))


def _server(location: Location):
    """(host, port) of the server a URL's reads and writes go to."""
    text = os.fspath(location)
    scheme = urlparse(text).scheme
    if scheme in ("gs", "gcs"):
        endpoint = os.environ.get(EMULATOR_ENV, "").strip()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
            return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        return GCS_HOST, 443
    return None


def check_reachable(location: Location) -> None:
    """Raises PMFInputError when the storage server of ``location`` does not accept a connection within
    ``REACH_TIMEOUT_S`` (the clients would otherwise retry for half a minute or more before failing)."""
    server = _server(location)
    if server is None:
        return
    try:
        socket.create_connection(server, timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise PMFInputError(f"{os.fspath(location)}: cannot reach the storage server {server[0]}:{server[1]} "
                            f"({err.strerror or err})" + (f" (${EMULATOR_ENV} is set)" if os.environ.get(EMULATOR_ENV)
                                                          else "")) from None


def bucket_of(location: Location) -> str:
    """``gs://bucket/a/b`` -> ``gs://bucket``."""
    parsed = urlparse(os.fspath(location))
    return f"{parsed.scheme}://{parsed.netloc}"


def error_reason(err: BaseException, location: Location) -> str:
    """What went wrong, in a few words, for an error a storage client raised about ``location``."""
    text = os.fspath(location)
    code = getattr(err, "code", None)
    if isinstance(err, PermissionError) or code in (401, 403) or str(err).startswith("Forbidden"):
        return "permission denied"
    if isinstance(err, FileNotFoundError) or code == 404:
        return f"the bucket {bucket_of(text)} does not exist" if is_url(text) else "not found"
    return (getattr(err, "strerror", None) or str(err) or type(err).__name__).splitlines()[0][:200]


def describe_error(err: BaseException, location: Location, action: str = "write") -> PMFInputError:
    """One PMFInputError line naming ``location`` for an error a storage client raised."""
    return PMFInputError(f"cannot {action} {os.fspath(location)}: {error_reason(err, location)}")


def check_writable(location: Location, flag: str) -> Path:
    """``location`` as a Path if a folder or file can be written there; else PMFInputError naming ``flag``.

    Local: the nearest existing parent of ``location`` is a folder in which a folder can be created (tried, not
    guessed from permission bits; root, read-only mounts and ACLs answer the same). URL: the server is reachable and a probe object can be written beside it (then deleted).
    """
    path = as_path(location)
    if not is_url(path):
        existing = LocalPath(path).parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise PMFInputError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder")
        try:
            import tempfile

            os.rmdir(tempfile.mkdtemp(prefix=".pmf-write-check-", dir=existing))
        except OSError as err:
            raise PMFInputError(f"{flag} {str(path)!r}: cannot write in {str(existing)!r} "
                                f"({err.strerror or err}); choose a writable location") from None
        return path
    check_reachable(path)
    probe = path.parent / f".pmf-write-check-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as err:  # the clients raise OSError subclasses and their own HTTP errors
        raise PMFInputError(f"{flag} {os.fspath(path)}: cannot write there: {error_reason(err, path)}") from None
    return path


def makedirs(path: Location) -> Path:
    """Creates a local folder (and its parents); on a URL nothing (object stores have no folders, and gcsfs would
    create a missing *bucket*)."""
    path = as_path(path)
    if not is_url(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def is_nonempty_folder(path: Location) -> bool:
    path = as_path(path)
    return path.is_dir() and any(True for _ in path.iterdir())


def remove_tree(path: Location) -> None:
    """Deletes a folder (local or every object under a URL prefix); a missing one is no error."""
    path = as_path(path)
    if is_url(path):
        fs, inner = filesystem(path)
        if fs.exists(inner):
            fs.rm(inner, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def move_tree(source: Location, target: Location) -> Path:
    """Renames a folder: ``os.replace`` locally; on a URL each object is copied server-side, then the source deleted
    (object stores have no rename)."""
    source, target = as_path(source), as_path(target)
    if not is_url(source):
        os.replace(source, target)
        return target
    fs, inner = filesystem(source)
    _, inner_target = filesystem(target)
    for name in fs.find(inner):
        fs.copy(name, inner_target + name[len(inner):])
    fs.rm(inner, recursive=True)
    return target


def _is_index(p: LocalPath, root: LocalPath) -> bool:
    return len(p.relative_to(root).parts) == 1 and p.suffix in INDEX_SUFFIXES


def _publish_order(files: Iterable[LocalPath], root: LocalPath) -> list:
    """Files in subfolders first, then the top-level files, the index files (INDEX_SUFFIXES) last."""
    def key(p: LocalPath):
        rel = p.relative_to(root)
        return (len(rel.parts) == 1, _is_index(p, root), rel.as_posix())

    return sorted(files, key=key)


def publish_folder(stage: Location, out: Location, *, replace: bool = False, desc: str = "upload",
                   before_index: Optional[Callable[[], None]] = None, index: bool = True) -> Path:
    """Uploads the finished local folder ``stage`` to the URL ``out`` (index files last, module docstring), then
    deletes ``stage``. ``replace``: the objects already under ``out`` are deleted first. ``before_index``: called
    after the other files are uploaded, just before the index files (the commit); ``index=False`` uploads no index
    file (a part of a folder that another process commits)."""
    from pmf_jax.progress import bar

    stage, out = LocalPath(stage), as_path(out)
    fs, target = filesystem(out)
    if replace:
        remove_tree(out)
    files = _publish_order([p for p in stage.rglob("*") if p.is_file()], stage)
    indexes = [p for p in files if _is_index(p, stage)] if index else []
    data = [p for p in files if not _is_index(p, stage)]
    with bar(total=sum(p.stat().st_size for p in data + indexes), desc=desc, unit="B") as progress:
        def put(group):
            for p in group:
                fs.put_file(str(p), f"{target}/{p.relative_to(stage).as_posix()}")
                progress.update(p.stat().st_size)

        put(data)
        if before_index is not None:
            before_index()
        put(indexes)
    shutil.rmtree(stage, ignore_errors=True)
    return out


def upload_file(local: Location, out: Location) -> None:
    """Copies one local file to a URL (one object write: complete or absent)."""
    fs, target = filesystem(out)
    fs.put_file(os.fspath(local), target)


def cache_root() -> LocalPath:
    return LocalPath(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def object_listing(location: Location) -> dict:
    """{relative name: [size, checksum]} of every object under a URL (the store's crc32c, else its md5/etag/
    generation); read from the listing, nothing is downloaded."""
    location = as_path(location)
    fs, inner = filesystem(location)
    entries = fs.find(inner, detail=True)
    listing = {}
    for name, info in entries.items():
        if info.get("type") == "directory":
            continue
        rel = name[len(inner):].lstrip("/")
        listing[rel] = [int(info.get("size") or 0), info.get("crc32c") or info.get("md5Hash") or info.get("etag")
                        or info.get("generation") or info.get("updated")]
    return listing


def local_copy(location: Location, *, desc: Optional[str] = None) -> LocalPath:
    """A local folder with the files of ``location``: the folder itself when local; for a URL, a copy in the cache
    (``$PMF_STORAGE_CACHE`` or ``~/.cache/pmf_jax/storage/<scheme>/<bucket>/<path>``), downloaded with a progress bar
    and reused while the remote listing (names, sizes, checksums) is unchanged. The copy is made in a stage and moved
    into place, so an interrupted download is never taken for a complete copy."""
    from pmf_jax.progress import bar

    path = as_path(location)
    if not is_url(path):
        return LocalPath(path)
    check_reachable(path)
    try:
        listing = object_listing(path)
    except Exception as err:
        raise describe_error(err, path, "read") from None
    if not listing:
        raise PMFInputError(f"{os.fspath(path)}: no such folder (no objects under it)")
    parsed = urlparse(os.fspath(path))
    local = cache_root() / parsed.scheme / parsed.netloc / parsed.path.strip("/")
    marker = local / LISTING
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == listing:
                return local
        except ValueError:
            pass
    local.parent.mkdir(parents=True, exist_ok=True)
    stage = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    fs, inner = filesystem(path)
    try:
        with bar(total=sum(size for size, _ in listing.values()), desc=desc or f"download {os.fspath(path)}",
                 unit="B") as progress:
            for rel, (size, _) in sorted(listing.items()):
                dest = stage / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{inner}/{rel}", str(dest))
                progress.update(size)
        (stage / LISTING).write_text(json.dumps(listing))
        if local.exists():
            shutil.rmtree(local)
        os.replace(stage, local)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return local


def content_hash(data: Union[str, bytes]) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


__all__ = ["EMULATOR_ENV", "INDEX_SUFFIXES", "Path", "as_local", "as_path", "bucket_of", "check_reachable",
           "check_writable", "content_hash", "describe_error", "filesystem", "is_nonempty_folder", "is_url",
           "local_copy", "makedirs", "move_tree", "object_listing", "publish_folder", "remove_tree", "upload_file", "use_storage_emulator"]
