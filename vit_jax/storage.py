"""One path layer for every file vit_jax reads or writes: local paths and bucket URLs alike.

Paths are strings at the edges (flags, config fields, JSON) and go through this module,
never through `os.path` or `open`, so `--workdir=gs://bucket/run` reaches the bucket and
a local path behaves as it always did. Underneath is `etils.epath`, which orbax uses too.

Buckets (`gs://`) are served by fsspec (gcsfs for `gs://`), not by TensorFlow's
own GCS file system: TensorFlow has Google's endpoint compiled in, so it cannot be pointed
at a test server and what went through it would be untested. `EPATH_USE_TF=false` is set
(unless the user set it) when this module is first used, before etils reads it; etils reads
it on every call. Importing this module changes nothing (no environment, no logging).
Object stores have no appends and no renames: a single write of a whole object is atomic,
so `write_*` is one upload there and a temporary file plus `os.replace` on a local disk.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import socket
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import IO, BinaryIO

import fsspec
from etils import epath

from vit_jax.errors import UserError

URL_SCHEMES = ("gs://",)  # what is tested; other fsspec schemes would need their package
_configured = False


def _configure() -> None:
    """The settings paths need, made once, on first use (every path goes through
    `is_remote` or `as_path`) rather than when the module is imported."""
    global _configured
    _buckets_through_fsspec()
    if _configured:
        return
    # Several processes write one run: a listing must show what the others wrote since.
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    # gcsfs logs each retry's traceback and a warning per bucket when no Cloud credentials
    # are found; a failure reaches the user as one StorageError line instead.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    _configured = True


def _buckets_through_fsspec() -> None:
    """epath sends gs:// through TensorFlow unless EPATH_USE_TF=false, and caches that
    choice the first time anything asks. Set on every use (an environment may have been
    restored without it since), and a choice made before it was set is forgotten."""
    if os.environ.setdefault("EPATH_USE_TF", "false") != "false":
        return  # the user chose TensorFlow's file system on purpose
    from etils.epath import gpath

    decided = getattr(gpath, "_is_tf_installed", None)
    if decided is not None and decided.cache_info().currsize and decided():
        decided.cache_clear()


class StorageError(UserError):
    """A bucket is missing, refuses writes, or its server does not answer."""


def is_remote(path: str) -> bool:
    """Whether `path` is a bucket URL (`gs://...`), which never goes through `os.path`."""
    _configure()
    return str(path).startswith(URL_SCHEMES)


def absolute(path: str) -> str:
    """An absolute local path, or the URL unchanged."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (no `os.path` on URLs)."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
    """The parent of a file or folder; `.` for a bare local name."""
    if is_remote(path):
        return posixpath.dirname(str(path).rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def as_path(path: str) -> epath.Path:
    """The `epath.Path` of a local path or URL."""
    _configure()
    return epath.Path(str(path))


def exists(path: str) -> bool:
    return as_path(path).exists()


def is_dir(path: str) -> bool:
    return as_path(path).is_dir()


def is_file(path: str) -> bool:
    return as_path(path).is_file()


def make_dirs(path: str) -> None:
    """Creates a folder and its parents (a no-op on buckets, which have no folders)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def list_dir(path: str) -> list[str]:
    """The sorted names (not paths) in a folder."""
    return sorted(child.name for child in as_path(path).iterdir())


def walk_files(path: str) -> Iterator[str]:
    """Every file under a folder, as full paths, sorted."""
    if is_remote(path):  # one listing of the prefix (epath refuses recursive globs)
        filesystem, root = fsspec.core.url_to_fs(str(path).rstrip("/"))
        names = filesystem.find(root)
        yield from sorted(filesystem.unstrip_protocol(name) for name in names)
        return
    found = (os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    yield from sorted(found)


def list_entries(path: str) -> tuple[list[str], dict[str, int]]:
    """A folder's sorted sub-folder names and its files' sizes by name, from one listing
    (one request in a bucket, where `is_dir` or `size` per name is one request each)."""
    folders, files = [], {}
    if is_remote(path):
        filesystem, root = fsspec.core.url_to_fs(str(path).rstrip("/"))
        for entry in filesystem.ls(root, detail=True):
            name = entry["name"].rstrip("/")
            if name == root.rstrip("/"):  # a folder's placeholder object
                continue
            if entry["type"] == "directory":
                folders.append(posixpath.basename(name))
            else:
                files[posixpath.basename(name)] = int(entry["size"])
    else:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir():
                        folders.append(entry.name)
                    elif entry.is_file():
                        files[entry.name] = entry.stat().st_size
                except FileNotFoundError:  # gone while listed: another process's temporary
                    continue
    return sorted(folders), dict(sorted(files.items()))


# What one request reads ahead for a reader that reads a whole object in small steps: a zip
# archive (an .npz) is a few small headers per member. Unbuffered, each is its own range
# request (113 for a 40-array ViT-mu .npz; 5 buffered).
READ_AHEAD = 4 << 20


def open_file(path: str, mode: str = "rb", *, read_ahead: bool = False) -> IO:
    """A file object for streaming reads (seekable; in a bucket, ranges are fetched as
    read), for reading part of a large file without downloading all of it. `read_ahead`:
    a bucket's object is fetched READ_AHEAD bytes at a time, for a reader of all of it in
    small pieces (an .npz); without it, a read of a few bytes fetches a few bytes."""
    opened = as_path(path).open(mode)
    if read_ahead and mode == "rb" and is_remote(path):
        return io.BufferedReader(opened, buffer_size=READ_AHEAD)
    return opened


def missing(path: str) -> str:
    """Why `path` cannot be found, in words: no such file or folder, or no such bucket."""
    if is_remote(path):
        scheme, rest = str(path).split("://", 1)
        bucket = rest.split("/", 1)[0]
        if not exists(f"{scheme}://{bucket}"):
            return f"the bucket {bucket!r} does not exist (or this machine may not read it)"
    return "no such file or folder"


def size(path: str) -> int:
    return as_path(path).stat().length


def read_text(path: str) -> str:
    return as_path(path).read_text()


def read_bytes(path: str) -> bytes:
    return as_path(path).read_bytes()


def write_bytes(path: str, content: bytes) -> None:
    """Writes a whole file atomically: readers see the old content or the new, never half."""
    if is_remote(path):
        as_path(path).write_bytes(content)  # one upload: the object appears complete or not
    else:
        write_with(path, lambda file: file.write(content))


def write_text(path: str, content: str) -> None:
    """`write_bytes` for UTF-8 text."""
    write_bytes(path, content.encode())


def write_with(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a file atomically through `write(file)`, like `write_bytes`: on a local disk
    into a temporary file (synced, then renamed into place), so a large file is never all
    in memory; in a bucket into memory, then one upload."""
    if is_remote(path):
        buffer = io.BytesIO()
        write(buffer)
        write_bytes(path, buffer.getvalue())
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove(path: str) -> None:
    as_path(path).unlink(missing_ok=True)


def check_writable(url: str) -> None:
    """Writes and deletes a marker object under `url`; raises StorageError naming the URL
    and what to do when the bucket is missing, refuses the write or does not answer."""
    marker = join(url, f".vit_jax_write_check_{uuid.uuid4().hex}")
    try:
        _probe_endpoint(url)
        write_bytes(marker, b"")
        remove(marker)
    except Exception as error:  # noqa: BLE001 - every storage failure becomes one line
        raise storage_error(url, error) from error


def check_output(path: str, flag: str, *, folder: bool = False) -> None:
    """Makes sure a file (or, with `folder`, a folder) can be written at `path` before any
    work starts: its folder is created, a bucket takes a marker object, and an existing
    folder where a file is wanted (or a file where a folder is wanted) is refused. Every
    problem is one UserError line naming `flag`."""
    target = path if folder else dirname(path)
    if is_remote(path):
        check_writable(target)
        return
    if not folder and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a folder")
    existing = os.path.abspath(target or ".")
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        os.makedirs(target or ".", exist_ok=True)
        with tempfile.TemporaryFile(dir=target or "."):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(
            f"{flag} {path}: cannot write there ({reason}); choose another path"
        ) from None


def check_reachable(url: str) -> None:
    """Raises StorageError at once when the storage server of a bucket URL does not answer
    (reading would otherwise wait out the client's retries); a no-op for local paths."""
    try:
        _probe_endpoint(str(url))
    except OSError as error:
        raise storage_error(str(url), error, action="read") from error


def _probe_endpoint(url: str, timeout: float = 10.0) -> None:
    """Fails at once (instead of after gcsfs's half minute of retries) when nothing listens
    at the storage endpoint of a `gs://` URL."""
    if not url.startswith("gs://"):
        return
    endpoint = urllib.parse.urlparse(
        os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    )
    if not endpoint.hostname:  # a bare host:port
        endpoint = urllib.parse.urlparse("http://" + os.environ["STORAGE_EMULATOR_HOST"])
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    with socket.create_connection((endpoint.hostname, port), timeout=timeout):
        pass


def storage_error(url: str, error: BaseException, action: str = "write to") -> StorageError:
    """A one-line explanation of a failed bucket operation (`action`, e.g. "read") on `url`."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    kind = _classify(error)
    if kind == "missing":
        what = f"the bucket {bucket!r} does not exist; create it or fix the URL"
    elif kind == "refused":
        what = (
            f"writing to the bucket {bucket!r} was refused; give this machine's credentials "
            "write access (roles/storage.objectAdmin) or choose another bucket"
        )
    elif kind == "unreachable":
        what = (
            "the storage server does not answer; check the network (and STORAGE_EMULATOR_HOST "
            "if you point gcsfs at another server)"
        )
    else:
        what = "check the URL, the credentials and the network"
    return StorageError(f"cannot {action} {url}: {what} ({text})")


# What went wrong, from the exception types in the chain first, then from the messages with
# URLs removed (an object name or port may contain "404").
_KINDS = (
    ("missing", FileNotFoundError, r"\b404\b|nosuchbucket|not found"),
    ("refused", PermissionError, r"\b40[13]\b|forbidden|unauthori[sz]ed|permission"),
    ("unreachable", ConnectionError | TimeoutError | socket.gaierror, r"connect|timed? ?out"),
)


def _classify(error: BaseException) -> str:
    chain = []
    while error is not None and len(chain) < 16:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for kind, types, _ in _KINDS:
        if any(isinstance(link, types) for link in chain):
            return kind
    texts = [re.sub(r"\w+://\S+", "", f"{type(e).__name__} {e}").lower() for e in chain]
    for kind, _, pattern in _KINDS:
        if any(re.search(pattern, text) for text in texts):
            return kind
    return "other"


class AppendFile:
    """A file that only grows (`metrics.jsonl`, TensorBoard events), on a disk or a bucket.

    A local file is appended to and flushed at every write. Objects in a bucket cannot be
    appended to, so there the whole content is kept and uploaded again on `flush`, at most
    every `min_upload_seconds` unless forced: the run forces one at each checkpoint, so
    everything up to the checkpoint's step is in the bucket when the checkpoint is.
    """

    def __init__(self, path: str, *, initial: bytes = b"", min_upload_seconds: float = 30.0):
        """Starts the file with `initial` (replacing what was there) and appends from it."""
        self.path = path
        self.remote = is_remote(path)
        self.min_upload_seconds = min_upload_seconds
        self._content = bytearray(initial) if self.remote else None
        self._uploaded_at = float("-inf")
        self._dirty = bool(initial)
        write_bytes(path, bytes(initial))
        self._file = None if self.remote else open(path, "ab")  # noqa: SIM115

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        else:
            self._content.extend(data)
            self._dirty = True
            self.flush(force=False)

    def flush(self, *, force: bool = True) -> None:
        """Uploads a bucket object's content (now, or when the last upload is old enough)."""
        if self._file is not None or not self._dirty:
            return
        if not force and time.monotonic() - self._uploaded_at < self.min_upload_seconds:
            return
        write_bytes(self.path, bytes(self._content))
        self._uploaded_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self.flush()
