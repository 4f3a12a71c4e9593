"""The built-in character language model: windows and targets, the metric, a short run on the
tiny excerpt the tests ship (no network, no fetched data), the preset, and the learning-rate
warm-up it uses."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from isgd.cli import main
from isgd.data.shakespeare import split_works
from isgd.errors import ConfigError, DataError
from isgd.training import runio
from isgd.training.config import (
    IMAGE_KEYS,
    PRESETS,
    TrainConfig,
    dump_toml,
    lr_factor,
    resolve_config,
)
from isgd.training.lifecycle import train
from isgd.training.workload import WorkloadError, check_workload, collate, load_workload
from isgd.training.workloads import (
    BITS_PER_CHAR,
    VOCAB,
    TextWindows,
    charlm_shakespeare,
    lm_loss,
    text_workload,
)

EXCERPT = (Path(__file__).parents[1] / "data" / "shakespeare_excerpt.txt").read_text()
WORKS = [EXCERPT[:2800], EXCERPT[2800:]]  # two "works"
TINY = dict(context=16, split=(0.8, 0.1), layers=1, width=32, heads=2)
SPEC = "isgd.training.workloads:charlm_shakespeare"


# ------------------------------------------------------------------------------ windows
def test_windows_and_targets_are_the_text_shifted_by_one() -> None:
    blocks, context = ["abcdefghij", "0123456", "xyz"], 3
    windows = TextWindows(blocks[:2], context, validation=blocks[2:])
    # (len - 1) // context windows per block: 3, 2 and 0; none crosses the end of a block
    assert len(windows) == 5 and windows.validation_windows == 0
    x, y = windows.gather(torch.arange(5))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (5, context)
    text = ["".join(map(chr, row)) for row in x.tolist()]
    assert text == ["abc", "def", "ghi", "012", "345"]
    assert ["".join(map(chr, row)) for row in y.tolist()] == ["bcd", "efg", "hij", "123", "456"]
    assert torch.equal(y[:, :-1], x[:, 1:])
    for index in (range(1, 4), [1, 2, 3], torch.tensor([1, 2, 3])):  # as collate passes them
        assert torch.equal(windows.gather(index)[0], x[1:4])
    assert torch.equal(windows[4][1], y[4])
    assert TextWindows(["ab"], 3, validation=["abcdefg", "abcd"]).validation_windows == 3


def test_a_text_that_is_not_ascii_is_one_line() -> None:
    with pytest.raises(DataError, match="block 1 of the text is not ASCII at offset 2"):
        TextWindows(["abc", "ab\u00e9"], 2)


def test_a_uniform_model_scores_log2_of_the_vocabulary() -> None:
    target = torch.randint(0, VOCAB, (4, 16))
    uniform = torch.zeros(4, 16, VOCAB)
    assert float(BITS_PER_CHAR.fn(uniform, target)) == pytest.approx(7.0, abs=1e-6)
    assert float(lm_loss(uniform, target)) == pytest.approx(math.log(VOCAB), abs=1e-6)
    assert not BITS_PER_CHAR.higher_is_better and BITS_PER_CHAR.reached(1.9, 2.0)


def test_the_text_workload_fits_together_and_holds_out_the_validation_text() -> None:
    workload = check_workload(text_workload(WORKS, **TINY), "tiny")
    assert not workload.is_classification and workload.judged_by is BITS_PER_CHAR
    blocks = split_works(WORKS, TINY["split"])
    held_out = workload.train.validation_windows
    assert held_out == sum((len(v) - 1) // 16 for v in blocks.validation) > 10
    rest, validation = workload.split_validation(held_out)

    def windows(dataset) -> list[str]:
        x, _ = collate(dataset, range(len(dataset)))
        return ["".join(map(chr, row)) for row in x.tolist()]

    for dataset, split in ((rest.train, blocks.train), (validation, blocks.validation)):
        assert all(any(w in block for block in split) for w in windows(dataset))
    assert all(any(w in block for block in blocks.test) for w in windows(workload.test))


# --------------------------------------------------------------------- a run, the preset
def _tiny_config(**overrides) -> TrainConfig:
    """The preset's recipe (optimizer, warm-up, cosine) at the tiny text's scale."""
    workload = text_workload(WORKS, **TINY)
    keys = dict(
        iters=80, batch_size=16, warmup=8, window=10, eval_every=40, checkpoint_every=80,
        validation=workload.train.validation_windows, threads=1, tensorboard=False,
    )  # fmt: skip
    return resolve_config("charlm-shakespeare", None, {**keys, **overrides})


def test_a_short_run_on_the_tiny_text_lowers_the_validation_bits_per_char(tmp_path) -> None:
    torch.manual_seed(0)
    summary = train(
        _tiny_config(), tmp_path / "run", workload=text_workload(WORKS, **TINY), progress=False
    )
    evals = list(runio.read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert summary["metric/name"] == "bits_per_char"
    assert [r["iteration"] for r in evals] == [0, 40, 80]
    first, last = evals[0]["val/metric"], evals[-1]["val/metric"]
    assert first == pytest.approx(7.0, abs=0.1)  # the initialised model knows nothing yet
    assert last < first - 2.0 and summary["final/val_metric"] == last
    assert summary["final/test_metric"] < first - 2.0  # read once, at the end


def test_the_preset_names_its_workload_and_no_image_key() -> None:
    preset = PRESETS["charlm-shakespeare"]
    assert preset["workload"] == SPEC and not set(IMAGE_KEYS) & set(preset)
    config = resolve_config("charlm-shakespeare")
    assert config.workload == SPEC and config.preset == "charlm-shakespeare"
    assert config.optimizer == "isgd-adamw" and config.warmup > 0 and config.lr_policy == "cosine"
    assert 0 < config.window <= config.iters // 4  # ISGD's chart fills at budget 1/4 too


def test_a_preset_with_a_workload_still_refuses_another_workload(tmp_path) -> None:
    with pytest.raises(ConfigError, match="preset charlm-shakespeare names its own"):
        resolve_config("charlm-shakespeare", None, {"workload": "wl.py:workload"})
    with pytest.raises(ConfigError, match="drop model"):
        resolve_config("charlm-shakespeare", None, {"model": "mlp"})
    saved = tmp_path / "config.toml"  # what a run writes, and --resume reads back
    saved.write_text(dump_toml(resolve_config("charlm-shakespeare", None, {"iters": 7})))
    again = resolve_config(config_file=saved)
    assert again.workload == SPEC and again.iters == 7 and again.preset == "charlm-shakespeare"


def test_missing_shakespeare_is_one_line_saying_how_to_fetch_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ISGD_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=re.escape(f"shakespeare --data-dir {tmp_path}`")):
        charlm_shakespeare(0)
    with pytest.raises(DataError) as info:  # isgd's own error passes through, not re-wrapped
        load_workload(SPEC, 0)
    assert not isinstance(info.value, WorkloadError)
    assert "isgd data fetch shakespeare" in str(info.value) and "\n" not in str(info.value)


def test_data_dir_reaches_the_workload_for_the_command_only(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ISGD_DATA_DIR", str(tmp_path / "elsewhere"))
    argv = ["train", "--preset", "charlm-shakespeare", "--data-dir", str(tmp_path / "d")]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"Shakespeare not found in {tmp_path / 'd' / 'shakespeare'};" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
    assert os.environ["ISGD_DATA_DIR"] == str(tmp_path / "elsewhere")  # as it was


# -------------------------------------------------------------------------------- warm-up
@pytest.mark.parametrize("policy", ["fixed", "inv", "step", "multistep", "cosine"])
@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_warmup_ramps_linearly_then_leaves_the_policy_as_it_was(policy, budget) -> None:
    keys = dict(lr_policy=policy, milestones=[400], step_size=300, gamma=0.5, budget=budget)
    plain, warm = TrainConfig(**keys), TrainConfig(**keys, warmup=100)
    total = round(1000 * budget)
    ramp = round(100 * budget)  # warm-up iterations at this budget
    for t in range(total):
        expected = lr_factor(plain, t, total) * min(1.0, (t + 1) / ramp)
        assert lr_factor(warm, t, total) == pytest.approx(expected, rel=1e-12)
    assert lr_factor(warm, 0, total) == pytest.approx(lr_factor(plain, 0, total) / ramp)
    for t in range(ramp - 1, total):  # from the warm-up's last iteration on: the policy's own
        assert lr_factor(warm, t, total) == lr_factor(plain, t, total)


def test_no_warmup_leaves_every_schedule_bit_identical() -> None:
    assert TrainConfig().warmup == 0
    inv, cosine = TrainConfig(lr_policy="inv", budget=0.5), TrainConfig(lr_policy="cosine")
    multistep = TrainConfig(lr_policy="multistep", milestones=[10], gamma=0.1)
    for t in (0, 7, 10, 19):  # the formulas as they were, to the bit
        assert lr_factor(inv, t, 20) == (1.0 + 1e-4 * (t / 0.5)) ** -0.75
        assert lr_factor(cosine, t, 20) == 0.5 * (1.0 + math.cos(math.pi * t / 20))
        assert lr_factor(multistep, t, 20) == 0.1 ** (t >= 10)


def test_a_negative_warmup_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"invalid warmup: -1 \(iterations of warm-up"):
        TrainConfig(warmup=-1).validate()


def test_the_lm_loss_gives_per_sequence_losses_for_selective_backprop():
    from isgd.training.workloads import lm_loss

    g = torch.Generator().manual_seed(0)
    output, target = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    per_sequence = lm_loss(output, target, reduction="none")
    assert per_sequence.shape == (3,)
    expected = [float(lm_loss(output[i : i + 1], target[i : i + 1])) for i in range(3)]
    assert per_sequence.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(per_sequence.mean()) == pytest.approx(float(lm_loss(output, target)), rel=1e-6)
