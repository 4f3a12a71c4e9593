"""Files of a run directory: atomic writes, JSON lines, checkpoints, provenance.

Everything is written so that a crash at any moment leaves the last good file in place: a new
file is written beside the old one, flushed, fsynced and renamed over it.

One module for every file of a run directory, because they share that write discipline and one
error convention (:class:`WriteError`, naming the file and the reason): atomic writes, the JSON
convention and JSON lines, checkpoints with their digest, the final ``model.pt``
(:func:`model_bytes`), the directory lock, provenance.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import pickle
import platform
import re
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from isgd.errors import CorruptCheckpoint, RunError, WriteError
from isgd.training.distributed import first_line

log = logging.getLogger(__name__)

__all__ = [
    "CorruptCheckpoint",
    "DirectoryLock",
    "JsonlWriter",
    "RunError",
    "WriteError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "load_latest_checkpoint",
    "provenance",
    "read_jsonl",
    "save_checkpoint",
]

# 2: the checkpoint is the composition of its parts' state_dict()s (isgd.training.train); older
# formats are refused in load_checkpoint, in one line
CHECKPOINT_FORMAT = 2
# A checkpoint file is this header, the SHA-256 of the rest, then torch.save's bytes: written in
# one atomic write, so the digest always travels with the bytes it covers.
CHECKPOINT_MAGIC = b"isgd-checkpoint\x00sha256\x00"


_WRITE_REASONS = {
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent of it is a file, not a directory",
}


def os_error_reason(err: OSError) -> str:
    """What went wrong, in words (``no space left on device (the disk is full)``)."""
    reason = _WRITE_REASONS.get(err.errno) if err.errno is not None else None
    return reason or err.strerror or type(err).__name__


def write_error(path: Path, err: OSError) -> WriteError:
    """A one-line :class:`WriteError` naming ``path`` and what went wrong."""
    return WriteError(f"cannot write {path}: {os_error_reason(err)}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TMP_SUFFIX = ".tmp"  # atomic writes go through ".NAME.<random>.tmp" beside NAME


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


# mkstemp creates 0600 files; run files get the mode open() would give them (0666 & ~umask)
FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files an atomic write left behind when the process was killed
    (they are never the only copy of anything); returns what was removed."""
    removed = []
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------------- lock
class DirectoryLock:
    """An exclusive lock on a run or comparison directory while one process works in it.

    ``flock`` on ``DIR/.lock``: the kernel releases it when the process ends, however it ends
    (SIGKILL included), so a stale lock never blocks a resume. The holder writes who it is into
    the file; a second process fails at once with one line naming it.
    """

    NAME = ".lock"

    def __init__(self, directory: Path, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        path = self.directory / self.NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunError(
                f"cannot lock the {self.what} {self.directory}: {os_error_reason(err)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(
                f"the {self.what} {self.directory} is in use by {holder}; wait for it to end "
                "or stop it, then run this command again"
            ) from None
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        note = f"process {os.getpid()} on {socket.gethostname()} ({command}, since {since})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Release the lock; ``remove`` also deletes the lock file first (only where no other
        process can be waiting for it: a directory whose creation failed)."""
        if self._fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    (self.directory / self.NAME).unlink()
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------- JSON
# One convention for every file isgd writes: strict JSON (RFC 8259 has no NaN or Infinity), with
# the non-finite floats written as the strings "inf", "-inf" and "nan" and read back as floats
# (``runs.jsonl`` writes a missed target as null plus a flag: isgd.experiments.records).
# Bare NaN/Infinity tokens are not JSON and are refused.
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as "inf"/"-inf"/"nan" and paths as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (:func:`jsonable` first)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def _restore(value: Any) -> Any:
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def loads(text: str) -> Any:
    """Parse JSON written by :func:`dumps`; a bare NaN/Infinity token is a ``JSONDecodeError``."""

    def refuse(token: str) -> Any:
        raise json.JSONDecodeError(f"{token} is not JSON (isgd writes it as a string)", text, 0)

    return json.loads(
        text,
        object_hook=lambda d: {k: _restore(v) for k, v in d.items()},
        parse_constant=refuse,
    )


def read_json(path: Path) -> Any:
    return loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


class JsonlWriter:
    """Appends one JSON object per line; ``flush()`` makes what was written durable."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as err:
            raise write_error(self.path, err) from None

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(dumps(record))

    def write_line(self, line: str) -> None:
        """One line already in JSON (without its newline)."""
        try:
            self._file.write(line + "\n")
        except OSError as err:
            raise write_error(self.path, err) from None

    def flush(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            raise write_error(self.path, err) from None

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.flush()
            finally:
                with contextlib.suppress(OSError):  # the flush above already reported it
                    self._file.close()


def numbered_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every line of a JSON-lines file — the one reader of isgd's
    ``*.jsonl`` files. A torn last line (a crash mid-write: no final newline) is skipped; any
    other line that is not a JSON object is a :class:`RunError` naming file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise RunError(f"{path}: {os_error_reason(err)}") from None
    except UnicodeDecodeError as err:
        raise RunError(f"{path}: cannot read ({err})") from None
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # only non-empty when the file lacks its final newline
                log.warning("%s:%d: ignoring a truncated last line", path, number)
                break
            raise RunError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}:{number}: expected a JSON object, got {record!r:.40}")
        rows.append((number, record))
    return rows


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file (:func:`numbered_jsonl` without the line numbers)."""
    for _, record in numbered_jsonl(path):
        yield record


def truncate_jsonl(path: Path, max_iteration: int) -> None:
    """Keep the records with ``iteration <= max_iteration`` (used when resuming)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("iteration", 0) <= max_iteration]
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, iteration: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``ckpt-<iteration>.pt`` and keep the newest ``keep`` checkpoints."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(directory, err) from None
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "iteration": iteration, **state}, buffer)
    payload = buffer.getvalue()
    path = directory / f"ckpt-{iteration:08d}.pt"
    atomic_write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)
    for old in sorted(directory.glob("ckpt-*.pt"))[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def model_bytes(model: torch.nn.Module) -> bytes:
    """``model.pt``: the model's ``state_dict``, contiguous and on the CPU, as ``torch.save``
    writes it."""
    buffer = io.BytesIO()
    torch.save({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("ckpt-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path, run_id: str | None = None) -> dict[str, Any]:
    """Load a checkpoint after checking its digest, without executing code (``weights_only``:
    tensors, numbers, strings and containers only; a pickle naming any other callable is refused
    unrun). With ``run_id``, a checkpoint that records another run's id is refused.

    A damaged file (digest mismatch, truncated, unreadable, unsafe, another run's) raises
    :class:`CorruptCheckpoint`; one of another format raises :class:`RunError`; both name the
    file and what to do. :func:`load_latest_checkpoint` falls back past damaged ones.
    """
    path = Path(path)
    fallback = _fallback_hint(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CorruptCheckpoint(
            f"cannot read checkpoint {path}: {os_error_reason(err)}; {fallback}"
        ) from None
    header = len(CHECKPOINT_MAGIC)
    if raw.startswith(CHECKPOINT_MAGIC):
        digest, payload = raw[header : header + 32], raw[header + 32 :]
        if hashlib.sha256(payload).digest() != digest:
            raise CorruptCheckpoint(
                f"checkpoint {path} is damaged: its SHA-256 digest does not match its contents "
                f"(a flipped bit, a truncated or edited file); {fallback}"
            )
    else:
        raise CorruptCheckpoint(f"{path} is not an isgd checkpoint (no header); {fallback}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one line only
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler refused something
        found = re.search(r"GLOBAL (\S+)", str(err))
        other = re.search(r"^\s*(Unsupported[^\n]*)", str(err), re.MULTILINE)
        what = (
            f"it names {found.group(1)}"
            if found
            else f"the safe loader refused it: {other.group(1).strip()}"
            if other
            else "the safe loader refused it"
        )
        raise CorruptCheckpoint(
            f"refusing to load checkpoint {path}: not a valid isgd checkpoint, and loading it "
            f"could run code ({what}); nothing from it was executed; {fallback}"
        ) from None
    except Exception as err:  # a truncated or corrupt file raises almost anything
        raise CorruptCheckpoint(
            f"cannot load checkpoint {path}: the file is truncated or corrupt "
            f"({type(err).__name__}: {first_line(err)}); {fallback}"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CorruptCheckpoint(f"{path} is not an isgd checkpoint (no format field); {fallback}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise RunError(
            f"{path} is a checkpoint of format {state['format']!r}, this isgd reads format "
            f"{CHECKPOINT_FORMAT}: resume with the isgd version that wrote it, or {fallback}"
        )
    saved_id = state.get("run_id")
    if run_id is not None and saved_id is not None and saved_id != run_id:
        raise CorruptCheckpoint(
            f"checkpoint {path} belongs to another run (run id {saved_id}, this run is "
            f"{run_id}: copied here from elsewhere?); {fallback}"
        )
    return state


def load_latest_checkpoint(
    directory: Path, run_id: str | None = None
) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest intact checkpoint of ``directory`` and its path, ``(None, None)`` if there is
    none at all. A damaged one (:class:`CorruptCheckpoint`) is renamed ``*.pt.damaged`` — kept
    for inspection, never picked again — and the previous one is tried, saying so in one line.
    Raises :class:`CorruptCheckpoint` when checkpoints exist but none is intact."""
    found = sorted(Path(directory).glob("ckpt-*.pt"))
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, run_id)
        except CorruptCheckpoint as err:
            problems.append(str(err).split("; ")[0])
            aside = path.with_name(path.name + ".damaged")
            with contextlib.suppress(OSError):
                path.replace(aside)
            older = [p for p in found if p.name < path.name]
            log.warning(
                "%s; %s",
                problems[-1],
                f"moved aside to {aside.name}, falling back to {older[-1].name}"
                if older
                else f"moved aside to {aside.name}",
            )
            continue
        return state, path
    if problems:
        raise CorruptCheckpoint(
            f"no intact checkpoint in {directory} ({len(problems)} damaged, moved aside as "
            "*.pt.damaged); resume again to restart the run from the beginning, or start a "
            "new run with --out"
        )
    return None, None


def _fallback_hint(path: Path) -> str:
    older = [p for p in sorted(path.parent.glob("ckpt-*.pt")) if p.name < path.name]
    if older:
        return f"delete it to resume from the previous checkpoint {older[-1].name}"
    return "delete it to restart the run from the beginning with --resume"


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
