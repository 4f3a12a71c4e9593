"""A run directory's lifecycle: create and lock it, train into it, resume it.

:func:`train` and :func:`resume` are the entry points of ``isgd train`` (and of ``isgd
compare``'s runs); the loop itself is :class:`isgd.training.train.Trainer`. A run directory is
created only once the data and the model are known to be good, locked while a process works in
it (:class:`isgd.training.runio.DirectoryLock`), and never overwritten.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import torch

from isgd.data import DataSplit, idx_digests
from isgd.errors import ConfigError, RunError
from isgd.training import distributed, runio
from isgd.training.config import MAX_ITERS, TrainConfig, dump_toml, load_toml, resolve_config
from isgd.training.distributed import DistContext
from isgd.training.signals import resume_hint
from isgd.training.train import Trainer
from isgd.training.workload import Workload, spec_digest

__all__ = ["check_new_run_dir", "is_debris", "prepare_run_dir", "resume", "train"]

log = logging.getLogger(__name__)


def is_debris(path: Path) -> bool:
    """What a process killed while creating a run leaves: the write probe, half-written files."""
    name = path.name
    return name in (".write-test", runio.DirectoryLock.NAME) or (
        name.startswith(".") and name.endswith(runio.TMP_SUFFIX)
    )


def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (
        not run_dir.is_dir() or any(not is_debris(p) for p in run_dir.iterdir())
    ):
        raise RunError(
            f"run directory {run_dir} already exists and is not empty; choose another --out, "
            f"or continue it with --resume {run_dir}"
        )


def prepare_run_dir(run_dir: Path) -> runio.DirectoryLock:
    """Create ``run_dir`` and lock it; the caller releases the lock when the run ends."""
    check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(
            f"cannot create the run directory {run_dir}: {runio.os_error_reason(err)}; "
            "choose another --out"
        ) from None
    lock = runio.DirectoryLock(run_dir).acquire()
    try:
        check_new_run_dir(run_dir)  # another process may have finished a run here meanwhile
    except RunError:
        lock.release()
        raise
    runio.remove_stale_temporaries(run_dir)
    return lock


def check_budget(config: TrainConfig, trainer: Trainer) -> None:
    """What only the data set's size shows: ``epochs`` too many iterations, a ``window`` that
    never fills within the run (ISGD would never act)."""
    if trainer.total > MAX_ITERS:
        raise ConfigError(
            f"invalid epochs: {config.epochs:g} ({trainer.n_b} batches per epoch make "
            f"{trainer.total} iterations; at most 10**12)"
        )
    if config.uses_isgd and config.window > trainer.total:
        raise ConfigError(
            f"invalid window: {config.window} (ISGD acts only once its window of batches has "
            f"filled, and this run has {trainer.total} iterations: it would never act; lower "
            "--window, or 0 for one epoch)"
        )


def _provenance(config: TrainConfig, trainer: Trainer, run_id: str) -> dict[str, Any]:
    """``provenance.json``: versions, machine, command, the data as results name it, the run id."""
    record = runio.provenance(config.threads)
    record["run_id"] = run_id
    record["data"] = trainer.workload.name
    if config.workload:
        record["workload"] = {"spec": config.workload, "sha256": spec_digest(config.workload)}
    elif config.dataset.startswith("idx:"):  # a user's files: which ones, exactly
        record["data_sha256"] = idx_digests(Path(config.dataset[4:]).expanduser())
    if trainer.world_size > 1:
        record["distributed"] = {
            "world_size": trainer.world_size,
            "batch_sizes": list(trainer.sizes),
            "backend": torch.distributed.get_backend(),
        }
    return record


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    data: DataSplit | None = None,
    workload: Workload | None = None,
    progress: bool | None = None,
    dist: DistContext | None = None,
    shares: Any = None,
) -> dict[str, Any]:
    """Train a fresh run into ``run_dir`` (which must not exist or be empty); ``data`` skips
    loading the data set (callers that train several runs on it load it once); ``workload``
    trains that :class:`~isgd.training.workload.Workload` instead of the configuration's.

    ``dist``: this process is one rank of a data-parallel job (every rank calls ``train`` with
    the same arguments); ``shares`` splits the global batch (see :class:`Trainer`). Rank 0 alone
    creates and writes the run directory.
    """
    run_dir = Path(run_dir)
    ctx = dist if dist is not None and dist.world_size > 1 else None
    # fail fast, before loading anything (under dist: rank 0 checks, every rank raises)
    distributed.on_main(ctx, lambda: check_new_run_dir(run_dir))
    trainer = Trainer(
        config, run_dir, data=data, data_dir=data_dir, workload=workload, dist=ctx, shares=shares
    )
    check_budget(config, trainer)
    held: list[runio.DirectoryLock] = []  # rank 0's lock on the run directory

    def create() -> str:
        held.append(prepare_run_dir(run_dir))  # created once data and model are known good
        run_id = uuid.uuid4().hex  # checkpoints carry it: one copied from another run is refused
        try:
            runio.atomic_write_text(run_dir / "config.toml", dump_toml(config))
            runio.write_json(run_dir / "provenance.json", _provenance(config, trainer, run_id))
        except runio.WriteError as err:
            todo = (
                f"continue with: {resume_hint(run_dir, trainer.world_size)}"
                if (run_dir / "config.toml").is_file()
                else "run the same command again"
            )
            raise runio.WriteError(f"{err}; once that is fixed, {todo}") from None
        return run_id

    try:
        trainer.run_id = distributed.on_main(ctx, create)
        log.info(
            "training %s with %s: %d iterations (%d batches per epoch) -> %s",
            config.workload_name,
            config.optimizer,
            trainer.total,
            trainer.n_b,
            run_dir,
        )
        return trainer.run(progress)
    finally:
        trainer.net = trainer.model  # let DDP (and its hold on the process group) go
        for lock in held:  # a run that could not be created leaves no lock file either
            lock.release(remove=not (run_dir / "config.toml").is_file())


def resume(
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    data: DataSplit | None = None,
    workload: Workload | None = None,
    progress: bool | None = None,
    dist: DistContext | None = None,
    shares: Any = None,
) -> dict[str, Any]:
    """Continue ``run_dir`` from its last checkpoint.

    ``data``, ``workload``: the run's data set or workload, already built (as for :func:`train`).
    Under ``dist`` rank 0 reads the run directory and hands the configuration and checkpoint to
    the other ranks (they need no access to it). With as many processes as before and no new
    ``shares``, the batch split and per-rank RNG states of the checkpoint are reused.
    """
    run_dir = Path(run_dir)
    ctx = dist if dist is not None and dist.world_size > 1 else None

    held: list[runio.DirectoryLock] = []  # rank 0's lock on the run directory

    def load() -> tuple[TrainConfig, dict[str, Any] | None, Path | None, str | None]:
        if not (run_dir / "config.toml").is_file():
            if run_dir.is_dir() and all(is_debris(p) for p in run_dir.iterdir()):
                raise RunError(
                    f"{run_dir} holds no run: it was stopped while being created, before "
                    "anything was trained; run the original command again (with the same --out: "
                    "the directory is reused)"
                )
            raise RunError(f"{run_dir} is not a run directory (no config.toml); nothing to resume")
        held.append(runio.DirectoryLock(run_dir).acquire())
        if (run_dir / "summary.json").is_file():
            raise RunError(f"{run_dir} has finished (summary.json is there); nothing to resume")
        config = resolve_config(config_file=run_dir / "config.toml")
        config.preset = load_toml(run_dir / "config.toml").get("preset", "")
        for directory in (run_dir, run_dir / "checkpoints"):  # left by a kill during a write
            runio.remove_stale_temporaries(directory)
        prov = run_dir / "provenance.json"
        run_id = runio.read_json(prov).get("run_id") if prov.is_file() else None
        # loaded before the data, so that a bad checkpoint fails fast; a damaged one is moved
        # aside and the previous one used, saying so
        checkpoint, checkpoint_path = runio.load_latest_checkpoint(run_dir / "checkpoints", run_id)
        if not prov.is_file():  # a kill before provenance.json was renamed into place
            run_id = (checkpoint or {}).get("run_id") or uuid.uuid4().hex
        if checkpoint is not None:  # its configuration is checked by Trainer.restore
            names = ["metrics.jsonl"] + (["steps.jsonl"] if config.step_records else [])
            for name in names:
                if not (run_dir / name).is_file():
                    log.warning(
                        "%s is missing from %s: its records before iteration %d are lost; the "
                        "run continues and records from there",
                        name,
                        run_dir,
                        checkpoint["iteration"],
                    )
        return config, checkpoint, checkpoint_path, run_id

    try:
        config, checkpoint, checkpoint_path, run_id = distributed.on_main(ctx, load)
        sizes = None
        saved = (checkpoint or {}).get("distributed") or {}
        if ctx is not None and shares is None and saved.get("world_size") == ctx.world_size:
            sizes = list(saved["batch_sizes"])
        trainer = Trainer(
            config,
            run_dir,
            data=data,
            data_dir=data_dir,
            workload=workload,
            dist=ctx,
            shares=shares,
            sizes=sizes,
        )
        trainer.run_id = run_id
        provenance = run_dir / "provenance.json"
        if trainer.is_main and not provenance.is_file():
            runio.write_json(provenance, _provenance(config, trainer, run_id))
            log.warning(
                "provenance.json was missing from %s (the run was stopped while writing it): "
                "written again, from this process's versions and machine",
                run_dir,
            )
        if checkpoint is None:
            log.info("no checkpoint in %s: starting it from the beginning", run_dir)
            if trainer.is_main:
                for name in ("metrics.jsonl", "steps.jsonl"):
                    (run_dir / name).unlink(missing_ok=True)
        else:
            trainer.restore(checkpoint, checkpoint_path)
            log.info("resuming %s from iteration %d", run_dir, trainer.state.iteration)
        try:
            return trainer.run(progress)
        finally:
            trainer.net = trainer.model  # let DDP (and its hold on the process group) go
    finally:
        for lock in held:
            lock.release()
