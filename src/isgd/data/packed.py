"""Packed image sets on disk: large data (ImageNet) as memory-mapped uint8 arrays.

MNIST and CIFAR-10 fit in memory; ImageNet at 256×256 does not (≈ 250 GB). ``isgd data pack``
turns an image folder into a *packed directory*, read back memory-mapped as ``packed:DIR``, so a
training step gathers its batch's rows from the page cache and only the rows it touches are read:

``meta.json``
    ``{"format": "isgd-packed", "version": 1, "classes": [...], "size": S, "channels": 3,
    "train": N, "test": M, "mean": [...], "std": [...]}`` — per-channel statistics in [0, 1] units.
``train_images.npy``, ``test_images.npy``
    uint8 ``N×C×S×S``.
``train_labels.npy``, ``test_labels.npy``
    int64 class indices into ``classes``.
``mean_image.npy``
    float32 ``C×S×S``, the per-pixel training mean in pixel units (Caffe's mean file).

Images are resized to ``S×S`` with bilinear interpolation, ignoring the aspect ratio, as Caffe's
``create_imagenet.sh`` did (``RESIZE_HEIGHT=RESIZE_WIDTH=256``) for the AlexNet of the paper;
training then takes random ``crop_size`` crops (227 for AlexNet) and evaluation the centre crop.
The source is an image folder: ``SRC/train/<class>/<image>`` and ``SRC/val/<class>/<image>``
(or ``test/``), classes the sorted names of ``train/``'s folders — the layout ImageNet's
training set comes in, and its validation set once sorted into class folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from isgd.data.sources import DataError

__all__ = ["FORMAT", "load_packed", "pack_image_folder"]

FORMAT = {"format": "isgd-packed", "version": 1}
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------- reading
def load_packed(directory: str | os.PathLike[str], *, name: str | None = None):
    """A :class:`~isgd.data.DataSplit` over the memory-mapped arrays of a packed directory."""
    from isgd.data import DataSplit

    directory = Path(directory)
    meta = _read_meta(directory)
    arrays = {}
    for split in SPLITS:
        for kind in ("images", "labels"):
            path = directory / f"{split}_{kind}.npy"
            try:  # copy-on-write: writable for torch, never written back to the file
                arrays[split, kind] = np.load(path, mmap_mode="c", allow_pickle=False)
            except FileNotFoundError:
                raise DataError(
                    f"{directory}: missing {path.name} (not a packed directory?)"
                ) from None
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not a readable .npy array ({e})") from e
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        want = (meta[split], meta["channels"], meta["size"], meta["size"])
        if images.dtype != np.uint8 or images.shape != want:
            raise DataError(
                f"{directory}: {split}_images.npy is {images.dtype} {images.shape}, meta.json "
                f"says uint8 {want}"
            )
        if labels.dtype != np.int64 or labels.shape != (meta[split],):
            raise DataError(
                f"{directory}: {split}_labels.npy is {labels.dtype} {labels.shape}, expected "
                f"int64 ({meta[split]},)"
            )
    try:
        mean_image = np.load(directory / "mean_image.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{directory}: cannot read mean_image.npy ({e})") from e
    if mean_image.shape != want[1:]:
        raise DataError(f"{directory}: mean_image.npy is {mean_image.shape}, expected {want[1:]}")
    return DataSplit(
        name or f"packed:{directory}",
        torch.from_numpy(arrays["train", "images"]),
        torch.from_numpy(arrays["train", "labels"]),
        torch.from_numpy(arrays["test", "images"]),
        torch.from_numpy(arrays["test", "labels"]),
        len(meta["classes"]),
        channel_stats=(tuple(meta["mean"]), tuple(meta["std"])),
        pixel_mean=torch.from_numpy(mean_image.astype(np.float32)),
    )


def _read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{directory}: no meta.json (not a packed directory; make one with `isgd data pack "
            "SRC DST`)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(meta, dict) or {k: meta.get(k) for k in FORMAT} != FORMAT:
        raise DataError(f"{path}: not an {FORMAT['format']} v{FORMAT['version']} meta file")
    keys = ("classes", "size", "channels", *SPLITS, "mean", "std")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}")
    return meta


# ---------------------------------------------------------------------------------- packing
def _scan(source: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes (from ``train/``) and each split's (file, label) list, sorted."""
    if not (source / "train").is_dir():
        raise DataError(f"{source}: expected an image folder with train/<class>/ subfolders")
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{source}/train has no class folders")
    test_dir = next((source / n for n in ("val", "test") if (source / n).is_dir()), None)
    if test_dir is None:
        raise DataError(f"{source}: expected val/<class>/ (or test/<class>/) beside train/")
    index = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, root in (("train", source / "train"), ("test", test_dir)):
        unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in index)
        if unknown:
            raise DataError(f"{root}: class folders not in train/: {', '.join(unknown[:5])}")
        files[split] = [
            (f, index[c.name])
            for c in sorted(root.iterdir())
            if c.is_dir()
            for f in sorted(c.iterdir())
            if f.is_file() and not f.name.startswith(".")
        ]
        if not files[split]:
            raise DataError(f"{root}: no image files")
    return classes, files


def _decode(job: tuple[str, int, str]) -> np.ndarray:
    """One image file → uint8 ``C×S×S`` (RGB, or L for ``mode='L'``), bilinear warp to S×S."""
    from PIL import Image, UnidentifiedImageError

    path, size, mode = job
    try:
        with Image.open(path) as image:
            image = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decoded(jobs: list[tuple[str, int, str]], workers: int) -> Iterator[np.ndarray]:
    """The decoded images in order; at most ``workers × 64`` of them in memory at a time."""
    if workers <= 1:
        yield from map(_decode, jobs)
        return
    step = workers * 64
    with ProcessPoolExecutor(workers) as pool:
        for start in range(0, len(jobs), step):
            yield from pool.map(_decode, jobs[start : start + step], chunksize=16)


def pack_image_folder(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    size: int = 256,
    grayscale: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Pack ``source`` (an image folder, see the module docstring) into ``destination``.

    Every array is written under a temporary name and renamed when complete, ``meta.json`` last:
    an interrupted pack leaves no directory that :func:`load_packed` would accept.
    """
    from tqdm.auto import tqdm

    source, destination = Path(source), Path(destination)
    if size < 8:
        raise DataError(f"invalid size: {size} (must be >= 8 pixels)")
    if destination.exists() and any(destination.iterdir()):
        raise DataError(f"{destination} exists and is not empty")
    classes, files = _scan(source)
    channels, mode = (1, "L") if grayscale else (3, "RGB")
    destination.mkdir(parents=True, exist_ok=True)
    counts = np.zeros((channels, 256), dtype=np.int64)
    pixel_sum = np.zeros((channels, size, size), dtype=np.float64)
    bar = tqdm(total=sum(map(len, files.values())), disable=not progress, unit="img")
    for split in SPLITS:
        jobs = [(str(f), size, mode) for f, _ in files[split]]
        partial = destination / f"{split}_images.npy.partial"
        out = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.uint8, shape=(len(jobs), channels, size, size)
        )
        for i, pixels in enumerate(_decoded(jobs, workers)):
            out[i] = pixels
            if split == "train":
                pixel_sum += pixels
                for c in range(channels):
                    counts[c] += np.bincount(pixels[c].ravel(), minlength=256)
            bar.update(1)
        out.flush()
        del out
        partial.rename(destination / f"{split}_images.npy")
        labels = np.array([label for _, label in files[split]], dtype=np.int64)
        np.save(destination / f"{split}_labels.npy", labels)
    bar.close()
    values = np.arange(256) / 255.0
    mean = (counts * values).sum(1) / counts.sum(1)
    std = np.sqrt((counts * (values[None] - mean[:, None]) ** 2).sum(1) / counts.sum(1))
    np.save(destination / "mean_image.npy", (pixel_sum / len(files["train"])).astype(np.float32))
    meta = {
        **FORMAT,
        "classes": classes,
        "size": size,
        "channels": channels,
        "train": len(files["train"]),
        "test": len(files["test"]),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "source": str(source.resolve()),
        "resize": "bilinear warp to size×size (Caffe create_imagenet.sh)",
    }
    partial = destination / ".meta.json.partial"  # renamed into place: meta.json whole or absent
    partial.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, destination / "meta.json")
    return destination
