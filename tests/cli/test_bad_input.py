"""Bad input, table-driven: each case gets one line naming the problem and what to do.

Command-line cases must exit with code 2, print exactly one ``isgd: error:`` line and no
traceback, and leave every file that was there before byte-for-byte as it was. Library cases
raise the documented exception with the same one-line message.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from isgd import DistributedFixedCycleBatchSampler, FixedCycleBatchSampler, LossControlChart
from isgd.cli import main
from isgd.data import DataError, DataSplit
from isgd.optim import ISGD
from isgd.training import runio
from isgd.training.config import ConfigError, resolve_config
from isgd.training.lifecycle import resume, train
from isgd.training.runio import (
    JsonlWriter,
    RunError,
    WriteError,
    atomic_write_bytes,
    load_checkpoint,
)
from isgd.training.train import Trainer
from tests.conftest import tiny_train_argv
from tests.fixtures import write_idx

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"


def train_argv(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        idx_dir, out, "--iters", "50", "--eval-every", "25", "--checkpoint-every", "20", *extra
    )


@pytest.fixture(scope="module")
def finished(tiny_idx_dir, tmp_path_factory) -> Path:
    """A complete 50-iteration run (checkpoints at 20 and 40)."""
    out = tmp_path_factory.mktemp("bad-input") / "finished"
    assert main(train_argv(tiny_idx_dir, out)) == 0
    return out


@dataclass
class Ctx:
    """What a case may use: a scratch directory, the IDX set, a finished run, monkeypatch."""

    tmp: Path
    idx: Path
    finished: Path
    monkeypatch: pytest.MonkeyPatch

    def idx_copy(self) -> Path:
        return Path(shutil.copytree(self.idx, self.tmp / "idx"))

    def unfinished(self) -> Path:
        """A copy of the finished run as a crash after its checkpoint at 40 leaves it."""
        run = Path(shutil.copytree(self.finished, self.tmp / "run"))
        for name in ("summary.json", "model.pt"):
            (run / name).unlink()
        return run

    def resume(self, run: Path) -> list[str]:
        return ["train", "--resume", str(run), "--no-progress"]


def raw_idx(directory: Path, name: str) -> bytes:
    """The decompressed bytes of ``name``; the .gz file is removed."""
    data = gzip.decompress((directory / f"{name}.gz").read_bytes())
    (directory / f"{name}.gz").unlink()
    return data


def replace_idx(directory: Path, name: str, array: np.ndarray) -> None:
    (directory / f"{name}.gz").unlink()
    write_idx(directory / name, array)


class Payload:
    """Unpickling this runs ``open(path, "w")``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rewrite_checkpoint(path: Path, edit: Callable[[dict], None]) -> None:
    """Edit a checkpoint as a user with isgd's own functions would: the digest stays valid."""
    state = load_checkpoint(path)
    edit(state)
    runio.save_checkpoint(path.parent, state["iteration"], state, keep=99)


def fail_fsync(monkeypatch, code: int, when: Callable[[], bool] = lambda: True) -> None:
    """Simulate a device error (ENOSPC, EROFS, ...) on every fsync once ``when()`` holds."""
    fsync = os.fsync

    def patched(fd):
        if when():
            raise OSError(code, os.strerror(code))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", patched)


# ------------------------------------------------------------------------ the CLI table
def c_unknown_flag(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--learning-rate", "0.1")


def c_unknown_config_key(c: Ctx):
    (c.tmp / "c.toml").write_text('optimizer = "isgd"\nlearning_rate = 0.1\n')
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "c.toml"))


def c_wrong_type_flag(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--batch-size", "1.5")


def c_wrong_type_config_float(c: Ctx):
    (c.tmp / "c.toml").write_text('lr = "fast"\n')
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "c.toml"))


def c_wrong_type_config_bool(c: Ctx):
    (c.tmp / "c.toml").write_text("augment = 1\n")
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "c.toml"))


def c_wrong_type_config_list(c: Ctx):
    (c.tmp / "c.toml").write_text('milestones = "100"\n')
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "c.toml"))


def c_config_is_a_directory(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp))


def c_momentum_out_of_range(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--momentum", "1.5")


def c_lr_nan(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--lr", "nan")


def c_negative_eval_every(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--eval-every", "-1")


def c_zero_checkpoint_every(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--checkpoint-every", "0")


def c_bad_on_nonfinite(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--on-nonfinite", "ignore")


def c_target_accuracy_percent(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--target", "99")


def c_multistep_without_milestones(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--lr-policy", "multistep")


def c_batch_larger_than_data(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--batch-size", "1000")


def c_model_too_big_for_images(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--model", "lenet")


def c_missing_data_file(c: Ctx):
    idx = c.idx_copy()
    (idx / f"{LABELS}.gz").unlink()
    return train_argv(idx, c.tmp / "new")


def c_truncated_idx(c: Ctx):
    idx = c.idx_copy()
    data = raw_idx(idx, IMAGES)
    (idx / IMAGES).write_bytes(data[: len(data) // 2])
    return train_argv(idx, c.tmp / "new")


def c_truncated_gzip(c: Ctx):
    idx = c.idx_copy()
    path = idx / f"{IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:-100])
    return train_argv(idx, c.tmp / "new")


def c_corrupted_gzip(c: Ctx):
    idx = c.idx_copy()
    path = idx / f"{IMAGES}.gz"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    return train_argv(idx, c.tmp / "new")


def c_corrupted_idx_header(c: Ctx):
    idx = c.idx_copy()
    data = bytearray(raw_idx(idx, LABELS))
    data[2] = 0x42  # no such IDX type code
    (idx / LABELS).write_bytes(bytes(data))
    return train_argv(idx, c.tmp / "new")


def c_rgb_images(c: Ctx):
    idx = c.idx_copy()
    replace_idx(idx, IMAGES, np.zeros((240, 8, 8, 3), np.uint8))
    return train_argv(idx, c.tmp / "new")


def c_non_square_images(c: Ctx):
    idx = c.idx_copy()
    replace_idx(idx, IMAGES, np.zeros((240, 8, 6), np.uint8))
    replace_idx(idx, TEST_IMAGES, np.zeros((60, 8, 6), np.uint8))
    return train_argv(idx, c.tmp / "new")


def c_label_count_mismatch(c: Ctx):
    idx = c.idx_copy()
    replace_idx(idx, LABELS, np.zeros(200, np.uint8))
    return train_argv(idx, c.tmp / "new")


def c_float_labels(c: Ctx):
    idx = c.idx_copy()
    replace_idx(idx, LABELS, np.zeros(240, np.float32))
    return train_argv(idx, c.tmp / "new")


def c_test_images_differ(c: Ctx):
    idx = c.idx_copy()
    replace_idx(idx, TEST_IMAGES, np.zeros((60, 10, 10), np.uint8))
    return train_argv(idx, c.tmp / "new")


def c_existing_run_directory(c: Ctx):
    return train_argv(c.idx, c.unfinished())


def c_out_under_a_file(c: Ctx):
    (c.tmp / "a-file").write_text("not a directory")
    return train_argv(c.idx, c.tmp / "a-file" / "run")


def c_read_only_file_system(c: Ctx):
    fail_fsync(c.monkeypatch, errno.EROFS)
    return train_argv(c.idx, c.tmp / "new")


def c_disk_full_during_a_checkpoint(c: Ctx):
    full = []
    save = runio.save_checkpoint

    def patched(directory, iteration, state, keep=2):
        if iteration == 40:
            full.append(True)  # from now on the device has no space left
        return save(directory, iteration, state, keep)

    c.monkeypatch.setattr(runio, "save_checkpoint", patched)
    fail_fsync(c.monkeypatch, errno.ENOSPC, lambda: bool(full))
    return train_argv(c.idx, c.tmp / "new")


def c_permission_denied_on_model_pt(c: Ctx):
    replace = os.replace

    def patched(src, dst, *args, **kwargs):
        if Path(dst).name == "model.pt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return replace(src, dst, *args, **kwargs)

    c.monkeypatch.setattr(os, "replace", patched)
    return train_argv(c.idx, c.tmp / "new")


def c_resume_with_flags(c: Ctx):
    return [*c.resume(c.unfinished()), "--out", str(c.tmp / "other")]


def c_resume_not_a_run(c: Ctx):
    (c.tmp / "other").mkdir()
    (c.tmp / "other" / "notes.txt").write_text("not a run")
    return c.resume(c.tmp / "other")


def c_resume_a_run_killed_while_being_created(c: Ctx):
    (c.tmp / "empty").mkdir()
    (c.tmp / "empty" / ".write-test").write_bytes(b"")
    return c.resume(c.tmp / "empty")


def c_resume_finished_run(c: Ctx):
    return c.resume(Path(shutil.copytree(c.finished, c.tmp / "run")))


def c_checkpoint_of_another_model(c: Ctx):
    run = c.unfinished()
    config = run / "config.toml"
    config.write_text(config.read_text().replace('model = "mlp"', 'model = "resnet20"'))
    return c.resume(run)


def c_checkpoint_that_does_not_fit(c: Ctx):
    run = c.unfinished()

    def edit(state):
        del state["config"]
        key = next(iter(state["model"]))
        state["model"][key] = torch.zeros(3, 3)

    rewrite_checkpoint(run / "checkpoints" / "ckpt-00000040.pt", edit)
    return c.resume(run)


def c_checkpoint_of_an_older_format(c: Ctx):
    run = c.unfinished()
    rewrite_checkpoint(run / "checkpoints" / "ckpt-00000040.pt", lambda s: s.update(format=0))
    return c.resume(run)


def c_resume_log_is_a_directory(c: Ctx):
    run = c.unfinished()
    os.replace(run / "metrics.jsonl", run / "metrics.jsonl.saved")
    (run / "metrics.jsonl").mkdir()  # an OSError no library message covers: the CLI's fallback
    return c.resume(run)


# ------------------------------------------- options that contradict each other or would be ignored
def compare_argv(c: Ctx, *extra: str) -> list[str]:
    return [
        "compare",
        *("--dataset", f"idx:{c.idx}", "--model", "mlp", "--iters", "30", "--batch-size", "16"),
        *("--threads", "1", "--target", "0.5", "--out", str(c.tmp / "cmp"), "--no-progress"),
        *extra,
    ]


def c_iters_and_epochs(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--epochs", "1")


def c_iters_and_epochs_in_one_file(c: Ctx):
    (c.tmp / "both.toml").write_text("iters = 20\nepochs = 1.0\n")
    return tiny_train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "both.toml"))


def c_preset_in_the_file_and_another_on_the_command_line(c: Ctx):
    (c.tmp / "p.toml").write_text('preset = "cifar10-quick"\n')
    return ["train", "--preset", "lenet-mnist", "--config", str(c.tmp / "p.toml")]


def c_threads_beyond_the_machine(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--threads", "100000")


def c_dist_timeout_in_one_process(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--dist-timeout", "60")


def c_compare_with_an_optimizer(c: Ctx):
    return compare_argv(c, "--optimizer", "adam")


def c_compare_with_a_seed(c: Ctx):
    return compare_argv(c, "--seed", "7")


def c_compare_arm_with_a_seed(c: Ctx):
    return compare_argv(c, "--arm", "sgd", "--arm", "isgd:optimizer=isgd,seed=5")


def c_compare_seeds_and_seed_list(c: Ctx):
    return compare_argv(c, "--seeds", "2", "--seed-list", "3,4")


def c_compare_repeated_seed(c: Ctx):
    return compare_argv(c, "--seed-list", "1,1")


def c_compare_resume_and_retarget(c: Ctx):
    return ["compare", "--resume", str(c.tmp), "--retarget", str(c.tmp), "--target", "0.5"]


def c_compare_retarget_with_arms(c: Ctx):
    return ["compare", "--retarget", str(c.tmp), "--target", "0.5", "--arm", "sgd"]


def c_compare_tune_iters_without_rates(c: Ctx):
    return compare_argv(c, "--tune-iters", "100")


def c_compare_equal_compute_without_isgd(c: Ctx):
    return compare_argv(c, "--arm", "sgd", "--arm", "adam", "--equal-compute")


def c_compare_target_accuracy(c: Ctx):
    return compare_argv(c, "--target-accuracy", "0.5")


def c_compare_idx_without_target(c: Ctx):
    argv = compare_argv(c)
    i = argv.index("--target")
    return argv[:i] + argv[i + 2 :]


def c_compare_optimizer_in_the_file(c: Ctx):
    (c.tmp / "opt.toml").write_text('optimizer = "adam"\n')
    return compare_argv(c, "--config", str(c.tmp / "opt.toml"))


def no_marker(c: Ctx) -> None:
    assert not (c.tmp / "marker").exists()  # nothing from the payload ran


def resumes_to_the_same_model(c: Ctx) -> None:
    """After the disk is "fixed", the run continues and ends as the uninterrupted one."""
    assert not list((c.tmp / "new").rglob("*.tmp"))
    c.monkeypatch.undo()
    assert main(c.resume(c.tmp / "new")) == 0
    assert (c.tmp / "new" / "model.pt").read_bytes() == (c.finished / "model.pt").read_bytes()


def nothing_created(c: Ctx) -> None:
    assert not (c.tmp / "new").exists() or not any((c.tmp / "new").iterdir())


CLI_CASES = [  # (setup, what the error line must contain, further check)
    (c_unknown_flag, "unrecognized arguments: --learning-rate 0.1 (see: isgd --help)", None),
    (c_unknown_config_key, "unknown config key in", nothing_created),
    (c_wrong_type_flag, "argument --batch-size: invalid int value: '1.5'", None),
    (c_wrong_type_config_float, "invalid lr: 'fast' (expected float)", None),
    (c_wrong_type_config_bool, "invalid augment: 1 (expected bool)", None),
    (c_wrong_type_config_list, "invalid milestones: '100' (expected a list of int)", None),
    (c_config_is_a_directory, "cannot read config file", None),
    (c_momentum_out_of_range, "invalid momentum: 1.5 (must be < 1)", None),
    (c_lr_nan, "invalid lr: nan (must be a finite number >= 0)", None),
    (c_negative_eval_every, "invalid eval_every: -1 (must be >= 1)", None),
    (c_zero_checkpoint_every, "invalid checkpoint_every: 0 (must be >= 1)", None),
    (c_bad_on_nonfinite, "invalid on_nonfinite: 'ignore' (one of stop, skip)", None),
    (c_target_accuracy_percent, "invalid target: 99 (an accuracy: a fraction in [0, 1])", None),
    (c_multistep_without_milestones, "the multistep policy needs milestones", None),
    (c_batch_larger_than_data, "batch_size: 1000 for a data set of 240 samples", nothing_created),
    (c_model_too_big_for_images, "lenet needs image_size >= 13, got 8", nothing_created),
    (c_missing_data_file, f"missing IDX files in {{tmp}}/idx: {LABELS}", nothing_created),
    (c_truncated_idx, "truncated IDX file: dims (240, 8, 8) need 15360 data bytes", None),
    (c_truncated_gzip, "cannot read (Compressed file ended", None),
    (c_corrupted_gzip, f"{{tmp}}/idx/{IMAGES}.gz: cannot read", None),
    (c_corrupted_idx_header, "not an IDX file (bad magic 00004201)", None),
    (c_rgb_images, "expected 3-d uint8 data, got torch.uint8 (240, 8, 8, 3)", nothing_created),
    (c_non_square_images, "the images are 8×6 pixels, but the models take square", None),
    (c_label_count_mismatch, "240 train images but labels of shape (200,)", None),
    (c_float_labels, "expected 1-d uint8 data, got torch.float32", None),
    (c_test_images_differ, "train images (1, 8, 8) and test images (1, 10, 10) differ", None),
    (c_existing_run_directory, "already exists and is not empty; choose another --out", None),
    (c_out_under_a_file, "a parent of it is a file, not a directory; choose another --out", None),
    (
        c_read_only_file_system,
        "config.toml: read-only file system; once that is fixed, run the same command again",
        nothing_created,
    ),
    (
        c_disk_full_during_a_checkpoint,
        "ckpt-00000040.pt: no space left on device (the disk is full); what was written before "
        "is intact: once that is fixed, continue with: isgd train --resume {tmp}/new",
        resumes_to_the_same_model,
    ),
    (
        c_permission_denied_on_model_pt,
        "model.pt: permission denied; what was written before is intact",
        resumes_to_the_same_model,
    ),
    (c_resume_with_flags, "--resume continues the saved configuration; drop --out", None),
    (c_resume_not_a_run, "is not a run directory (no config.toml); nothing to resume", None),
    (
        c_resume_a_run_killed_while_being_created,
        "holds no run: it was stopped while being created, before anything was trained; run "
        "the original command again (with the same --out: the directory is reused)",
        None,
    ),
    (c_resume_finished_run, "has finished (summary.json is there); nothing to resume", None),
    (
        c_checkpoint_of_another_model,
        "ckpt-00000040.pt was written with model = 'mlp', but {tmp}/run/config.toml now says "
        "model = 'resnet20'; put the old values back",
        None,
    ),
    (
        c_checkpoint_that_does_not_fit,
        "does not fit the model or optimizer that {tmp}/run/config.toml describes",
        None,
    ),
    (
        c_checkpoint_of_an_older_format,
        "ckpt-00000040.pt is a checkpoint of format 0, this isgd reads format 2: resume with "
        "the isgd version that wrote it, or delete it to resume from the previous checkpoint "
        "ckpt-00000020.pt",
        None,
    ),
    (c_resume_log_is_a_directory, "{tmp}/run/metrics.jsonl: Is a directory", None),
]


CLI_CASES += [  # every option acts or is refused
    (c_iters_and_epochs, "the command line sets both iters (50) and epochs (1.0); give one", None),
    (c_iters_and_epochs_in_one_file, "both.toml sets both iters (20) and epochs (1.0)", None),
    (
        c_preset_in_the_file_and_another_on_the_command_line,
        "p.toml names preset 'cifar10-quick' but --preset is 'lenet-mnist'; choose one",
        None,
    ),
    (c_threads_beyond_the_machine, "invalid threads: 100000 (this machine gives this", None),
    (c_dist_timeout_in_one_process, "--dist-timeout applies to data-parallel runs", None),
    (c_compare_with_an_optimizer, "--optimizer: each arm names its optimizer", None),
    (c_compare_with_a_seed, "--seed: a comparison runs --seeds N", None),
    (c_compare_arm_with_a_seed, "arm isgd sets seed: all arms share the seeds", None),
    (c_compare_seeds_and_seed_list, "--seeds and --seed-list: give one", None),
    (c_compare_repeated_seed, "--seed-list repeats a seed: [1, 1]", None),
    (c_compare_resume_and_retarget, "--resume and --retarget: give one", None),
    (c_compare_retarget_with_arms, "--retarget only re-reads finished runs for --target", None),
    (c_compare_tune_iters_without_rates, "--tune-iters sets the budget of --tune-lrs", None),
    (c_compare_equal_compute_without_isgd, "--equal-compute matches an ISGD arm's passes", None),
    (c_compare_optimizer_in_the_file, "opt.toml sets optimizer, which isgd compare replaces", None),
    (
        c_compare_target_accuracy,
        "unrecognized arguments: --target-accuracy 0.5",
        None,
    ),
    (c_compare_idx_without_target, ": give the target accuracy with --target ACC (a", None),
]


# ------------------------------------------------ numbers out of range, empty values, bad archives
def bs_argv(c: Ctx, *extra: str) -> list[str]:
    """``isgd batch-study --quick`` on the tiny data set into ``{tmp}/bs``."""
    return [
        *("batch-study", "--quick", "--dataset", f"idx:{c.idx}", "--model", "mlp"),
        *("--out", str(c.tmp / "bs"), *extra),
    ]


def fetch_argv(c: Ctx, source: Path) -> list[str]:
    return ["data", "fetch", "cifar10", "--data-dir", str(c.tmp / "data"), "--from", str(source)]


def tar_with(c: Ctx, member: str, kind: bytes, payload: bytes = b"", link: str = "") -> Path:
    """A tarball of one member of type ``kind`` (tarfile.REGTYPE, SYMTYPE, ...)."""
    import io
    import tarfile

    path = c.tmp / "copy.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member)
        info.type, info.linkname, info.size = kind, link, len(payload)
        tar.addfile(info, io.BytesIO(payload) if payload else None)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only its header: it claims ``width``×``height`` pixels, holds none."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def c_epochs_beyond_any_run(c: Ctx):
    (c.tmp / "e.toml").write_text("epochs = 1e308\n")
    return tiny_train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "e.toml"))


def c_epochs_of_too_many_iterations(c: Ctx):
    (c.tmp / "e.toml").write_text("epochs = 1e11\n")  # 15 batches per epoch
    return tiny_train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "e.toml"))


def c_iters_beyond_the_bound(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--iters", "99999999999999999999999")


def c_iters_int64_max_in_the_file(c: Ctx):
    (c.tmp / "i.toml").write_text("iters = 9223372036854775807\n")
    return tiny_train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "i.toml"))


def c_seed_beyond_64_bits(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--seed", "1180591620717411303424")


def c_negative_seed_in_the_file(c: Ctx):
    (c.tmp / "s.toml").write_text("seed = -99999999999999999999\n")
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "s.toml"))


def c_config_not_utf8(c: Ctx):
    (c.tmp / "bin.toml").write_bytes(b"\xff\xfe\x00\x01lr = 0.1\n")
    return train_argv(c.idx, c.tmp / "new", "--config", str(c.tmp / "bin.toml"))


def c_window_beyond_any_epoch(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--window", "1000000000000")


def c_window_longer_than_the_run(c: Ctx):
    return train_argv(c.idx, c.tmp / "new", "--window", "100")  # 50 iterations


def c_empty_out(c: Ctx):
    c.monkeypatch.chdir(c.tmp)  # the default run directory would be {tmp}/runs/...
    return train_argv(c.idx, Path("placeholder"), "--out", "")


def c_empty_resume(c: Ctx):
    c.monkeypatch.chdir(c.tmp)
    return ["train", "--resume", "", "--no-progress"]


def no_default_directory(c: Ctx) -> None:
    assert not (c.tmp / "runs").exists()


def c_compare_arm_repeats_a_key(c: Ctx):
    return compare_argv(c, "--arm", "sgd", "--arm", "a:optimizer=isgd,optimizer=sgd")


def c_compare_arm_window_longer_than_the_run(c: Ctx):
    return compare_argv(c, "--arm", "sgd", "--arm", "isgd:optimizer=isgd,window=100")


def c_compare_empty_seed_list(c: Ctx):
    return compare_argv(c, "--seed-list", "")


def c_compare_seed_beyond_the_range(c: Ctx):
    return compare_argv(c, "--seed-list", "1,99999999999")


def c_compare_negative_tune_lrs(c: Ctx):
    return compare_argv(c, "--tune-lrs", "-0.1,0.1")


def c_compare_negative_tune_lrs_with_equals(c: Ctx):
    return compare_argv(c, "--tune-lrs=-0.1,0.1")


def c_compare_retarget_a_directory_of_something_else(c: Ctx):
    (c.tmp / "other").mkdir()
    (c.tmp / "other" / "notes.txt").write_text("not a comparison")
    return ["compare", "--retarget", str(c.tmp / "other"), "--target", "0.5"]


def c_compare_retarget_a_file(c: Ctx):
    (c.tmp / "notes.txt").write_text("not a comparison")
    return ["compare", "--retarget", str(c.tmp / "notes.txt"), "--target", "0.5"]


def c_batch_study_batch_beyond_the_data(c: Ctx):
    return bs_argv(c, "--batch-sizes", "1000000000", "--procs", "1")


def c_batch_study_negative_allreduce_size(c: Ctx):
    return bs_argv(c, "--allreduce-sizes", "-5", "--procs", "1")


def c_batch_study_procs_beyond_the_machine(c: Ctx):
    return bs_argv(c, "--procs", "1,100000")


def c_batch_study_saturation_nan(c: Ctx):
    return bs_argv(c, "--saturation", "nan", "--procs", "1")


def no_study(c: Ctx) -> None:
    assert not (c.tmp / "bs").exists()


def c_corrupted_idx_dimensions(c: Ctx):
    idx = c.idx_copy()
    raw_idx(idx, LABELS)
    (idx / LABELS).write_bytes(b"\x00\x00\x08\xff" + b"\xff" * 4 * 255)  # 255 dims of 2**32 - 1
    return train_argv(idx, c.tmp / "new")


def c_fetch_decompression_bomb(c: Ctx):
    return fetch_argv(c, tar_with(c, "c/train/cat/0.png", b"0", png_header(100_000, 100_000)))


def c_fetch_symlink_member(c: Ctx):
    return fetch_argv(c, tar_with(c, "c/train/cat/0.png", b"2", link="/etc/passwd"))


def c_fetch_hard_link_member(c: Ctx):
    return fetch_argv(c, tar_with(c, "c/train/cat/0.png", b"1", link="c/train/cat/1.png"))


def c_fetch_device_member(c: Ctx):
    return fetch_argv(c, tar_with(c, "c/train/cat/0.png", b"3"))


def c_fetch_fake_python_batches(c: Ctx):
    import pickle

    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 5, 42]}
        (c.tmp / name).write_bytes(pickle.dumps(batch, protocol=2))
    return fetch_argv(c, c.tmp)


def nothing_installed(c: Ctx) -> None:
    assert not (c.tmp / "data" / "cifar10").exists()


CLI_CASES += [  # numbers out of range, empty values, archives that are not a data set
    (c_epochs_beyond_any_run, "invalid epochs: 1e+308 (must be <= 10**12)", nothing_created),
    (
        c_epochs_of_too_many_iterations,
        "invalid epochs: 1e+11 (15 batches per epoch make 1500000000000 iterations; at most "
        "10**12)",
        nothing_created,
    ),
    (
        c_iters_beyond_the_bound,
        "invalid iters: 99999999999999999999999 (must be >= 1 and <= 10**12)",
        nothing_created,
    ),
    (
        c_iters_int64_max_in_the_file,
        "invalid iters: 9223372036854775807 (must be >= 1 and <= 10**12)",
        nothing_created,
    ),
    (
        c_seed_beyond_64_bits,
        "invalid seed: 1180591620717411303424 (must be an integer with 0 <= seed < 2**32)",
        None,
    ),
    (
        c_negative_seed_in_the_file,
        "invalid seed: -99999999999999999999 (must be an integer with 0 <= seed < 2**32)",
        None,
    ),
    (
        c_config_not_utf8,
        "config file {tmp}/bin.toml is not UTF-8 TOML (byte 0xff at offset 0 is not UTF-8 text)",
        None,
    ),
    (
        c_window_beyond_any_epoch,
        "invalid window: 1000000000000 (at most 2**31 - 1 batches; ISGD acts only once its "
        "window has filled)",
        None,
    ),
    (
        c_window_longer_than_the_run,
        "invalid window: 100 (ISGD acts only once its window of batches has filled, and this run "
        "has 50 iterations: it would never act; lower --window, or 0 for one epoch)",
        nothing_created,
    ),
    (
        c_empty_out,
        "argument --out: an empty path; give a file or directory name",
        no_default_directory,
    ),
    (c_empty_resume, "argument --resume: an empty path", no_default_directory),
    (
        c_compare_arm_repeats_a_key,
        "--arm a:optimizer=isgd,optimizer=sgd: sets optimizer more than once; give each key once",
        None,
    ),
    (
        c_compare_arm_window_longer_than_the_run,
        "arm isgd: window 100 is longer than the run's 30 iterations: ISGD would never act",
        None,
    ),
    (c_compare_empty_seed_list, "argument --seed-list: an empty list: '' (give N,N,...)", None),
    (
        c_compare_seed_beyond_the_range,
        "--seed-list: seeds must be integers with 0 <= seed < 2**32, got 99999999999",
        None,
    ),
    (
        c_compare_negative_tune_lrs,
        "--tune-lrs: learning rates must be finite numbers > 0, got '-0.1,0.1'",
        None,
    ),
    (
        c_compare_negative_tune_lrs_with_equals,
        "--tune-lrs: learning rates must be finite numbers > 0, got '-0.1,0.1'",
        None,
    ),
    (
        c_compare_retarget_a_directory_of_something_else,
        "--retarget {tmp}/other is not a comparison directory (no plan.json or summary.json)",
        None,
    ),
    (
        c_compare_retarget_a_file,
        "--retarget {tmp}/notes.txt is a file, not a comparison directory",
        None,
    ),
    (
        c_batch_study_batch_beyond_the_data,
        "--batch-sizes 1000000000 is larger than the data set (idx:",
        no_study,
    ),
    (
        c_batch_study_negative_allreduce_size,
        "--allreduce-sizes must be numbers of floats >= 1 and <= 10**9, got -5",
        no_study,
    ),
    (
        c_batch_study_procs_beyond_the_machine,
        "batch-study: --procs 100000: this machine gives this process",
        no_study,
    ),
    (
        c_batch_study_saturation_nan,
        "--saturation must be a finite number >= 0 (a relative growth, 0.1 = 10 %), got nan",
        no_study,
    ),
    (
        c_corrupted_idx_dimensions,
        f"{{tmp}}/idx/{LABELS}: corrupt IDX header (255 dims (4294967295, 4294967295, "
        "4294967295, ...): over 16 GiB of data)",
        nothing_created,
    ),
    (
        c_fetch_decompression_bomb,
        "copy.tar:c/train/cat/0.png: its header claims 10,000,000,000 pixels (a decompression "
        "bomb?); CIFAR-10 images are 32×32: refused unread",
        nothing_installed,
    ),
    (
        c_fetch_symlink_member,
        "copy.tar: member 'c/train/cat/0.png' is a symbolic link (to '/etc/passwd'); a CIFAR-10 "
        "copy holds only files and folders: refusing it",
        nothing_installed,
    ),
    (
        c_fetch_hard_link_member,
        "copy.tar: member 'c/train/cat/0.png' is a hard link (to 'c/train/cat/1.png')",
        nothing_installed,
    ),
    (
        c_fetch_device_member,
        "copy.tar: member 'c/train/cat/0.png' is a device file",
        nothing_installed,
    ),
    (
        c_fetch_fake_python_batches,
        "{tmp}/data_batch_1: label 42 is not a CIFAR-10 class id (0-9)",
        nothing_installed,
    ),
]


def snapshot(directory: Path) -> dict[Path, bytes]:
    """Every file, but the lock files (the last holder writes its name into them)."""
    return {
        p: p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and p.name != runio.DirectoryLock.NAME
    }


@pytest.mark.parametrize(
    "setup, expected, check", CLI_CASES, ids=[c[0].__name__[2:] for c in CLI_CASES]
)
def test_cli_bad_input(
    setup, expected, check, tiny_idx_dir, finished, tmp_path, monkeypatch, capsys
):
    ctx = Ctx(tmp_path, tiny_idx_dir, finished, monkeypatch)
    argv = setup(ctx)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("isgd: error: ")]
    assert rc == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected.format(tmp=tmp_path) in errors[0], errors[0]
    for path, data in before.items():  # nothing that was there is lost or changed
        assert path.is_file() and path.read_bytes() == data, path
    if check is not None:
        check(ctx)


# ------------------------------------------------------------------------ the API table
def a_unknown_key(c: Ctx):
    resolve_config(overrides={"learning_rate": 0.1})


def a_wrong_type(c: Ctx):
    resolve_config(overrides={"iters": 1.5})


def a_out_of_range(c: Ctx):
    resolve_config(overrides={"eval_every": -5})


def a_bad_on_nonfinite(c: Ctx):
    resolve_config(overrides={"on_nonfinite": "explode"})


def a_unknown_preset(c: Ctx):
    resolve_config("imagenet")


def a_train_into_existing_dir(c: Ctx):
    train(resolve_config(overrides={"dataset": f"idx:{c.idx}"}), c.unfinished())


def a_resume_nothing(c: Ctx):
    resume(c.tmp / "nothing")


def save_with_header(path: Path, state: dict) -> None:
    """``state`` as a checkpoint file with a valid header and digest, whatever it holds."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path.write_bytes(runio.CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


def a_load_pickle_payload(c: Ctx):
    save_with_header(c.tmp / "evil.pt", {"format": 2, "x": Payload(c.tmp / "marker")})
    try:
        load_checkpoint(c.tmp / "evil.pt")
    finally:
        no_marker(c)


def a_load_older_format(c: Ctx):
    save_with_header(c.tmp / "old.pt", {"format": 0})
    load_checkpoint(c.tmp / "old.pt")


def a_load_empty_file(c: Ctx):
    (c.tmp / "empty.pt").write_bytes(b"")
    load_checkpoint(c.tmp / "empty.pt")


def a_write_on_a_full_disk(c: Ctx):
    (c.tmp / "file").write_bytes(b"old")
    fail_fsync(c.monkeypatch, errno.ENOSPC)
    try:
        atomic_write_bytes(c.tmp / "file", b"new")
    finally:
        assert (c.tmp / "file").read_bytes() == b"old" and not list(c.tmp.glob(".*.tmp"))


def a_jsonl_in_a_missing_directory(c: Ctx):
    JsonlWriter(c.tmp / "missing" / "steps.jsonl")


def a_restore_another_model(c: Ctx):
    config = resolve_config(
        overrides={"dataset": f"idx:{c.idx}", "model": "resnet20", "batch_size": 16}
    )
    checkpoint = load_checkpoint(c.finished / "checkpoints" / "ckpt-00000040.pt")
    Trainer(config, c.tmp / "run").restore(checkpoint)


def a_chart_window(c: Ctx):
    LossControlChart(window=1)


def a_sampler_batch_size(c: Ctx):
    FixedCycleBatchSampler(10, 20)


def a_isgd_lr(c: Ctx):
    ISGD(torch.nn.Linear(2, 2).parameters(), lr=-1.0, window=10)


def a_data_split_shape(c: Ctx):
    x = torch.zeros(4, 8, 8, dtype=torch.uint8)
    DataSplit("bad", x, torch.zeros(4), x, torch.zeros(4), 10)


def a_chart_window_not_integral(c: Ctx):
    assert LossControlChart(window=np.int64(4)).window == 4  # NumPy's integers are integers
    LossControlChart(window=np.float64(4.0))


def a_chart_window_too_large(c: Ctx):
    LossControlChart(window=10**30)


def a_sampler_negative_size(c: Ctx):
    FixedCycleBatchSampler(-4, 3)


def a_sampler_fractional_size(c: Ctx):
    FixedCycleBatchSampler(10.5, 3)


def a_distributed_sampler_negative_size(c: Ctx):
    DistributedFixedCycleBatchSampler(-4, 3, num_replicas=1, rank=0)


def a_distributed_sampler_fractional_size(c: Ctx):
    DistributedFixedCycleBatchSampler(10.5, 3, num_replicas=1, rank=0)


def a_distributed_sampler_no_replicas(c: Ctx):
    DistributedFixedCycleBatchSampler(12, 4, num_replicas=0, rank=0)


def a_distributed_sampler_text_shares(c: Ctx):
    DistributedFixedCycleBatchSampler(12, 4, num_replicas=2, rank=0, shares=["3", "1"])


def a_chart_loss_as_text(c: Ctx):
    LossControlChart(window=3).update("1.0")


def a_chart_loss_not_a_scalar(c: Ctx):
    LossControlChart(window=3).update(torch.ones(2))


def a_chart_loss_too_large(c: Ctx):
    chart = LossControlChart(window=2)
    assert chart.update(1e308) is False and chart.nonfinite == 1  # counted as non-finite
    state = chart.state_dict()
    state["losses"] = [1.0, 1e308]
    chart.load_state_dict(state)


def a_isgd_loss_too_large(c: Ctx):
    model = torch.nn.Linear(2, 1, dtype=torch.float64)
    opt = ISGD(model.parameters(), lr=0.1, window=4)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 2, dtype=torch.float64)).sum() * 0 + 1e308  # finite
        loss.backward()
        return loss

    opt.step(closure)


def a_isgd_load_negative_counter(c: Ctx):
    opt = ISGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, window=4)
    state = opt.state_dict()
    state["isgd"]["stats"]["steps"] = -5
    try:
        opt.load_state_dict(state)
    finally:
        assert opt.stats.steps == 0


def a_isgd_load_another_window(c: Ctx):
    params = list(torch.nn.Linear(2, 2).parameters())
    opt = ISGD(params, lr=0.1, window=4, sigma_factor=2.0)
    try:
        opt.load_state_dict(ISGD(params, lr=0.1, window=5).state_dict())
    finally:
        assert opt.sigma_factor == 2.0  # nothing was loaded


def a_chart_load_another_window(c: Ctx):
    LossControlChart(window=4).load_state_dict(LossControlChart(window=5).state_dict())


API_CASES = [
    (a_unknown_key, ConfigError, "unknown config key in the command line: learning_rate"),
    (a_wrong_type, ConfigError, r"invalid iters: 1.5 \(expected int\)"),
    (a_out_of_range, ConfigError, r"invalid eval_every: -5 \(must be >= 1\)"),
    (a_bad_on_nonfinite, ConfigError, r"invalid on_nonfinite: 'explode' \(one of stop, skip\)"),
    (a_unknown_preset, ConfigError, "unknown preset: 'imagenet'"),
    (a_train_into_existing_dir, RunError, "already exists and is not empty"),
    (a_resume_nothing, RunError, "is not a run directory"),
    (a_load_pickle_payload, RunError, "refusing to load checkpoint .*nothing from it was executed"),
    (a_load_older_format, RunError, "is a checkpoint of format 0, this isgd reads format 2"),
    (a_load_empty_file, RunError, r"not an isgd checkpoint \(no header\); delete it to restart"),
    (a_write_on_a_full_disk, WriteError, r"cannot write .*file: no space left on device"),
    (a_jsonl_in_a_missing_directory, WriteError, "cannot write .*steps.jsonl: No such file"),
    (a_restore_another_model, RunError, "written with model = 'mlp', .* model = 'resnet20'"),
    (a_chart_window, ValueError, r"Invalid window: 1 \(must be an integer >= 2\)"),
    (a_sampler_batch_size, ValueError, "Invalid batch_size: 20 for a data set of 10 samples"),
    (a_isgd_lr, ValueError, r"Invalid lr: -1.0 \(must be a number >= 0\)"),
    (a_data_split_shape, DataError, "bad: train images must be uint8 N×C×H×W"),
    (a_chart_window_not_integral, ValueError, r"Invalid window: np.float64\(4.0\) \(must be an"),
    (
        a_chart_window_too_large,
        ValueError,
        rf"Invalid window: {10**30} \(must be <= 2147483647 = 2\*\*31 - 1; a window is the",
    ),
    (
        a_sampler_negative_size,
        ValueError,
        r"Invalid data_source: -4 \(the size of the data set must be an integer >= 1\)",
    ),
    (a_sampler_fractional_size, TypeError, r"Invalid data_source: 10.5 \(a data set or its size\)"),
    (
        a_distributed_sampler_negative_size,
        ValueError,
        r"Invalid data_source: -4 \(the size of the data set must be an integer >= 1\)",
    ),
    (
        a_distributed_sampler_fractional_size,
        TypeError,
        r"Invalid data_source: 10.5 \(a data set or its size\)",
    ),
    (
        a_distributed_sampler_no_replicas,
        ValueError,
        r"Invalid num_replicas: 0 \(must be an integer >= 1\)",
    ),
    (
        a_distributed_sampler_text_shares,
        ValueError,
        r"Invalid shares: \['3', '1'\] \(positive finite numbers, one per process\)",
    ),
    (
        a_chart_loss_as_text,
        TypeError,
        r"Invalid loss: '1.0' \(must be a real number or a one-element real tensor\)",
    ),
    (
        a_chart_loss_not_a_scalar,
        TypeError,
        r"Invalid loss: a torch.float32 tensor of shape \(2,\) \(must be a real number or",
    ),
    (
        a_chart_loss_too_large,
        ValueError,
        r"Invalid losses: holds 1e\+308 \(the window holds only finite losses of magnitude <=",
    ),
    (
        a_isgd_loss_too_large,
        FloatingPointError,
        r"the batch loss is 1e\+308 \(beyond ±1e\+100: non-finite for ISGD\) at step 1; no",
    ),
    (
        a_isgd_load_negative_counter,
        ValueError,
        r"Invalid stats.steps: -5 \(a counter: an integer >= 0\)",
    ),
    (
        a_isgd_load_another_window,
        ValueError,
        r"Invalid window: 5 \(the state was saved with window=5, this optimizer has window=4; "
        "the window is structural",
    ),
    (
        a_chart_load_another_window,
        ValueError,
        r"Invalid window: 5 \(the state was saved with window=5, this chart has window=4;",
    ),
]


@pytest.mark.parametrize(
    "call, error, message", API_CASES, ids=[c[0].__name__[2:] for c in API_CASES]
)
def test_api_bad_input(call, error, message, tiny_idx_dir, finished, tmp_path, monkeypatch):
    with pytest.raises(error, match=message) as info:
        call(Ctx(tmp_path, tiny_idx_dir, finished, monkeypatch))
    assert "\n" not in str(info.value)
