"""The report of a comparison, written again by ``--retarget`` from run directories in both
formats: what it says first, how it names its numbers, and the metric it speaks of."""

from __future__ import annotations

import json
import shutil

import pytest

from isgd.errors import RunError
from isgd.experiments.compare import retarget
from isgd.experiments.records import load_records, summarize
from isgd.reporting.compare_report import coinciding, time_caption
from isgd.training import runio
from tests.experiments.test_records import records_of, write_comparison


def test_an_old_comparison_is_reported_again_identical_seeds_first(tmp_path):
    out = write_comparison(tmp_path / "cmp")  # as isgd compare left it before workloads
    destination = retarget(out, 0.7)
    report = (destination / "report.md").read_text()
    assert "Target test accuracy **70%**" in report
    first = report.index("**Read this first — identical computation up to the target:**")
    assert first < report.index("| arm |")  # before any table
    assert (
        "- isgd: ISGD did not act before the target in 1 of 3 seeds (0 extra iterations before "
        "the crossing): these seeds do not test it." in report
    )
    assert "- isgd: computed exactly what sgd computed up to the target in 1 of 3 seeds" in report
    # the top table leads with passes and the paired interval; seconds come after, named
    header = next(line for line in report.splitlines() if line.startswith("| arm | passes"))
    assert header.index("passes, paired ratio sgd/arm [95 % CI]") < header.index("time to target")
    assert "time: ratio of medians / saving (shared machine)" in header
    assert "time: per-seed ratio, median [min–max]" in header
    assert "paired time ratio" not in report
    assert "| final accuracy (%) |" in header
    # the seed SGD missed is charged SGD's whole run and said so
    assert "| 3 (1 sgd missed: bound) |" in report
    assert "charged its whole run" in report
    assert "Wilcoxon" in report and "detectable (80 % power)" in report
    assert "Seconds: wall-clock, each run timed on its own on a shared machine" in report
    summary = json.loads((destination / "summary.json").read_text())
    assert (summary["metric"], summary["higher_is_better"]) == ("accuracy", True)
    records = load_records(destination)
    assert [r["extra_iters_to_target"] for r in records if r["arm"] == "isgd"] == [0, 4, 3]
    for name in ("error_vs_time", "error_vs_passes", "time_to_target", "loss_spread"):
        assert (destination / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_lower_is_better_metric_is_named_and_printed_plain(tmp_path):
    out = write_comparison(tmp_path / "cmp", metric="bits_per_char")
    destination = retarget(out, 1.6)
    report = (destination / "report.md").read_text()
    assert "Target test bits per char **1.6** (lower is better)" in report
    assert "| final bits per char |" in report and "final accuracy" not in report
    assert "balanced" not in report
    # sgd seed 0 ends at 3 − 2·0.9 = 1.2: four significant digits, no percent
    assert "| sgd | 0 | 2.5 | 25 [30] | 1.2 | 0 |" in report
    assert "### Final bits per char, paired: arm − sgd in its units" in report
    # final 1.16, 1.24, 1.40 against 1.2, 1.3, 1.7: −0.133 [−0.493, +0.226] in bits per char
    assert "isgd − sgd = -0.133 [-0.493 – +0.226], 95 % interval over 3 paired seeds" in report
    assert "| isgd | -0.1333 [-0.4927 – +0.2261] | 0.25 |" in report
    # the same crossings as the accuracy reading of the same curves: ratios alike
    accuracy = summarize(records_of(write_comparison(tmp_path / "acc"), 0.7), ["sgd", "isgd"])
    bits = json.loads((destination / "summary.json").read_text())
    for what in ("passes", "seconds"):
        expected = accuracy["arms"]["isgd"]["paired"][what]["ratios"]
        assert bits["arms"]["isgd"]["paired"][what]["ratios"] == expected


def test_the_time_figure_says_where_arms_coincide(tmp_path):
    records = records_of(write_comparison(tmp_path / "cmp"), 0.7)
    for r in records:  # isgd takes sgd's passes in every seed
        if r["arm"] == "isgd":
            twin = next(x for x in records if x["arm"] == "sgd" and x["seed"] == r["seed"])
            r["passes_to_target"] = twin["passes_to_target"]
    caption = time_caption(records, ["sgd", "isgd"])
    assert caption.startswith("Seconds: wall-clock, each run timed on its own")
    assert "Identical passes to target in every seed: sgd = isgd." in caption
    assert "Identical seconds" not in caption
    assert coinciding(records, ["sgd", "isgd"], "evaluations") == []  # seeds 1, 2 differ


def test_retarget_without_the_run_directories_is_one_line_saying_what_it_needs(tmp_path):
    out = write_comparison(tmp_path / "cmp")
    copy = tmp_path / "records"  # what docs/results keeps: the records without runs/
    copy.mkdir()
    for name in ("runs.jsonl", "summary.json"):
        (copy / name).write_text((out / name).read_text())
    shutil.rmtree(out / "runs")
    with pytest.raises(RunError, match=r"its runs are not here \(.*sgd-seed0 and 5 more\)"):
        retarget(copy, 0.7)
    assert not (copy / "target-0.7").exists()


def test_retarget_of_a_summary_an_older_compare_wrote_is_one_line(tmp_path):
    out = write_comparison(tmp_path / "cmp")
    summary = runio.read_json(out / "summary.json")
    del summary["arms_spec"]  # summaries before the arms' specification was recorded
    runio.write_json(out / "summary.json", summary)
    with pytest.raises(RunError, match=r"summary.json lacks arms_spec \(written by an older"):
        retarget(out, 0.7)
    assert not (out / "target-0.7").exists()


def test_a_target_from_fewer_baseline_seeds_than_the_protocol_asks_says_so():
    from isgd.reporting.compare_report import _target_line

    result = {"target": 0.99, "target_rule": "baseline", "config": {"validation": 5000}}
    line = _target_line({**result, "seeds": [0, 1, 2]})
    assert line == (
        "Target validation accuracy **99%** (the worst final validation figure of the baseline's "
        "seeds: `--target baseline`, from 3 baseline seeds; the protocol asks for 5)"
    )
    assert "protocol" not in _target_line({**result, "seeds": [0, 1, 2, 3, 4]})
    assert "protocol" not in _target_line({"target": 0.99, "seeds": [0, 1]})  # a given target
