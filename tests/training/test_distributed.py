"""Data-parallel ISGD on torch.distributed: gloo on 127.0.0.1, 2 processes, one thread each.

One process: the distributed sampler (per rank through ``num_replicas``/``rank``), shares and
the split, the launcher's command line, augmentation under a split, bad flags. Two processes
(kept short for CI on 2 cores): 2 ranks at global batch B against 1 process at B, uneven shares
3,1 against even ones, and a killed rank ending the job in bounded time, then its resume.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from isgd import FixedCycleBatchSampler
from isgd.cli import main
from isgd.data.preprocess import Preprocess
from isgd.training import distributed, runio
from isgd.training.callbacks import Callback
from isgd.training.config import resolve_config
from isgd.training.distributed import (
    DistributedFixedCycleBatchSampler,
    disagreeing_ranks,
    parse_shares,
    sizes_from_speeds,
    split_sizes,
)
from isgd.training.launch import worker_argv
from isgd.training.lifecycle import prepare_run_dir
from isgd.training.train import Trainer, TrainingInterrupted

# the one-process tests are fast; the multi-process ones (marked slow) run in make test only

ITERS = 400  # with lr 0.01 the run is not chaotic: float differences stay ~1e-7
TRAIN = dict(
    model="mlp", batch_size=16, lr=0.01, lr_policy="fixed", sigma_factor=1.5, iters=ITERS,
    eval_every=100, checkpoint_every=100, threads=1, tensorboard=False, log_every=1000,
)  # fmt: skip


# ------------------------------------------------------------------------------- one process
def test_rank_slices_make_up_the_global_batches_whatever_the_number_of_processes():
    whole = FixedCycleBatchSampler(100, 12, seed=3)
    for world, shares in [(1, None), (2, None), (2, [3, 1]), (3, [1, 2, 3]), (4, None)]:
        ranks = [
            DistributedFixedCycleBatchSampler(
                100, 12, num_replicas=world, rank=r, shares=shares, seed=3
            )
            for r in range(world)
        ]
        assert all(len(s) == len(whole) == 8 for s in ranks)
        assert [[i for part in parts for i in part] for parts in zip(*ranks)] == list(whole)
        assert sum(s.local_batch_size for s in ranks) == 12
        glued = torch.cat([s.epoch_batches(2) for s in ranks], dim=1)
        assert torch.equal(glued, whole.epoch_batches(2))
        assert [i for s in ranks for i in s.batch(5)] == whole.batch(5)
    uneven = DistributedFixedCycleBatchSampler(100, 12, num_replicas=2, rank=0, shares=[3, 1])
    assert uneven.sizes == [9, 3] and uneven.epoch_batches().shape == (8, 9)


def test_reshuffled_batches_follow_the_epoch_on_every_rank():
    kwargs = dict(num_replicas=2, reshuffle=True, seed=1)
    s0 = DistributedFixedCycleBatchSampler(40, 8, rank=0, **kwargs)
    s1 = DistributedFixedCycleBatchSampler(40, 8, rank=1, **kwargs)
    whole = FixedCycleBatchSampler(40, 8, seed=1, reshuffle=True)
    for s in (s0, s1, whole):
        s.set_epoch(4)
    assert [a + b for a, b in zip(s0, s1)] == list(whole)


def test_split_sizes_round_by_largest_remainder_and_refuse_an_empty_rank():
    assert split_sizes(16, None, 2) == [8, 8]
    assert split_sizes(16, [3, 1], 2) == [12, 4]
    assert split_sizes(10, [1, 1, 1], 3) == [4, 3, 3]
    assert split_sizes(7, [0.5, 0.25, 0.25], 3) == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert split_sizes(64, [12, 4], 2) == [48, 16]
    with pytest.raises(ValueError, match=r"split a global batch of 4 as 4,0, leaving rank 1"):
        split_sizes(4, [100, 1], 2)
    assert sizes_from_speeds(16, [3000.0, 1000.0]) == [12, 4]
    assert sizes_from_speeds(4, [1e6, 1.0]) == [3, 1]  # a very slow rank still gets one sample


@pytest.mark.parametrize(
    ("text", "world", "expected"),
    [
        ("3,1", 2, [3.0, 1.0]),
        (" 0.75, 0.25 ", None, [0.75, 0.25]),
        ("auto", 4, "auto"),
        ("", 2, None),
        (None, 2, None),
    ],
)
def test_parse_shares(text, world, expected):
    assert parse_shares(text, world) == expected


@pytest.mark.parametrize(
    ("text", "world", "message"),
    [
        ("3,x", None, "Invalid shares: '3,x' (comma-separated positive numbers"),
        ("3,0", None, "Invalid shares: '3,0'"),
        ("1,nan", None, "Invalid shares: '1,nan'"),
        ("3,1", 3, "Invalid shares: '3,1' names 2 processes, but the job has 3"),
    ],
)
def test_bad_shares_are_named(text, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_shares(text, world)


def test_disagreeing_ranks_are_found():
    assert disagreeing_ranks(["a", "a", "a"]) == []
    assert disagreeing_ranks(["a", "b", "a", "c"]) == [1, 3]


def test_worker_argv_drops_nproc_and_names_the_run_directory():
    argv = ["-q", "train", "--nproc", "2", "--lr", "0.1", "--nproc=3", "--shares", "3,1"]
    assert worker_argv(argv, out="runs/x", threads=True) == [
        *("-q", "train", "--lr", "0.1", "--shares", "3,1"),
        *("--out", "runs/x", "--threads", "1"),
    ]
    assert worker_argv(["train", "--resume", "r"], out=None, threads=False) == [
        *("train", "--resume", "r")
    ]


def test_augmentation_of_a_share_equals_that_share_of_the_augmented_batch():
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    whole = Preprocess("scale", crop_padding=2, flip=True, seed=5)(x, train=True)
    rows = [slice(0, 7), slice(7, 10)]
    parts = [
        Preprocess("scale", crop_padding=2, flip=True, seed=5)(x[r], train=True, within=(10, r))
        for r in rows
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_bad_data_parallel_flags_give_one_line_and_exit_code_2(capsys, monkeypatch, tmp_path):
    out = str(tmp_path / "never")
    cases = [
        (["train", "--shares", "3,x", "--out", out], "Invalid shares: '3,x'"),
        (["train", "--shares", "3,1", "--out", out], "names 2 processes, but the job has 1"),
        (["train", "--nproc", "0", "--out", out], "--nproc must be >= 1, got 0"),
        (["train", "--nproc", "2", "--shares", "1,1,1", "--out", out], "but the job has 2"),
        (["train", "--nproc", "2", "--dist-timeout", "0", "--out", out], "--dist-timeout must be"),
        (["train", "--dist-timeout", "60", "--out", out], "--dist-timeout applies to data-para"),
        (["train", "--device", "tpu", "--out", out], "invalid device: 'tpu'"),
        (["batch-study", "--procs", "2", "--out", out], "--procs must include 1"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("isgd: error: ") and expected in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--nproc", "2", "--out", out]) == 2
    assert "under torchrun, drop it" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, idx_dir: str, out: str) -> None:
    """One of 2 ranks: an even-shares run, then a 3,1 run; saves what the test compares."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    ctx = distributed.init_from_env(timeout=60)
    finished = False
    try:
        for name, shares in (("even", None), ("uneven", "3,1")):
            run_dir = Path(out) / name
            config = resolve_config(overrides=dict(TRAIN, dataset=f"idx:{idx_dir}"))
            trainer = Trainer(config, run_dir, dist=ctx, shares=shares)
            if rank == 0:
                prepare_run_dir(run_dir)
            summary = trainer.run(progress=False)
            state = {
                "params": [p.detach().clone() for p in trainer.model.parameters()],
                "optimizer": trainer.optimizer.state_dict(),
                "decisions": trainer.decision_digest,
                "summary": summary,
            }
            torch.save(state, Path(out) / f"{name}-rank{rank}.pt")
        # rank 1 alone gets SIGTERM after iteration 50's regular pass: its vote rides step 51's
        # loss all-reduce, and both ranks stop after iteration 51
        run_dir = Path(out) / "signal"
        config = resolve_config(overrides=dict(TRAIN, dataset=f"idx:{idx_dir}"))
        trainer = Trainer(config, run_dir, dist=ctx, callbacks=[_SigtermAt(50 if rank else -1)])
        if rank == 0:
            prepare_run_dir(run_dir)
        try:
            trainer.run(progress=False)
        except TrainingInterrupted as err:
            torch.save([int(err.signum), err.iteration], Path(out) / f"signal-rank{rank}.pt")
        finished = True
    finally:
        distributed.shutdown(ctx, finished)


class _SigtermAt(Callback):
    """A SIGTERM received by this rank just after iteration ``at`` (as the handler records it)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if record["iteration"] == self.at:
            trainer._signals.signum = signal.SIGTERM


@pytest.fixture(scope="module")
def two_ranks(tiny_idx_dir, tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo on the loopback interface 'lo' (Linux)")
    out = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(_rank_worker, args=(_free_port(), str(tiny_idx_dir), str(out)), nprocs=2)
    return out


@pytest.fixture(scope="module")
def one_process(tiny_idx_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    config = resolve_config(overrides=dict(TRAIN, dataset=f"idx:{tiny_idx_dir}"))
    trainer = Trainer(config, run_dir)
    prepare_run_dir(run_dir)
    trainer.run(progress=False)
    return run_dir


def _steps(run_dir: Path) -> list[dict]:
    return [runio.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def _decisions(steps: list[dict]) -> list[tuple]:
    return [(s["iteration"], s["batch_id"], s["triggered"], s["extra_iters"]) for s in steps]


def _assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_ranks_reach_the_weights_and_decisions_of_one_process(two_ranks, one_process):
    ranks = [torch.load(two_ranks / f"even-rank{r}.pt", weights_only=False) for r in (0, 1)]
    # ISGD's state (base optimizer, chart, counters) and every step's decision: same bytes
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert distributed.digest(ranks[0]["optimizer"]) == distributed.digest(ranks[1]["optimizer"])
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    summary = ranks[0]["summary"]
    assert summary["distributed/batch_sizes"] == [8, 8]
    assert summary["distributed/ranks_checked"] == ITERS // 100  # 3 checkpoints and the end
    # ... and the single-process run's weights and decisions, triggers included
    single, double = _steps(one_process), _steps(two_ranks / "even")
    assert sum(s["triggered"] for s in single) >= 5
    assert sum(s["extra_iters"] for s in single) >= 10
    assert _decisions(double) == _decisions(single)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(single, double)) < 1e-4
    _assert_close_weights(
        torch.load(two_ranks / "even" / "model.pt"), torch.load(one_process / "model.pt")
    )
    assert not (two_ranks / "even" / "config.toml").exists()  # only what rank 0 was asked to


@pytest.mark.slow
def test_uneven_shares_give_the_result_of_even_shares(two_ranks):
    ranks = [torch.load(two_ranks / f"uneven-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["summary"]["distributed/batch_sizes"] == [12, 4]
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert _decisions(_steps(two_ranks / "uneven")) == _decisions(_steps(two_ranks / "even"))
    # 12 + 4 samples sum in another order than 8 + 8: rounding, amplified over 400 steps with
    # extra iterations, leaves the weights ≈ 1e-7 apart on some CPUs and ≈ 4e-4 (relative) on
    # others (AVX-512 EPYC); a wrong weighting of the shares would be off by O(1)
    uneven, even = (torch.load(two_ranks / n / "model.pt") for n in ("uneven", "even"))
    assert uneven.keys() == even.keys()
    for key in even:
        assert float((uneven[key] - even[key]).norm() / even[key].norm()) < 5e-3, key


@pytest.mark.slow
def test_one_ranks_stop_vote_rides_the_loss_message_and_stops_every_rank_alike(two_ranks):
    for rank in (0, 1):  # the vote of rank 1 after step 50 went out with step 51's loss
        assert torch.load(two_ranks / f"signal-rank{rank}.pt") == [int(signal.SIGTERM), 51]
    run = two_ranks / "signal"
    assert (run / "checkpoints" / "ckpt-00000051.pt").exists()
    assert len((run / "steps.jsonl").read_text().splitlines()) == 51


def _child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of ``parent``'s child process whose environment says ``RANK=rank`` (Linux)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_in_bounded_time_and_the_run_resumes(
    tiny_idx_dir, two_ranks, tmp_path
):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "isgd", "train", "--nproc", "2"]
    argv += ["--dataset", f"idx:{tiny_idx_dir}"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items() if k != "tensorboard"]
    argv += ["--no-tensorboard", "--no-progress", "--dist-timeout", "30", "--out", str(run)]
    argv = [a.replace("--checkpoint-every=100", "--checkpoint-every=50") for a in argv]
    job = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        steps = run / "steps.jsonl"
        while not (steps.exists() and len(steps.read_text().splitlines()) >= 100):
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
            time.sleep(0.02)
        victim = _child_with_rank(job.pid, 1)
        assert victim is not None
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 4 and elapsed < 30, (job.returncode, elapsed, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert any(
        line.startswith(f"isgd: error: rank 1 (pid {victim}) ended by SIGKILL") for line in lines
    ), err
    assert any("rank 0 of 2: another rank died or stopped" in line for line in lines), err
    assert all(f"resume with: isgd train --nproc 2 --resume {run}" in line for line in lines)
    assert not (run / "model.pt").exists()
    # torchrun (through --nproc) resumes it to the bytes of an uninterrupted 2-rank run
    resumed = subprocess.run(
        [sys.executable, "-m", "isgd", "-q", "train", "--nproc", "2", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "model.pt").read_bytes() == (two_ranks / "even" / "model.pt").read_bytes()
    assert (run / "steps.jsonl").read_text() == (two_ranks / "even" / "steps.jsonl").read_text()
