"""A run never loses work: SIGKILL at random moments, SIGINT/SIGTERM, non-finite losses.

The runs train the ``mlp`` on the tiny IDX set (``tiny_idx_dir``) with one thread; every
interrupted run is resumed to the end and must finish bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from isgd.cli import main
from isgd.training import runio
from isgd.training.config import TrainConfig
from isgd.training.lifecycle import train
from isgd.training.train import NonFiniteError, Trainer
from tests.conftest import tiny_train_argv

ITERS, EVERY, N_B = 800, 25, 15  # 240 training images in batches of 16
TIMING = ("time/train_seconds", "images_per_second")


def train_argv(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        idx_dir,
        out,
        *("--sigma-factor", "1.5", "--iters", str(ITERS), "--eval-every", "100"),
        *("--checkpoint-every", str(EVERY), "--log-every", "1000", *extra),
    )


@pytest.fixture(scope="module")
def reference(tiny_idx_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(tiny_idx_dir, out)) == 0
    return out


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [{k: v for k, v in runio.loads(x).items() if k not in TIMING} for x in lines]


def assert_same_run(run: Path, reference: Path) -> None:
    assert (run / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert (run / "steps.jsonl").read_text() == (reference / "steps.jsonl").read_text()
    assert records(run / "metrics.jsonl") == records(reference / "metrics.jsonl")
    a, b = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert {k: v for k, v in a.items() if k not in TIMING} == {
        k: v for k, v in b.items() if k not in TIMING
    }
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert not list(run.rglob("*.tmp"))


# ------------------------------------------------------------------------------- SIGKILL
# Runs `isgd` after arming one kill point from $ISGD_TEST_KILL ("event:n"): the process sends
# itself SIGKILL at the n-th event, exactly as `kill -9` from outside would end it there.
KILL_RUNNER = r"""
import json, os, signal, sys
event, _, n = os.environ.get("ISGD_TEST_KILL", "").partition(":")
seen = 0

def hit():
    global seen
    seen += 1
    return seen == int(n)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if event == "forward":  # in the middle of a training step (or an evaluation)
    import torch.nn.functional as F
    cross_entropy = F.cross_entropy
    def patched(*args, **kwargs):
        if hit():
            die()
        return cross_entropy(*args, **kwargs)
    F.cross_entropy = patched
elif event == "checkpoint":  # checkpoint written to its temporary file, not yet renamed
    replace = os.replace
    def patched(src, dst, *args, **kwargs):
        if os.path.basename(dst).startswith("ckpt-") and hit():
            die()
        return replace(src, dst, *args, **kwargs)
    os.replace = patched
elif event == "provenance":  # provenance.json written to its temporary file, not yet renamed
    replace = os.replace
    def patched(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "provenance.json" and hit():
            die()
        return replace(src, dst, *args, **kwargs)
    os.replace = patched
elif event == "steps-line":  # half of a steps.jsonl line on disk
    from isgd.training import runio
    write = runio.JsonlWriter.write
    def patched(self, record):
        if self.path.name == "steps.jsonl" and hit():
            line = json.dumps(record) + "\n"
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            die()
        write(self, record)
    runio.JsonlWriter.write = patched
from isgd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_plan(plan, idx_dir: Path, run: Path, tmp_path: Path) -> tuple[list[Path], list[int]]:
    """One process per entry of ``plan`` (a self-kill point, an external kill after a delay, or
    neither), each resuming ``run`` (or starting it while it has no config.toml); returns the
    processes' logs and exit codes."""
    logs, outcomes = [], []
    for number, (kill_point, external) in enumerate(plan):
        if (run / "config.toml").is_file():
            argv = ["train", "--resume", str(run), "--no-progress"]
        else:  # killed before the run directory was set up: start it again
            argv = train_argv(idx_dir, run)
        env = dict(os.environ, ISGD_TEST_KILL=kill_point or "")
        log = tmp_path / f"process-{number}.log"
        logs.append(log)
        checkpoints = set((run / "checkpoints").glob("ckpt-*.pt"))
        with log.open("w") as err:
            process = subprocess.Popen(
                [sys.executable, "-c", KILL_RUNNER, *argv],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            if external is not None:
                wait_for, delay = external
                deadline = time.monotonic() + 60
                while wait_for == "checkpoint" and process.poll() is None:
                    if set((run / "checkpoints").glob("ckpt-*.pt")) - checkpoints:
                        break
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                time.sleep(delay)
                if process.poll() is None:
                    process.kill()  # SIGKILL
            outcomes.append(process.wait(timeout=120))
    return logs, outcomes


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_identical(
    tiny_idx_dir, reference, tmp_path
):
    rng = random.Random(5)
    run = tmp_path / "run"
    plan = [  # (self-kill point or None, external kill delay or None)
        (None, ("start", rng.uniform(0.05, 0.5))),  # while starting: imports, data, first files
        (f"forward:{rng.randint(1, 20)}", None),  # before the first checkpoint (restart)
        (f"checkpoint:{rng.randint(1, 3)}", None),  # during a checkpoint write
        (f"steps-line:{rng.randint(5, 60)}", None),  # a torn last line in steps.jsonl
        (None, ("checkpoint", rng.uniform(0.0, 0.2))),  # mid-training, by the clock
        (None, None),  # to the end
    ]
    logs, outcomes = run_plan(plan, tiny_idx_dir, run, tmp_path)
    history = "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)
    assert outcomes[1:4] == [-signal.SIGKILL] * 3, history
    assert outcomes[-1] == 0, history
    assert "starting it from the beginning" in logs[2].read_text(), history  # no checkpoint yet
    assert_same_run(run, reference)


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_then_resume_ends_bit_identical(
    tiny_idx_dir, reference, tmp_path
):
    rng = random.Random(20)
    plan = []
    for number in range(20):  # each process gets at most ~30 steps further: 20 kills < the run
        if number % 3 == 0:  # by the clock, mostly while starting (imports, data, files)
            plan.append((None, ("start", rng.uniform(0.05, 1.5))))
        else:
            event = rng.choice(["forward", "steps-line", "checkpoint"])
            count = 1 if event == "checkpoint" else rng.randint(1, 30)
            plan.append((f"{event}:{count}", None))
    plan.append((None, None))  # to the end
    logs, outcomes = run_plan(plan, tiny_idx_dir, tmp_path / "run", tmp_path)
    history = "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)
    assert outcomes[:-1] == [-signal.SIGKILL] * 20, history
    assert outcomes[-1] == 0, history
    assert_same_run(tmp_path / "run", reference)


def test_torn_last_lines_and_leftover_temporaries_do_not_break_resume(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for name in ("summary.json", "model.pt", "checkpoints/ckpt-00000775.pt"):
        (run / name).unlink()
    for name in ("steps.jsonl", "metrics.jsonl"):  # a kill in the middle of a line
        with (run / name).open("a") as f:
            f.write('{"iteration": 776, "epoch": 51, "batch_id": 1, "lo')
    (run / "checkpoints" / ".ckpt-00000775.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (run / ".summary.json.z3.tmp").write_text("{")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(run, reference)


def test_a_run_killed_while_being_created_can_be_started_again(tiny_idx_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".write-test").write_bytes(b"")  # what a kill during the set-up leaves at most
    (run / ".config.toml.a1b2.tmp").write_text("dataset = ")
    assert main(train_argv(tiny_idx_dir, run, "--iters", "5")) == 0
    # the debris is gone; .lock stays (removing a lock file while others may open it races)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]


def test_a_kill_before_provenance_json_is_in_place_is_repaired_on_resume(
    tiny_idx_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    _, outcomes = run_plan([("provenance:1", None)], tiny_idx_dir, run, tmp_path)
    assert outcomes == [-signal.SIGKILL]
    assert (run / "config.toml").is_file() and not (run / "provenance.json").exists()
    config = run / "config.toml"  # a shorter run (iters may change between resumes)
    config.write_text(config.read_text().replace(f"iters = {ITERS}\n", "iters = 30\n"))
    assert "iters = 30\n" in config.read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "provenance.json was missing from" in capsys.readouterr().err
    record = json.loads((run / "provenance.json").read_text())
    assert record["run_id"] and record["data"] == f"idx:{tiny_idx_dir}"
    newest = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert runio.load_checkpoint(newest)["run_id"] == record["run_id"]
    assert not list(run.rglob("*.tmp"))


def test_a_missing_provenance_json_takes_the_checkpoints_run_id(tiny_idx_dir, tmp_path):
    run = tmp_path / "run"
    assert main(train_argv(tiny_idx_dir, run, "--iters", "60")) == 0
    model, record = (
        (run / "model.pt").read_bytes(),
        json.loads((run / "provenance.json").read_text()),
    )
    for name in ("summary.json", "model.pt", "provenance.json"):
        (run / name).unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "provenance.json").read_text())["run_id"] == record["run_id"]
    assert (run / "model.pt").read_bytes() == model


# ----------------------------------------------------------------------- SIGINT / SIGTERM
@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Python's own SIGINT/SIGTERM handling for each test: a shell that started the test run in
    the background (``cmd &``, nohup) leaves SIGINT ignored, and the trainer keeps an ignored
    signal ignored on purpose."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def signal_at(monkeypatch, iteration: int, *signums: int) -> None:
    """Deliver ``signums`` to this process right after training iteration ``iteration``."""
    train_iteration = Trainer.train_iteration

    def patched(self):
        train_iteration(self)
        if self.state.iteration == iteration:
            for signum in signums:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(Trainer, "train_iteration", patched)


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_stops_at_the_step_boundary_with_a_checkpoint(
    tiny_idx_dir, reference, tmp_path, monkeypatch, capsys, signum, code
):
    run = tmp_path / "run"
    handler = signal.getsignal(signum)
    signal_at(monkeypatch, 337, signum)
    assert main(train_argv(tiny_idx_dir, run)) == code
    assert signal.getsignal(signum) is handler  # the trainer's handler is gone again
    err = capsys.readouterr().err
    assert (
        err.splitlines()[-1]
        == f"interrupted at iteration 337; resume with: isgd train --resume {run}"
    )
    assert "Traceback" not in err and "error" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-00000325.pt",
        "ckpt-00000337.pt",
    ]
    assert len((run / "steps.jsonl").read_text().splitlines()) == 337
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(run, reference)


def test_a_second_sigint_stops_at_once_and_the_run_still_resumes(
    tiny_idx_dir, reference, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    signal_at(monkeypatch, 337, signal.SIGINT, signal.SIGINT)
    assert main(train_argv(tiny_idx_dir, run)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "isgd: interrupted"
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "ckpt-00000325.pt"
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(run, reference)


# ---------------------------------------------------------------------- non-finite losses
@pytest.mark.parametrize("optimizer", ["sgd", "isgd"])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_idx_dir, tmp_path, capsys, optimizer
):
    run = tmp_path / "run"
    # a learning rate multiplied by 1e7 at iteration 25 makes the loss overflow soon after
    explode = ["--lr-policy", "step", "--step-size", "25", "--gamma", "1e7", "--iters", "60"]
    argv = train_argv(tiny_idx_dir, run, "--optimizer", optimizer, *explode)
    argv[argv.index("--checkpoint-every") + 1] = argv[argv.index("--eval-every") + 1] = "10"
    assert main(argv) == 3
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("isgd: error: ") and "Traceback" not in "\n".join(errors)
    steps = [runio.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    bad = steps[-1]["iteration"] + 1  # the failed step is not recorded
    last = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert re.fullmatch(
        re.escape("isgd: error: non-finite loss (")
        + r"(nan|inf|-inf)"
        + re.escape(
            f") at iteration {bad}, batch id {(bad - 1) % N_B} (epoch {(bad - 1) // N_B}); the "
            f"run stopped and its last good checkpoint {last} is kept; start a new run with a "
            "lower --lr, or with --on-nonfinite skip to skip such batches"
        ),
        errors[-1],
    ), errors[-1]
    assert 25 < bad <= 60 and last.name == f"ckpt-{(bad - 1) // 10 * 10:08d}.pt"
    state = runio.load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "model.pt").exists() and not (run / "summary.json").exists()
    metrics = [runio.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["iteration"] == (bad - 1) // 10 * 10  # flushed up to the last eval


def _poison(monkeypatch, iterations: set[int], snapshots: dict) -> None:
    """Batches of the given (0-based) iterations become NaN images; the model's state before
    and after each of those steps is recorded in ``snapshots``."""
    batch = Trainer.batch

    def patched(self, iteration):
        epoch, batch_id, x, y = batch(self, iteration)
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        if iteration - 1 in iterations:
            snapshots[iteration - 1].append(state)  # after the poisoned step
        if iteration in iterations:
            snapshots[iteration] = [state]  # before it
            x = x * float("nan")
        return epoch, batch_id, x, y

    monkeypatch.setattr(Trainer, "batch", patched)


@pytest.mark.parametrize(
    "model, optimizer", [("mlp", "isgd"), ("mlp", "sgd"), ("resnet20", "isgd")]
)
def test_skip_nonfinite_batches(tiny_idx_dir, tmp_path, monkeypatch, model, optimizer):
    config = TrainConfig(
        dataset=f"idx:{tiny_idx_dir}",
        model=model,
        optimizer=optimizer,
        batch_size=16,
        lr=0.05,
        lr_policy="fixed",
        sigma_factor=1.5,
        iters=40,
        eval_every=20,
        checkpoint_every=20,
        threads=1,
        tensorboard=False,
        on_nonfinite="skip",
    ).validate()
    snapshots: dict[int, list] = {}
    _poison(monkeypatch, {18, 33}, snapshots)
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["nonfinite/skipped"] == 2 and summary["iterations"] == 40
    for before, after in snapshots.values():  # no update at all, BatchNorm statistics included
        assert all(torch.equal(before[k], after[k]) for k in before)
    lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    steps = [runio.loads(line) for line in lines]
    skipped = [s for s in steps if s.get("skipped")]
    assert [(s["iteration"], s["batch_id"]) for s in skipped] == [(19, 3), (34, 3)]
    for s in skipped:
        assert s["loss"] != s["loss"] and not s["triggered"] and s["extra_iters"] == 0
        # the skipped step's forward pass counts as a pass (ISGD's counters), its update is none
        assert steps[s["iteration"] - 1]["passes"] == steps[s["iteration"] - 2]["passes"] + 1
    assert all(s["limit"] is None or s["limit"] == s["limit"] for s in steps)  # chart clean
    checkpoint = runio.load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000020.pt")
    isgd = checkpoint["optimizer"]["isgd"]
    assert isgd["chart"]["nonfinite"] == 1  # counted by the chart, kept out of its window
    assert isgd["stats"]["nonfinite"] == 1
    assert checkpoint["loop"]["skipped_in_a_row"] == 0
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_weights_are_never_checkpointed(tiny_idx_dir, tmp_path, monkeypatch):
    step = Trainer.step

    def patched(self, x, y):  # the update of iteration 20 leaves a NaN weight, loss finite
        loss = step(self, x, y)
        if self.state.iteration == 19:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "step", patched)
    config = TrainConfig(
        dataset=f"idx:{tiny_idx_dir}",
        model="mlp",
        batch_size=16,
        iters=40,
        eval_every=40,
        checkpoint_every=10,
        threads=1,
        tensorboard=False,
    ).validate()
    with pytest.raises(NonFiniteError, match=r"weights are no longer finite at iteration 20"):
        train(config, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["ckpt-00000010.pt"]


# ------------------------------------------------------------------ damaged checkpoints
def _interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """The reference run as a crash after its last checkpoint (775 of 800) leaves it."""
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    (run / "model.pt").unlink()
    (run / "summary.json").unlink()
    return run


def _flip_low_bits(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 256):
        data[i] ^= 1
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _from_another_run(path: Path) -> None:
    state = runio.load_checkpoint(path)
    state["run_id"] = "0" * 32  # the same configuration, trained by another run
    runio.save_checkpoint(path.parent, state["iteration"], state, keep=99)


def _save_in_envelope(path: Path, obj: object) -> None:
    """``obj`` pickled inside a checkpoint's header and a correct digest."""
    buffer = io.BytesIO()
    torch.save({"format": runio.CHECKPOINT_FORMAT, "x": obj}, buffer)
    payload = buffer.getvalue()
    path.write_bytes(runio.CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_flip_low_bits, "its SHA-256 digest does not match its contents"),
        (_truncate, "its SHA-256 digest does not match its contents"),
        (_from_another_run, "belongs to another run"),
        (lambda path: _save_in_envelope(path, _Payload(path.parent / "marker")), "could run code"),
        (lambda path: path.write_bytes(b"\x80\x02}q\x00."), "not an isgd checkpoint (no header)"),
    ],
    ids=["bit-flips", "truncated", "another-run", "unsafe-pickle", "not-a-checkpoint"],
)
@pytest.mark.numerics
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_resumes_bit_identical(
    reference, tmp_path, capsys, damage, reason
):
    run = _interrupted_copy(reference, tmp_path)
    newest = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert newest.name == "ckpt-00000775.pt"
    damage(newest)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "ckpt-00000775.pt" in line]
    assert len(said) == 1 and reason in said[0], err
    assert "falling back to ckpt-00000750.pt" in said[0], said[0]
    assert "resuming" in err and "from iteration 750" in err
    assert (run / "checkpoints" / "ckpt-00000775.pt.damaged").is_file()  # kept for inspection
    assert not (run / "checkpoints" / "marker").exists()  # nothing in the file ran
    assert (run / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert (run / "steps.jsonl").read_text() == (reference / "steps.jsonl").read_text()
    assert records(run / "metrics.jsonl") == records(reference / "metrics.jsonl")


def test_no_intact_checkpoint_is_refused_in_one_line(reference, tmp_path, capsys):
    run = _interrupted_copy(reference, tmp_path)
    for path in (run / "checkpoints").glob("ckpt-*.pt"):
        _flip_low_bits(path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("isgd: error:")]
    assert len(errors) == 1 and "no intact checkpoint in" in errors[0], errors
    assert "resume again to restart the run from the beginning" in errors[0]


def test_missing_records_are_reported_before_resuming(reference, tmp_path, capsys):
    run = _interrupted_copy(reference, tmp_path)
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl is missing from" in err and "before iteration 775 are lost" in err
    assert (run / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()


# ------------------------------------------------------------------ one process per directory
HOLD_LOCK = """
import sys, time
from pathlib import Path
from isgd.training.runio import DirectoryLock
lock = DirectoryLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_second_process_on_a_locked_directory_stops_at_once_naming_the_holder(
    reference, tmp_path, capsys
):
    run = _interrupted_copy(reference, tmp_path)
    compare_dir = tmp_path / "comparison"
    compare_dir.mkdir()
    (compare_dir / "summary.json").write_text("{}")
    for directory, argv in (
        (run, ["train", "--resume", str(run), "--no-progress"]),
        (compare_dir, ["compare", "--retarget", str(compare_dir), "--target", "0.5"]),
    ):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
            capsys.readouterr()
            started = time.monotonic()
            assert main(argv) == 2
            assert time.monotonic() - started < 10  # at once, not after a wait
            errors = [
                x for x in capsys.readouterr().err.splitlines() if x.startswith("isgd: error:")
            ]
            assert len(errors) == 1, errors
            assert f"is in use by process {holder.pid} on " in errors[0], errors[0]
            assert "wait for it to end or stop it" in errors[0]
            after = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
            assert after == before  # nothing touched
        finally:
            holder.kill()
            holder.wait()
    # the kernel released the killed holder's lock: the run resumes
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_two_new_runs_on_one_directory_cannot_both_proceed(tiny_idx_dir, tmp_path):
    from isgd.training.lifecycle import prepare_run_dir

    run = tmp_path / "run"
    first = prepare_run_dir(run)
    try:
        with pytest.raises(runio.RunError, match="is in use by process"):
            prepare_run_dir(run)  # a second process between its checks and its first write
    finally:
        first.release()
