"""CIFAR-10 into the data directory: the official tarball (downloaded, md5-checked) or a local copy.

``isgd data fetch cifar10`` downloads ``cifar-10-python.tar.gz`` from its home page, checks its
md5 and extracts the six python batches into ``<data dir>/cifar10/``. ``--from PATH`` takes a local
copy instead:

- the official tarball, or a folder holding its python (or binary) batches;
- an image-folder tree ``train/<class>/*``, ``test/<class>/*`` (a folder or a tar of one, such as
  the JPEG copy of CIFAR-10), decoded at its native 32×32 — an image of another size is refused,
  never warped — and stored as CIFAR-10 binary batches.

The folder also holds ``source.json``: where the copy came from and its *variant*, the name
results carry. A JPEG-encoded copy is not the official pixels; its quality factor is read off the
files' quantisation tables, so a run on it is labelled ``CIFAR-10 (JPEG q75)``, never ``CIFAR-10``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from isgd.data.download import download_checked
from isgd.data.sources import DataError

__all__ = [
    "CLASSES",
    "OFFICIAL_MD5",
    "OFFICIAL_URL",
    "SOURCE_FILE",
    "fetch_cifar10",
    "read_source",
]

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = (  # label ids 0-9 of the official batches (also their sorted order)
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SOURCE_FILE = "source.json"
PY_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def read_source(directory: Path) -> dict[str, str]:
    """``source.json`` of a CIFAR-10 folder; a folder without one holds the official batches."""
    try:
        return dict(json.loads((directory / SOURCE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {"variant": "CIFAR-10"}


def fetch_cifar10(
    dest: Path, source: str | os.PathLike[str] | None = None, *, url: str | None = None
) -> Path:
    """Fill ``dest`` with CIFAR-10 from ``url`` (default: the official tarball's home) or the
    local ``source``; ``dest`` is replaced only once everything is decoded and checked."""
    dest, url = Path(dest), url or OFFICIAL_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cifar10-", dir=dest.parent) as tmp:
        work = Path(tmp)
        staged = work / "cifar10"
        staged.mkdir()
        start = time.perf_counter()
        if source is None:
            tarball = work / "cifar-10-python.tar.gz"
            _download(url, tarball)
            origin = {"variant": "CIFAR-10", "origin": url, "md5": _md5_of(tarball)}
            _extract_batches(tarball, staged)
        else:
            origin = _ingest_local(Path(source).expanduser(), staged)
        (staged / SOURCE_FILE).write_text(json.dumps(origin, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    log.info(
        "%s from %s is ready in %s (%.1f s)",
        origin["variant"],
        origin["origin"],
        dest,
        time.perf_counter() - start,
    )
    return dest


# ------------------------------------------------------------------ the official tarball
def _download(url: str, path: Path) -> None:
    """Download ``url`` to ``path``, refusing it unless its md5 is the official one."""
    download_checked(
        url,
        path,
        "md5",
        OFFICIAL_MD5,
        "download cifar-10-python.tar.gz elsewhere and pass it with "
        "`isgd data fetch cifar10 --from FILE`",
    )


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return "not a regular file"


def _safe_members(
    tar: tarfile.TarFile, name: str
) -> Iterator[tuple[PurePosixPath, tarfile.TarInfo]]:
    """The regular files of ``tar``; an unsafe path, a link or a device is refused by name (an
    extraction that skipped it would be an incomplete data set, silently)."""
    for member in tar:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{name}: unsafe member path {member.name!r}; refusing")
        if member.isfile():
            yield path, member
        elif not member.isdir():
            raise DataError(
                f"{name}: member {member.name!r} is {_member_kind(member)}; a CIFAR-10 copy "
                "holds only files and folders: refusing it (nothing was installed)"
            )


def _extract_batches(tarball: Path, staged: Path) -> None:
    """The six python batches of the official tarball (any folder inside it) into ``staged``."""
    found = set()
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for path, member in _safe_members(tar, tarball.name):
                if path.name in PY_BATCHES and path.name not in found:
                    src = tar.extractfile(member)
                    if src is not None:
                        with src, open(staged / path.name, "wb") as out:
                            shutil.copyfileobj(src, out)
                        found.add(path.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tarball}: not a readable tarball ({e})") from None
    missing = [n for n in PY_BATCHES if n not in found]
    if missing:
        raise DataError(f"{tarball}: no CIFAR-10 python batches {', '.join(missing)} inside")


# ------------------------------------------------------------------------ local copies
def _ingest_local(source: Path, staged: Path) -> dict[str, str]:
    if not source.exists():
        raise DataError(f"--from {source}: no such file or folder")
    if source.is_dir():
        batches = [
            d for d in (source, source / "cifar-10-batches-py") if (d / "data_batch_1").is_file()
        ]
        if batches:
            for name in PY_BATCHES:
                if not (batches[0] / name).is_file():
                    raise DataError(f"{batches[0]}: {name} is missing")
                _check_python_batch(batches[0] / name)
                shutil.copyfile(batches[0] / name, staged / name)
            return {"variant": "CIFAR-10", "origin": str(source.resolve())}
        images = _folder_images(source)
    else:
        if not tarfile.is_tarfile(source):
            raise DataError(
                f"--from {source}: not a tarball or folder (expected cifar-10-python.tar.gz, "
                "its extracted folder, or an image folder train/<class>/, test/<class>/)"
            )
        md5 = _md5_of(source)
        if md5 == OFFICIAL_MD5:
            _extract_batches(source, staged)
            return {"variant": "CIFAR-10", "origin": str(source.resolve()), "md5": md5}
        if _tar_has_batches(source):
            raise DataError(
                f"{source}: holds CIFAR-10 python batches but its md5 {md5} is not the official "
                f"{OFFICIAL_MD5}; refusing a modified copy"
            )
        images = _tar_images(source)
        origin = _write_image_folder(images, staged, str(source))
        return {**origin, "origin": str(source.resolve()), "md5": md5}
    return {**_write_image_folder(images, staged, str(source)), "origin": str(source.resolve())}


def _check_python_batch(path: Path) -> None:
    """A python batch as training will read it: uint8 N×3072 images, one label 0-9 each."""
    from isgd.data import read_cifar_python_batch

    _, y = read_cifar_python_batch(path)  # DataError naming the file: not a batch, wrong shape
    if len(y) == 0:
        raise DataError(f"{path}: a CIFAR-10 python batch without images")
    if int(y.min()) < 0 or int(y.max()) >= len(CLASSES):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{path}: label {bad} is not a CIFAR-10 class id (0-9)")


def _tar_has_batches(tarball: Path) -> bool:
    with tarfile.open(tarball, "r:*") as tar:
        return any(PurePosixPath(m.name).name == "data_batch_1" for m in tar.getmembers())


def _split_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(..., train|test, <class>, file)`` → (split, class); anything else is skipped."""
    if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_SUFFIXES):
        return None
    split, label = parts[-3].lower(), parts[-2].lower()
    return (split, label) if split in ("train", "test") else None


def _folder_images(root: Path) -> Iterator[tuple[str, str, str, bytes]]:
    for path in sorted(root.rglob("*")):
        key = _split_class(path.relative_to(root).parts) if path.is_file() else None
        if key is not None:
            yield (*key, str(path), path.read_bytes())


def _tar_images(tarball: Path) -> Iterator[tuple[str, str, str, bytes]]:
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for path, member in _safe_members(tar, tarball.name):
                key = _split_class(path.parts)
                src = tar.extractfile(member) if key is not None else None
                if key is not None and src is not None:
                    with src:
                        yield (*key, f"{tarball.name}:{path}", src.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tarball}: not a readable tarball ({e})") from None


def jpeg_quality(quantization: dict[int, list[int]]) -> int | None:
    """The IJG quality factor (1-100) whose tables libjpeg writes, or None if none matches."""
    return _quality_tables().get(_table_key(quantization))


def _table_key(quantization: dict[int, list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(quantization[k]) for k in sorted(quantization))


_QUALITY_CACHE: dict[tuple[tuple[int, ...], ...], int] = {}


def _quality_tables() -> dict[tuple[tuple[int, ...], ...], int]:
    """Quantisation tables → quality, from libjpeg itself (one 8×8 encode per quality)."""
    if not _QUALITY_CACHE:
        from PIL import Image

        for q in range(100, 0, -1):  # where two qualities share tables, the lower one wins
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buffer, "JPEG", quality=q)
            with Image.open(buffer) as image:
                _QUALITY_CACHE[_table_key(image.quantization)] = q
    return _QUALITY_CACHE


def _write_image_folder(
    images: Iterator[tuple[str, str, str, bytes]], staged: Path, shown: str
) -> dict[str, str]:
    """Decode every image (32×32 RGB, no resizing) into CIFAR-10 binary batches in ``staged``."""
    from PIL import Image, UnidentifiedImageError

    bombs = (Image.DecompressionBombError, Image.DecompressionBombWarning)

    records: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    formats: Counter[str] = Counter()
    qualities: Counter[int | None] = Counter()
    for split, label, where, payload in images:
        if label not in CLASSES:
            raise DataError(
                f"{where}: class folder {label!r} is not a CIFAR-10 class ({', '.join(CLASSES)})"
            )
        try:
            with warnings.catch_warnings():  # a header claiming a huge image: refused unread
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(payload))
        except bombs as e:
            claimed = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(claimed[1]):,} pixels" if claimed else "an image far larger than 32×32"
            raise DataError(
                f"{where}: its header claims {size} (a decompression bomb?); CIFAR-10 images "
                "are 32×32: refused unread"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{where}: not a readable image ({e})") from None
        try:
            with opened as image:
                if image.size != (32, 32):
                    raise DataError(
                        f"{where}: {image.size[0]}×{image.size[1]} image; CIFAR-10 images are "
                        "32×32 and are never resized here"
                    )
                formats[str(image.format)] += 1
                if image.format == "JPEG":
                    qualities[jpeg_quality(image.quantization)] += 1
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{where}: not a readable image ({e})") from None
        record = np.empty(3073, dtype=np.uint8)
        record[0] = CLASSES.index(label)
        record[1:] = pixels.transpose(2, 0, 1).reshape(-1)  # the batches' R, G, B planes
        records[split].append(record)
    for split in ("train", "test"):
        if not records[split]:
            raise DataError(f"{shown}: no images under {split}/<class>/ (both splits are needed)")
        counts = Counter(int(r[0]) for r in records[split])
        if len(counts) != len(CLASSES):
            absent = [c for i, c in enumerate(CLASSES) if i not in counts]
            raise DataError(f"{shown}: {split}/ has no images of {', '.join(absent)}")
    # a folder lists its images class by class; like the official batches, the stored order is
    # mixed (a fixed permutation), so that a held-out tail of the training set has every class
    rng = np.random.default_rng(0)
    train, test = (np.stack(records[s]) for s in ("train", "test"))
    train, test = train[rng.permutation(len(train))], test[rng.permutation(len(test))]
    for i, part in enumerate(np.array_split(train, 5), start=1):
        part.tofile(staged / f"data_batch_{i}.bin")
    test.tofile(staged / "test_batch.bin")
    return {
        "variant": _variant(formats, qualities),
        "format": "image folder",
        "images": f"{len(train)} train, {len(test)} test",
    }


def _variant(formats: Counter[str], qualities: Counter[int | None]) -> str:
    if set(formats) == {"PNG"}:
        return "CIFAR-10 (PNG)"
    if set(formats) == {"JPEG"} and len(qualities) == 1 and None not in qualities:
        return f"CIFAR-10 (JPEG q{next(iter(qualities))})"
    return "CIFAR-10 (" + ", ".join(sorted(formats)) + ", re-encoded)"
