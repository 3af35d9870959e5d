"""Image folders: ``root/<split>/<class>/*.{jpg,jpeg,png}`` with any split names, or
``root/<class>/*.jpg`` (class folders only), read as one split named ``all``.

Class indices follow the sorted union of class folder names over all splits, so every split
agrees on them. Files are listed once, checked cheaply (size, header magic and end marker,
no decoding) so that truncated, empty or non-image files can be skipped (each named once in
one logged line) or reported as an error, and put in a fixed pseudo-random order so that
sliced splits (``train[:90%]``) mix all classes. Reading and decoding is pure tf.data.
``describe`` lists classes and counts files by name only, for the trainer's dry run.

``root`` may be a local folder or a ``gs://`` URL: listing and checking go through
``vit_jax.storage`` (in a bucket, one listing per folder and the checks run in parallel);
the images themselves are read by ``tf.io.read_file``, i.e. TensorFlow's own file system.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from concurrent import futures

import numpy as np

from vit_jax import storage
from vit_jax.data import splits
from vit_jax.data._tf import tf
from vit_jax.data.sources.base import DataError, Records

EXTENSIONS = (".jpg", ".jpeg", ".png")
_EXTENSIONS_TEXT = "/".join(EXTENSIONS)
_MAX_LISTED = 20
_REMOTE_THREADS = 32  # Parallel listings and checks in a bucket (each is a request).
_reported: set[str] = set()  # Bad files already named in this process (each is named once).
log = logging.getLogger("vit_jax")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """The readable files of one split (in a fixed order) and the skipped ones."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    bad: tuple[tuple[str, str], ...]  # (path, reason)


def _root(cfg) -> str:
    root = cfg.data_dir or cfg.name
    if not root or not storage.is_dir(root):
        raise DataError(
            f"image folder {root!r} does not exist; set data_dir to a folder laid out as "
            "root/<split>/<class>/*.jpg"
        )
    return root


ALL = "all"  # The one split of a folder of class folders.


def _subfolders(folder: str) -> list[str]:
    return storage.list_entries(folder)[0]


def _files(folder: str) -> list[str]:
    return list(storage.list_entries(folder)[1])


def _map(fn: Callable, items: Iterable, remote: bool) -> list:
    """``[fn(x) for x in items]``, in parallel threads for a bucket (I/O-bound requests)."""
    if not remote:
        return [fn(x) for x in items]
    with futures.ThreadPoolExecutor(_REMOTE_THREADS) as pool:
        return list(pool.map(fn, items))


@functools.lru_cache(maxsize=16)
def has_class_layout(root: str) -> bool:
    """Whether ``root`` holds class folders of images directly (no split folders)."""
    return any(
        f.lower().endswith(EXTENSIONS)
        for d in _subfolders(root)
        for f in _files(storage.join(root, d))
    )


def _split_dir(root: str, split: str) -> str:
    return root if split == ALL and has_class_layout(root) else storage.join(root, split)


@functools.lru_cache(maxsize=16)
def class_names(root: str) -> tuple[str, ...]:
    """Sorted union of the class folder names of all splits under ``root``."""
    names: set[str] = set()
    for split in split_names(root):
        names.update(_subfolders(_split_dir(root, split)))
    if not names:
        folders = _subfolders(root)
        if folders:  # root/<class>/ folders, none holding an image
            raise DataError(
                f"the class folders under {root!r} ({_listed(folders)}) are all empty: none "
                f"holds a {_EXTENSIONS_TEXT} image; add images as root/<class>/*.jpg (or "
                "root/<split>/<class>/*.jpg)"
            )
        raise DataError(
            f"no class folders found under {root!r}; expected root/<split>/<class>/ or "
            "root/<class>/"
        )
    return tuple(sorted(names))


def _listed(names: list[str] | tuple[str, ...], limit: int = _MAX_LISTED) -> str:
    """`a, b, c` (and `..., and N more` past `limit`)."""
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def split_names(root: str) -> list[str]:
    """The split folders under ``root``, sorted (``all`` for a folder of class folders)."""
    return [ALL] if has_class_layout(root) else _subfolders(root)


def check_image_file(path: str) -> str | None:
    """Returns why ``path`` is not a complete JPEG/PNG (None if it looks fine).

    Reads only the first and last bytes: empty files, unknown formats and files cut short
    (no JPEG end marker / PNG IEND chunk) are caught without decoding.
    """
    try:
        with storage.open_file(path) as f:
            size = f.seek(0, 2)
            if size == 0:
                return "empty file"
            f.seek(0)
            head = f.read(16)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail[-64:] else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG image"


def _list_split(root: str, split: str) -> list[tuple[str, list[str]]]:
    """``[(class, image file names)]`` of split folder ``root/split``, by name only.

    Refuses a class folder without images (it would still take a class index) and a split
    with no class folders, naming the folder."""
    split_dir = _split_dir(root, split)
    if not storage.is_dir(split_dir):
        raise DataError(
            f"split folder {split_dir!r} does not exist; splits under {root!r}: {split_names(root)}"
        )
    classes = _subfolders(split_dir)
    if not classes:
        raise DataError(
            f"split folder {split_dir!r} has no class folders, so no images; put its images "
            f"in {storage.join(split_dir, '<class>')}/ or remove the folder"
        )
    listings = _map(_files, [storage.join(split_dir, c) for c in classes], storage.is_remote(root))
    found = []
    for cls, files in zip(classes, listings, strict=True):
        names = [f for f in files if f.lower().endswith(EXTENSIONS)]
        if not names:
            raise DataError(
                f"class folder {storage.join(split_dir, cls)!r} has no {_EXTENSIONS_TEXT} "
                "images; add images or remove the folder (class indices come from the folder "
                "names)"
            )
        found.append((cls, names))
    return found


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """What ``describe`` found: the class names and the image files per split and class."""

    root: str
    classes: tuple[str, ...]
    files: dict[str, dict[str, int]]  # split -> class -> image files (by name)

    def lines(self) -> list[str]:
        """The classes, then the image files of each split (a dry run's report)."""
        out = [
            f"image folder {self.root}: {len(self.classes)} classes ({_listed(self.classes)}); "
            "image files counted by name, none opened:"
        ]
        for split, per_class in self.files.items():
            where = "root/<class>/" if split == ALL and has_class_layout(self.root) else split
            out.append(
                f"  {where}: {sum(per_class.values())} image files in {len(per_class)} "
                "class folders"
            )
        return out


def describe(root: str) -> FolderListing:
    """The classes and the image files per split of the folder dataset at ``root``, counted
    by file name (nothing is opened or decoded), for a dry run. Raises DataError, naming the
    folder, where a real run would find no images: an empty class folder, a split without
    class folders, class folders that are all empty."""
    classes = class_names(root)
    files = {
        split: {cls: len(names) for cls, names in _list_split(root, split)}
        for split in split_names(root)
    }
    return FolderListing(root, classes, files)


@functools.lru_cache(maxsize=32)
def scan_split(root: str, split: str) -> FolderSplit:
    """Lists and checks the files of split folder ``root/split``."""
    split_dir = _split_dir(root, split)
    listing = _list_split(root, split)
    index = {c: i for i, c in enumerate(class_names(root))}
    remote = storage.is_remote(root)
    candidates = []  # (path, class)
    for cls, names in listing:
        candidates += [(storage.join(split_dir, cls, f), cls) for f in names]
    reasons = _map(check_image_file, [path for path, _ in candidates], remote)
    paths, labels, bad = [], [], []
    for (path, cls), reason in zip(candidates, reasons, strict=True):
        if reason is None:
            paths.append(path)
            labels.append(index[cls])
        else:
            bad.append((path, reason))
    order = splits.deterministic_order(len(paths))
    return FolderSplit(tuple(paths[i] for i in order), tuple(labels[i] for i in order), tuple(bad))


def _bad_text(bad: tuple[tuple[str, str], ...] | list[tuple[str, str]], where: str) -> str:
    listed = "; ".join(f"{p} ({r})" for p, r in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return f"{len(bad)} bad image file(s) in {where}: {listed}{more}"


def _report_bad(found: FolderSplit, on_bad_image: str, where: str) -> None:
    """Refuses the bad files (``on_bad_image='error'``) or logs one line naming those not
    named before in this process: splits sliced from one folder share their bad files."""
    if not found.bad:
        return
    if on_bad_image == "error":
        raise DataError(_bad_text(found.bad, where) + " (set on_bad_image='skip' to skip them)")
    if on_bad_image != "skip":
        raise DataError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    new = [(path, reason) for path, reason in found.bad if path not in _reported]
    if new:
        _reported.update(path for path, _ in new)
        log.warning("skipped %s", _bad_text(new, where))


def _select(cfg) -> tuple[np.ndarray, np.ndarray, FolderSplit]:
    root = _root(cfg)
    name, _, _ = splits.parse_split(cfg.split)
    found = scan_split(root, name)
    _, idx = splits.slice_indices(cfg.split, len(found.paths))
    paths = np.asarray(found.paths, dtype=object)[idx]
    return paths, np.asarray(found.labels, np.int64)[idx], found


def _read(record: dict) -> dict:
    return {"image": tf.io.read_file(record["path"]), "label": record["label"]}


def open_split(cfg, process_index: int, process_count: int) -> Records:
    """Records (path, label) of ``cfg.split`` for one process; files are read after shuffling."""
    paths, labels, found = _select(cfg)
    root = _root(cfg)
    split_dir = _split_dir(root, splits.parse_split(cfg.split)[0])
    _report_bad(found, cfg.on_bad_image or "skip", split_dir)
    if len(paths) == 0:
        raise DataError(f"no readable images in split {cfg.split!r} of {_root(cfg)!r}")
    idx = splits.shard(np.arange(len(paths)), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices({"path": paths[idx].astype(str), "label": labels[idx]})
    return Records(
        ds,
        parse=_read,
        num_examples=len(idx),
        max_examples=splits.max_shard_size(len(paths), process_count),
    )


def num_examples(cfg) -> int:
    """Readable images in ``cfg.split`` (all processes)."""
    return len(_select(cfg)[0])


def num_bad_examples(cfg) -> int:
    """Files of ``cfg.split`` skipped as unreadable (logged by the trainer as bad_images)."""
    return len(_select(cfg)[2].bad)


def num_classes(cfg) -> int:
    """Number of class folders over all splits."""
    return len(class_names(_root(cfg)))
