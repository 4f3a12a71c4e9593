"""Image data sets held in memory as uint8 tensors.

IDX and CIFAR-10 readers and :func:`load_dataset`, which fetches MNIST/Fashion-MNIST when missing
(:mod:`isgd.data.sources`: data directory, md5 checks, fetch). Preprocessing is in
:mod:`isgd.data.preprocess`, CIFAR-10's fetch in :mod:`isgd.data.cifar10`, memory-mapped sets in
:mod:`isgd.data.packed`, the list of data sets in :mod:`isgd.data.registry`, Shakespeare's works
(text, for the character language model) in :mod:`isgd.data.shakespeare`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from isgd.data import registry as datasets
from isgd.data.preprocess import Preprocess
from isgd.data.sources import (
    SOURCES,
    DataError,
    DataSource,
    default_data_dir,
    fetch,
    find_idx_file,
    open_maybe_gzip,
    resolve_data_dir,
    verify_files,
)

__all__ = [
    "IDX_NAMES",
    "SOURCES",
    "DataError",
    "DataSource",
    "DataSplit",
    "Preprocess",
    "default_data_dir",
    "fetch",
    "idx_digests",
    "load_cifar10",
    "load_dataset",
    "load_idx_dir",
    "read_cifar_python_batch",
    "read_idx",
    "verify_files",
]

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_IDX_BYTES = 1 << 34  # a header asking for more than 16 GiB is garbage, not a data set


# ----------------------------------------------------------------------------------- IDX files
def _dims_text(dims: tuple[int, ...]) -> str:
    """``dims`` for a message: all of a plausible header, the start of a garbage one."""
    if len(dims) <= 4:
        return f"dims {dims}"
    return f"{len(dims)} dims ({', '.join(map(str, dims[:3]))}, ...)"


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (raw or gzipped, detected by its magic bytes) into a tensor.

    The header (two zero bytes, a dtype code, the number of dims, then each dim as a big-endian
    int32) must match the payload exactly; anything else raises :class:`DataError`.
    """
    path = Path(path)
    try:
        with open_maybe_gzip(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic {head.hex() or 'empty'})")
            ndim = head[3]
            if ndim == 0:
                raise DataError(f"{path}: corrupt IDX header (0 dimensions)")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            count = math.prod(dims)  # a Python int: a garbage header cannot wrap around
            expected = count * dtype.itemsize
            if expected > _MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: corrupt IDX header ({_dims_text(dims)}: over "
                    f"{_MAX_IDX_BYTES >> 30} GiB of data)"
                )
            out = np.empty(count, dtype=dtype)
            view, got = memoryview(out).cast("B"), 0  # type: ignore[arg-type]  # numpy stubs
            while got < expected:
                n = f.readinto(view[got:])  # type: ignore[attr-defined]  # a file or GzipFile
                if not n:
                    break
                got += n
            if got < expected:
                raise DataError(
                    f"{path}: truncated IDX file: {_dims_text(dims)} need {expected} data bytes, "
                    f"found {got}"
                )
            if f.read(1):
                raise DataError(f"{path}: corrupt IDX file: data continues past {_dims_text(dims)}")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if dtype.itemsize > 1:
        out = out.astype(dtype.newbyteorder("="))
    return torch.from_numpy(out.reshape(dims))


# ------------------------------------------------------------------------------------ DataSplit
def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 images in [0, 1] units, via a 256-bin histogram."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


@dataclasses.dataclass(eq=False)
class DataSplit:
    """Train and test split in memory: images uint8 ``N×C×H×W``, labels int64 ``N``.

    ``mean``/``std`` are the per-channel statistics of the training images in [0, 1] units
    (MNIST: 0.1307/0.3081), the ones :class:`Preprocess` uses for ``standardize``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...] = dataclasses.field(init=False)
    std: tuple[float, ...] = dataclasses.field(init=False)
    _mean_image: Tensor | None = dataclasses.field(default=None, init=False, repr=False)
    # what results call the data: "CIFAR-10 (JPEG q75)" for a re-encoded copy (isgd.data.cifar10)
    variant: str = dataclasses.field(default="", init=False)
    # precomputed statistics (a packed set on disk): skips the pass over the training images
    channel_stats: dataclasses.InitVar[tuple[tuple[float, ...], tuple[float, ...]] | None] = None
    pixel_mean: dataclasses.InitVar[Tensor | None] = None

    def __post_init__(self, channel_stats, pixel_mean) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(
                    f"{self.name}: {split} images must be uint8 N×C×H×W, got "
                    f"{x.dtype} {tuple(x.shape)}"
                )
            if y.dim() != 1 or len(y) != len(x):
                raise DataError(
                    f"{self.name}: {len(x)} {split} images but labels of shape {tuple(y.shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(f"{self.name}: {split} labels outside [0, {self.num_classes})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images {tuple(self.x_train.shape[1:])} and "
                f"test images {tuple(self.x_test.shape[1:])} differ in shape"
            )
        self.y_train = self.y_train.long()
        self.y_test = self.y_test.long()
        self.mean, self.std = channel_stats or _channel_stats(self.x_train)
        self._mean_image = pixel_mean

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """Height of the images (all data sets here have square images)."""
        return int(self.x_train.shape[2])

    def hold_out(self, n_val: int) -> DataSplit:
        """The last ``n_val`` training samples as the test split, the rest as training (for
        tuning; the real test split stays untouched). Keeps this set's normalisation statistics,
        so nothing is recomputed over the (possibly memory-mapped) training images."""
        return DataSplit(
            f"{self.name}[tune]",
            self.x_train[:-n_val],
            self.y_train[:-n_val],
            self.x_train[-n_val:],
            self.y_train[-n_val:],
            self.num_classes,
            channel_stats=(self.mean, self.std),
            pixel_mean=self.mean_image(),
        )

    def mean_image(self) -> Tensor:
        """Per-pixel mean of the training images, ``C×H×W`` float32 in pixel units (0..255)."""
        if self._mean_image is None:
            total = torch.zeros(self.x_train.shape[1:], dtype=torch.float64)
            for chunk in self.x_train.split(8192):
                total += chunk.sum(0, dtype=torch.float64)
            self._mean_image = (total / max(len(self.x_train), 1)).float()
        return self._mean_image


def load_idx_dir(
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    num_classes: int | None = None,
    hint: str = "",
) -> DataSplit:
    """Load the four standard IDX files of ``directory`` (raw or gzipped, either naming style).

    ``num_classes`` defaults to the largest label + 1; ``hint`` ends the missing-files message.
    """
    directory = Path(directory)
    paths = {n: find_idx_file(directory, n) for n in IDX_NAMES}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"missing IDX files in {directory}: {', '.join(missing)} (or .gz)"
            + (f"; {hint}" if hint else "")
        )
    t = {n: read_idx(p) for n, p in paths.items()}  # type: ignore[arg-type]
    for n in IDX_NAMES:
        want = 3 if "images" in n else 1
        if t[n].dim() != want or t[n].dtype != torch.uint8:
            raise DataError(
                f"{paths[n]}: expected {want}-d uint8 data, got {t[n].dtype} {tuple(t[n].shape)}"
            )
    x_train, y_train, x_test, y_test = (t[n] for n in IDX_NAMES)
    if num_classes is None:
        num_classes = max((int(y.max()) for y in (y_train, y_test) if len(y)), default=-1) + 1
    return DataSplit(
        name or directory.name,
        x_train.unsqueeze(1),
        y_train.long(),
        x_test.unsqueeze(1),
        y_test.long(),
        num_classes,
    )


def idx_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of each IDX file of ``directory`` as it lies on disk (a run's provenance)."""
    digests = {}
    for name in IDX_NAMES:
        path = find_idx_file(directory, name)
        if path is not None:
            digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# ---------------------------------------------------------------------------------- CIFAR-10
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_reconstruct() -> Callable[..., object]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, ints and numpy arrays; refuses every other global."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Callable[[], object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> object:
        get = self._ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return get()


CIFAR_PY_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR_BIN_FILES = tuple(f"{n}.bin" for n in CIFAR_PY_FILES)


def read_cifar_python_batch(path: Path) -> tuple[Tensor, Tensor]:
    """Images ``N×3×32×32`` uint8 and labels of one CIFAR-10 python batch, unpickled with only
    numpy arrays, dicts, lists and bytes allowed; :class:`DataError` for anything else."""
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a malformed pickle raises almost anything
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise DataError(f"{path}: 'data' must be a uint8 N×3072 array")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise DataError(f"{path}: 'labels' must list one label per image ({len(data)})")
    x = torch.from_numpy(np.require(data, np.uint8, ["C", "W"])).view(-1, 3, 32, 32)
    return x, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _cifar_binary_batch(path: Path) -> tuple[Tensor, Tensor]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(
            f"{path}: size {raw.size} is not a multiple of 3073 (1 label + 3072 "
            "pixel bytes per record): truncated or not a CIFAR-10 binary batch"
        )
    records = raw.reshape(-1, 3073)
    return torch.from_numpy(records[:, 1:].copy()).view(-1, 3, 32, 32), torch.from_numpy(
        records[:, 0].astype(np.int64)
    )


def load_cifar10(directory: str | os.PathLike[str]) -> DataSplit:
    """Load CIFAR-10 from the python batches (``data_batch_1..5``, ``test_batch``) or the binary
    ones (``*.bin``) in ``directory`` or its ``cifar-10-batches-py``/``-bin`` subfolder."""
    directory = Path(directory)
    for folder in (
        directory,
        directory / "cifar-10-batches-py",
        directory / "cifar-10-batches-bin",
    ):
        for names, reader in (
            (CIFAR_PY_FILES, read_cifar_python_batch),
            (CIFAR_BIN_FILES, _cifar_binary_batch),
        ):
            if all((folder / n).is_file() for n in names):
                parts = [reader(folder / n) for n in names]
                return DataSplit(
                    "cifar10",
                    torch.cat([x for x, _ in parts[:5]]),
                    torch.cat([y for _, y in parts[:5]]),
                    parts[5][0],
                    parts[5][1],
                    10,
                )
    raise DataError(
        f"CIFAR-10 not found in {directory}: expected {', '.join(CIFAR_PY_FILES)} (python format) "
        "or the same names with .bin; fetch it with `isgd data fetch cifar10` (downloads "
        "cifar-10-python.tar.gz; `--from FILE` takes a copy downloaded elsewhere)"
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> DataSplit:
    """Load ``mnist``, ``fashion-mnist``, ``cifar10``, ``imagenet`` (packed, in the data
    directory), ``idx:DIR`` (any IDX folder) or ``packed:DIR`` (memory-mapped arrays made by
    ``isgd data pack``, :mod:`isgd.data.packed`).

    With ``download`` a missing or corrupt MNIST/Fashion-MNIST is fetched first.
    """
    if name.startswith("idx:"):
        return load_idx_dir(Path(name[4:]).expanduser(), name=name)
    if name.startswith("packed:"):
        from isgd.data.packed import load_packed

        return load_packed(Path(name[7:]).expanduser(), name=name)
    root = resolve_data_dir(data_dir)
    if name == "shakespeare":
        raise DataError(
            "shakespeare is text, not images: train on it with --preset charlm-shakespeare"
        )
    if name in SOURCES:
        source = SOURCES[name]
        if download:
            directory = fetch(name, root)
        else:
            directory = root / source.subdir
            verify_files(
                directory,
                source.checksums,
                hint=f"fetch it with `isgd data fetch {name} --data-dir {root}`",
            )
        return load_idx_dir(directory, name=name, num_classes=10)
    if name == "cifar10":
        from isgd.data.cifar10 import read_source

        data = load_cifar10(root / "cifar10")
        data.variant = read_source(root / "cifar10")["variant"]
        return data
    if name == "imagenet":
        from isgd.data.packed import load_packed

        directory = root / "imagenet"
        if not (directory / "meta.json").is_file():
            raise DataError(
                f"ImageNet not found in {directory}: no reachable registry ships it; pack the "
                f"ILSVRC-2012 image folder (train/<wnid>/, val/<wnid>/) there with `isgd data pack "
                f"SRC {directory}`"
            )
        return load_packed(directory, name=name)
    raise DataError(f"unknown data set {name!r}; known: {', '.join(datasets.KNOWN)}")
