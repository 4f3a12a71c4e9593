"""Files of a run directory: atomic writes, JSON lines, checkpoints, provenance.

Everything is written so that a crash at any moment leaves the last good file in place: a new
file is written beside the old one, flushed, fsynced and renamed over it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "JsonlWriter",
    "RunError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "provenance",
    "read_jsonl",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1


class RunError(Exception):
    """A problem with a run directory or checkpoint, reported as one line."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {obj!r}")


class JsonlWriter:
    """Appends one JSON object per line; ``flush()`` makes what was written durable."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if f.read(1) == "":  # a torn last line from a crash: ignore it
                    return
                raise RunError(f"{path}:{number}: not a JSON line") from None


def truncate_jsonl(path: Path, max_iteration: int) -> None:
    """Keep the records with ``iteration <= max_iteration`` (used when resuming)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("iteration", 0) <= max_iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, iteration: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``ckpt-<iteration>.pt`` and keep the newest ``keep`` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "iteration": iteration, **state}, buffer)
    path = directory / f"ckpt-{iteration:08d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in sorted(directory.glob("ckpt-*.pt"))[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("ckpt-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(
            f"{path} is not an isgd checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found format {state.get('format') if isinstance(state, dict) else None!r})"
        )
    return state


# ---------------------------------------------------------------------- provenance
def provenance(threads: int) -> dict[str, Any]:
    import numpy

    import isgd

    return {
        "isgd": isgd.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "command": sys.argv,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")
