r"""``isgd batch-study``: the best batch size for the machine at hand (claim C4).

The time to a target accuracy under synchronous data parallelism, modelled as below, each term
measured here::

    T_iter(b, k)  ≈ T_compute(b / k) + T_sync(n_w, k)     # k processes, global batch b
    throughput    = b / T_iter(b, k)                      # saturates once each worker is busy
    time_to_acc(b) ≈ passes_to_acc(b) · T_iter(b, k)      # interior optimum, machine dependent

1. **Throughput** against per-process batch size for each number of processes ``k``: training
   steps (forward, backward, DDP all-reduce for ``k > 1``, SGD update) on synthetic tensors of the
   data set's shape, after warm-up steps; the median over repeats of the mean step time.
2. **Synchronization cost**: ``dist.all_reduce`` time against the number of floats (median over
   repeats, each after a barrier), and ``T_sync`` for the model's ``n_w`` interpolated from it.
3. **Saturation**: the per-process batch after which doubling it raises throughput by less than
   ``saturation`` (10 %).
4. **Passes to target** for several global batch sizes: real training runs (one process) with the
   learning rate scaled linearly with the batch, ``lr = lr_0 · b / b_0``, and the ``inv`` decay
   rate scaled alike, ``γ = γ_0 · b / b_0`` (the same decay per epoch), from the preset; each run
   stops at the first evaluation that reaches the target (∞ when the budget ends first).
   Passes (ISGD's extra iterations included) do not depend on ``k``: the distributed sampler keeps
   the global batches of a single process.
5. **Time to target** ``passes_to_target(b) × T_iter(b / k, k)`` for every ``b`` and ``k``; the
   table names the best batch size (and number of processes) for this machine.

One module because it is one study: its measurements (1–4, with the worker processes they
spawn) and the analysis (5) share the plan and the result's layout. The report and figures are
:mod:`isgd.reporting.batch_study_report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from isgd.reporting.batch_study_report import series_name, write_figures, write_report
from isgd.training import runio

__all__ = ["StudyPlan", "combine", "run_study", "saturation_point"]

log = logging.getLogger("isgd.experiments.batch_study")


@dataclasses.dataclass
class StudyPlan:
    """What to measure (the flags of ``isgd batch-study``)."""

    out: Path
    preset: str = "lenet-mnist"
    dataset: str = ""  # default: the preset's
    model: str = ""  # default: the preset's
    optimizer: str = "isgd"
    lr: float = 0.0  # lr_0 at the preset's batch b_0 (0: the preset's)
    procs: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    threads: int = 1  # per process
    batch_sizes: list[int] = dataclasses.field(
        default_factory=lambda: [16, 32, 64, 128, 256, 512, 1024]
    )
    allreduce_sizes: list[int] = dataclasses.field(
        default_factory=lambda: [10**3, 10**4, 10**5, 10**6, 10**7]
    )
    target_batches: list[int] = dataclasses.field(
        default_factory=lambda: [32, 64, 128, 256, 512, 1024]
    )
    target: float = 0.985
    epochs: float = 4.0  # budget of each passes-to-target run
    evals_per_epoch: int = 10  # the resolution of passes to target
    train_threads: int = 1  # threads of the passes-to-target runs (passes do not depend on it)
    warmup: int = 3
    steps: int = 10
    repeats: int = 3
    saturation: float = 0.10
    device: str = "cpu"
    seed: int = 0
    data_dir: str | None = None

    @classmethod
    def quick(cls, out: Path, **kwargs: Any) -> StudyPlan:
        """A reduced grid: a few minutes on two cores."""
        grid: dict[str, Any] = dict(
            batch_sizes=[16, 64, 256],
            allreduce_sizes=[10**4, 10**6],
            target_batches=[64, 256],
            target=0.97,
            epochs=2.0,
            evals_per_epoch=4,
            steps=5,
            repeats=2,
        )
        grid.update(kwargs)
        return cls(out, **grid)


# ---------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(net, opt, x, y, plan: StudyPlan, device: torch.device) -> list[float]:
    """Seconds per training step: ``repeats`` blocks of ``steps`` steps after ``warmup``."""

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(plan.warmup):
        one()
    _sync(device)
    blocks = []
    for _ in range(plan.repeats):
        start = time.perf_counter()
        for _ in range(plan.steps):
            one()
        _sync(device)
        blocks.append((time.perf_counter() - start) / plan.steps)
    return blocks


def _shape(plan: StudyPlan) -> dict[str, int]:
    from isgd.data import load_dataset

    data = load_dataset(plan.dataset, plan.data_dir)
    return dict(
        channels=data.in_channels,
        size=data.image_size,
        classes=data.num_classes,
        n=len(data.x_train),
    )


def _build(plan: StudyPlan, shape: dict[str, int], device: torch.device):
    from isgd.models import build_model

    torch.manual_seed(plan.seed)
    model = build_model(plan.model, shape["channels"], shape["classes"], shape["size"])
    model = model.to(memory_format=torch.channels_last).to(device)  # type: ignore[call-overload]
    return model


def _throughput_series(
    plan: StudyPlan, shape: dict[str, int], k: int, rank: int, device: torch.device
) -> dict[str, Any]:
    """Step times for every per-process batch size, in one process of ``k`` (rank ``rank``)."""
    model = _build(plan, shape, device)
    net = model
    if k > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(plan.seed + rank)
    rows = []
    for b in plan.batch_sizes:
        x = torch.randn(b, shape["channels"], shape["size"], shape["size"], generator=generator)
        x = x.contiguous(memory_format=torch.channels_last).to(device)
        y = torch.randint(0, shape["classes"], (b,), generator=generator).to(device)
        blocks = _time_steps(net, opt, x, y, plan, device)
        if k > 1:  # a step lasts as long as its slowest rank
            gathered: list[Any] = [None] * k
            dist.all_gather_object(gathered, blocks)
            blocks = [max(column) for column in zip(*gathered)]
        t_iter = statistics.median(blocks)
        rows.append(
            dict(
                batch_per_process=b,
                global_batch=b * k,
                seconds_per_step=t_iter,
                blocks=blocks,
                images_per_second=b * k / t_iter,
            )
        )
    n_w = sum(p.numel() for p in model.parameters())
    return dict(processes=k, threads=torch.get_num_threads(), n_w=n_w, rows=rows)


def _allreduce_series(plan: StudyPlan, k: int, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for n in plan.allreduce_sizes:
        tensor = torch.zeros(n, device=device)
        for _ in range(2):
            dist.all_reduce(tensor)
        times = []
        for _ in range(max(3, plan.repeats * 3)):
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            dist.all_reduce(tensor)
            _sync(device)
            times.append(time.perf_counter() - start)
        gathered: list[Any] = [None] * k
        dist.all_gather_object(gathered, times)
        times = [max(column) for column in zip(*gathered)]
        rows.append(dict(floats=n, seconds=statistics.median(times), repeats=times))
    return rows


def _worker(
    rank: int, k: int, port: int, plan_dict: dict[str, Any], shape: dict[str, int], result: str
) -> None:
    """One of ``k`` processes measuring throughput and all-reduce times (rank 0 writes them)."""
    plan = StudyPlan(**{**plan_dict, "out": Path(plan_dict["out"])})
    torch.set_num_threads(plan.threads)
    device = torch.device("cuda", rank) if plan.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=k,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        series = _throughput_series(plan, shape, k, rank, device)
        allreduce = _allreduce_series(plan, k, device)
        if rank == 0:
            Path(result).write_text(json.dumps(dict(series=series, allreduce=allreduce)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_throughput(plan: StudyPlan, shape: dict[str, int]) -> dict[str, Any]:
    """Throughput series for each ``k`` in ``plan.procs`` (plus, on CPU, one process with as
    many threads as the largest ``k`` has processes, for comparison) and all-reduce times for
    each ``k > 1``."""
    series, allreduce = [], []
    k_max = max(plan.procs)
    device = torch.device("cuda", 0) if plan.device == "cuda" else torch.device("cpu")
    singles = [plan.threads]  # one process: T_compute of the model, always measured
    if k_max > 1 and device.type == "cpu":  # the same cores as one process with more threads
        singles.append(k_max * plan.threads)
    previous = torch.get_num_threads()
    try:
        for threads in singles:
            torch.set_num_threads(threads)
            log.info("throughput: 1 process x %d thread(s)", threads)
            series.append(_throughput_series(plan, shape, 1, 0, device))
    finally:
        torch.set_num_threads(previous)
    for k in sorted(p for p in plan.procs if p > 1):
        log.info("throughput and all-reduce: %d processes x %d thread(s)", k, plan.threads)
        series_k, allreduce_k = _spawn(plan, shape, k)
        series.append(series_k)
        allreduce.append(dict(processes=k, rows=allreduce_k))
    return dict(series=series, allreduce=allreduce)


def _spawn(plan: StudyPlan, shape: dict[str, int], k: int):
    import torch.multiprocessing as mp

    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # traffic stays on loopback
    plan_dict = {**dataclasses.asdict(plan), "out": str(plan.out)}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        mp.spawn(_worker, args=(k, _free_port(), plan_dict, shape, str(result)), nprocs=k)
        data = json.loads(result.read_text())
    return data["series"], data["allreduce"]


# ---------------------------------------------------------------------- passes to target
def _target_config(plan: StudyPlan, batch: int, n_train: int):
    """The preset with batch ``batch``: lr and the inv decay rate scaled by ``batch / b_0``."""
    from isgd.training.config import apply, resolve_config

    base = resolve_config(plan.preset)
    scale = batch / base.batch_size
    if plan.lr:
        base.lr = plan.lr
    n_b = n_train // batch
    overrides: dict[str, Any] = dict(
        batch_size=batch,
        lr=base.lr * scale,
        optimizer=plan.optimizer,
        iters=max(1, math.ceil(plan.epochs * n_b)),
        eval_every=max(1, round(n_b / plan.evals_per_epoch)),
        checkpoint_every=10**9,
        log_every=max(1, n_b),  # one progress line per epoch
        target=plan.target,
        threads=plan.train_threads,
        tensorboard=False,
        seed=plan.seed,
        device=plan.device,
    )
    if base.lr_policy == "inv":
        overrides["gamma"] = base.gamma * scale
    if plan.dataset:
        overrides["dataset"] = plan.dataset
    if plan.model:
        overrides["model"] = plan.model
    return apply(base, overrides, "the batch study").validate()


def measure_passes_to_target(plan: StudyPlan) -> list[dict[str, Any]]:
    """One training run per global batch size, each stopped at the target (∞ when missed)."""
    from isgd.data import load_dataset
    from isgd.training.callbacks import Callback
    from isgd.training.lifecycle import prepare_run_dir
    from isgd.training.train import NonFiniteError, Trainer

    class StopAtTarget(Callback):
        def on_evaluation(self, trainer: Trainer, record: dict[str, Any]) -> None:
            if trainer.state.target:  # reached: this evaluation ends the run
                trainer.cancel_run("the target accuracy is reached")

    data = load_dataset(plan.dataset, plan.data_dir)
    records = []
    for batch in plan.target_batches:
        config = _target_config(plan, batch, len(data.x_train))
        run_dir = plan.out / "runs" / f"batch-{batch}"
        trainer = Trainer(config, run_dir, data=data, callbacks=[StopAtTarget()])
        lock = prepare_run_dir(run_dir)
        runio.atomic_write_text(run_dir / "config.toml", _toml(config))
        log.info(
            "passes to %.2f%%: global batch %d, lr %g, at most %d iterations",
            100 * plan.target,
            batch,
            config.lr,
            config.iters,
        )
        diverged = False
        try:
            summary = trainer.run(progress=False)
        except NonFiniteError as err:  # too large a learning rate for this batch: a miss
            log.warning("global batch %d diverged: %s", batch, err)
            diverged = True
            summary = {"target/passes": None, "final/test_accuracy": None, "isgd/triggers": None}
        finally:
            lock.release()
        reached = summary["target/passes"] is not None
        records.append(
            dict(
                global_batch=batch,
                diverged=diverged,
                lr=config.lr,
                gamma=config.gamma,
                iterations_budget=config.iters,
                passes_to_target=summary["target/passes"] if reached else math.inf,
                iterations_to_target=summary["target/iteration"] if reached else math.inf,
                epochs_to_target=summary["target/iteration"] / (len(data.x_train) // batch)
                if reached
                else math.inf,
                train_seconds_to_target=summary["target/train_seconds"] if reached else math.inf,
                final_accuracy=summary["final/test_accuracy"],
                triggers=summary["isgd/triggers"],
                run_dir=str(run_dir),
            )
        )
    return records


def _toml(config) -> str:
    from isgd.training.config import dump_toml

    return dump_toml(config)


# ---------------------------------------------------------------------- the analysis
def saturation_point(batches: list[int], throughput: list[float], threshold: float) -> int | None:
    """The first batch after which the next (larger) batch raises throughput by less than
    ``threshold`` (relative) — where throughput stops growing; ``None`` if it never does."""
    for i in range(len(batches) - 1):
        if throughput[i + 1] < throughput[i] * (1 + threshold):
            return batches[i]
    return None


def _interpolate_loglog(xs: list[float], ys: list[float], x: float) -> float:
    """``y(x)`` by linear interpolation in log–log space; NaN outside ``[min xs, max xs]``."""
    pairs = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in itertools.pairwise(pairs):
        if x0 <= x <= x1:
            if x in (x0, x1):  # a measured point: its own value, exactly
                return y0 if x == x0 else y1
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    if pairs and x == pairs[0][0]:
        return pairs[0][1]
    return math.nan


def combine(throughput: dict[str, Any], targets: list[dict[str, Any]], plan: StudyPlan):
    """Time to target for every (global batch, series): passes × T_iter(b / k, k); the best."""
    rows = []
    best = None
    for record in targets:
        b = record["global_batch"]
        row = dict(record)
        row["by_series"] = {}
        for series in throughput["series"]:
            k = series["processes"]
            xs = [r["batch_per_process"] for r in series["rows"]]
            ys = [r["seconds_per_step"] for r in series["rows"]]
            t_iter = _interpolate_loglog(xs, ys, b / k) if b % k == 0 else math.nan
            seconds = record["passes_to_target"] * t_iter if math.isfinite(t_iter) else math.nan
            row["by_series"][series_name(series)] = dict(seconds_per_step=t_iter, seconds=seconds)
            if math.isfinite(seconds) and (best is None or seconds < best["seconds"]):
                best = dict(global_batch=b, series=series_name(series), seconds=seconds)
        rows.append(row)
    saturation = {}
    for series in throughput["series"]:
        xs = [r["batch_per_process"] for r in series["rows"]]
        ys = [r["images_per_second"] for r in series["rows"]]
        saturation[series_name(series)] = saturation_point(xs, ys, plan.saturation)
    sync = []
    for group in throughput["allreduce"]:
        xs = [r["floats"] for r in group["rows"]]
        ys = [r["seconds"] for r in group["rows"]]
        n_w = throughput["series"][0]["n_w"]
        sync.append(
            dict(processes=group["processes"], n_w=n_w, seconds=_interpolate_loglog(xs, ys, n_w))
        )
    return dict(rows=rows, best=best, saturation=saturation, sync=sync)


def _machine() -> dict[str, Any]:
    return dict(
        host=socket.gethostname(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def run_study(plan: StudyPlan, command: list[str] | None = None) -> dict[str, Any]:
    """Measure, combine, and write ``report.md``, ``batch_study.json`` and figures to
    ``plan.out`` (which must not exist or be empty)."""
    from isgd.training.config import resolve_config
    from isgd.training.lifecycle import check_new_run_dir

    preset = resolve_config(plan.preset)
    plan.dataset = plan.dataset or preset.dataset
    plan.model = plan.model or preset.model
    check_new_run_dir(plan.out)
    started = time.perf_counter()
    shape = _shape(plan)
    _check_sizes(plan, shape)  # before the study directory is made
    plan.out.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    throughput = measure_throughput(plan, shape)
    targets = measure_passes_to_target(plan)
    result = dict(
        plan={**dataclasses.asdict(plan), "out": str(plan.out)},
        machine=machine,
        command=command or ["isgd", "batch-study"],
        throughput=throughput,
        targets=targets,
        combined=combine(throughput, targets, plan),
        wall_seconds=None,
    )
    result["wall_seconds"] = time.perf_counter() - started
    runio.write_json(plan.out / "batch_study.json", result)
    figures = write_figures(plan, result)
    write_report(plan, result, figures)
    return result


def run_from_args(args) -> dict[str, Any]:
    """``isgd batch-study``: the plan from the flags, then :func:`run_study`; its result."""
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / ("batch-study-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    )
    given = {
        key: getattr(args, key)
        for key in (
            "preset",
            "dataset",
            "model",
            "optimizer",
            "lr",
            "procs",
            "threads",
            "batch_sizes",
            "allreduce_sizes",
            "target_batches",
            "target",
            "epochs",
            "evals_per_epoch",
            "train_threads",
            "warmup",
            "steps",
            "repeats",
            "saturation",
            "device",
            "seed",
            "data_dir",
        )
        if getattr(args, key, None) is not None
    }
    plan = StudyPlan.quick(out, **given) if args.quick else StudyPlan(out, **given)
    _validate(plan)
    return run_study(plan, ["isgd", *args.argv])


MAX_ALLREDUCE_FLOATS = 10**9  # 4 GB of float32 per process: beyond any model's gradients
MAX_COUNT = 10**6  # --steps, --repeats, --warmup, --evals-per-epoch: more is a typo


def _validate(plan: StudyPlan) -> None:
    """Every flag, before any work (the data set's size is checked by :func:`_check_sizes`)."""
    from isgd.training.config import MAX_SEED, ConfigError, available_cpus

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"batch-study: {what}")

    cpus = available_cpus()
    need(bool(plan.procs) and min(plan.procs) >= 1, f"--procs must be >= 1, got {plan.procs}")
    need(1 in plan.procs, "--procs must include 1 (the single-process baseline)")
    need(
        max(plan.procs) <= cpus,
        f"--procs {max(plan.procs)}: this machine gives this process {cpus} CPU(s); more "
        "processes than that only measure contention",
    )
    for flag, threads in (("--threads", plan.threads), ("--train-threads", plan.train_threads)):
        need(
            1 <= threads <= cpus,
            f"{flag} must be >= 1 and <= {cpus} (this machine gives this process {cpus} "
            f"CPU(s)), got {threads}",
        )
    need(bool(plan.batch_sizes) and min(plan.batch_sizes) >= 1, "--batch-sizes must be >= 1")
    need(plan.batch_sizes == sorted(set(plan.batch_sizes)), "--batch-sizes must increase")
    need(bool(plan.target_batches) and min(plan.target_batches) >= 1, "--target-batches >= 1")
    need(
        bool(plan.allreduce_sizes)
        and min(plan.allreduce_sizes) >= 1
        and max(plan.allreduce_sizes) <= MAX_ALLREDUCE_FLOATS,
        f"--allreduce-sizes must be numbers of floats >= 1 and <= 10**9, got "
        f"{','.join(map(str, plan.allreduce_sizes))}",
    )
    need(0 < plan.target <= 1, f"--target must be a fraction in (0, 1], got {plan.target}")
    need(
        math.isfinite(plan.epochs) and 0 < plan.epochs <= 10**6,
        f"--epochs must be > 0 and <= 10**6, got {plan.epochs}",
    )
    need(math.isfinite(plan.lr) and plan.lr >= 0, f"--lr must be >= 0, got {plan.lr}")
    need(
        math.isfinite(plan.saturation) and plan.saturation >= 0,
        f"--saturation must be a finite number >= 0 (a relative growth, 0.1 = 10 %), got "
        f"{plan.saturation}",
    )
    need(
        min(plan.steps, plan.repeats, plan.evals_per_epoch) >= 1
        and max(plan.steps, plan.repeats, plan.evals_per_epoch, plan.warmup) <= MAX_COUNT,
        "--steps, --repeats and --evals-per-epoch must be >= 1 (and <= 10**6)",
    )
    need(plan.warmup >= 0, f"--warmup must be >= 0, got {plan.warmup}")
    need(0 <= plan.seed < MAX_SEED, f"--seed must be >= 0 and < 2**32, got {plan.seed}")
    need(plan.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {plan.device!r}")
    if plan.device == "cuda":
        need(torch.cuda.is_available(), "--device cuda: no CUDA device here")
        need(max(plan.procs) <= torch.cuda.device_count(), "--procs: more processes than GPUs")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _check_sizes(plan: StudyPlan, shape: dict[str, int]) -> None:
    """Batches against the data set (a batch beyond it is no training batch) and the memory
    (one float32 batch of inputs must fit in a quarter of it), before anything is timed."""
    from isgd.training.config import ConfigError

    n = shape["n"]
    for flag, batches in (
        ("--batch-sizes", plan.batch_sizes),
        ("--target-batches", plan.target_batches),
    ):
        if max(batches) > n:
            raise ConfigError(
                f"batch-study: {flag} {max(batches)} is larger than the data set "
                f"({plan.dataset}: {n} training images); use batches <= {n}"
            )
    memory = _physical_memory()
    per_image = 4 * shape["channels"] * shape["size"] ** 2
    if memory is not None and max(plan.batch_sizes) * per_image > memory // 4:
        raise ConfigError(
            f"batch-study: --batch-sizes {max(plan.batch_sizes)}: one batch of inputs alone "
            f"needs {max(plan.batch_sizes) * per_image / 2**30:.1f} GiB, more than a quarter of "
            f"this machine's {memory / 2**30:.1f} GiB"
        )


def redraw(out: Path) -> Path:
    """Write ``report.md`` and the figures again from ``out/batch_study.json``."""
    raw = runio.read_json(out / "batch_study.json")

    def back(obj: Any) -> Any:  # files written before the strings: NaN was null
        if obj is None:
            return math.nan
        if isinstance(obj, dict):
            return {k: back(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [back(v) for v in obj]
        return obj

    result = {
        k: back(v) if k in ("throughput", "targets", "combined") else v for k, v in raw.items()
    }
    fields = {f.name for f in dataclasses.fields(StudyPlan)}
    plan = StudyPlan(**{k: v for k, v in raw["plan"].items() if k in fields})
    plan.out = out
    result["combined"] = combine(result["throughput"], result["targets"], plan)
    return write_report(plan, result, write_figures(plan, result))
