"""``isgd table``: each cell says what the paired saving shows, and nothing more."""

from __future__ import annotations

import json
import math

import pytest

from isgd.cli import main
from isgd.errors import RunError
from isgd.reporting.answer_table import answer_table, cell


def ratio(r, low, high, *, arm_missed=0, base_missed=0, detectable=1.25):
    return dict(
        n=5,
        ratio=r,
        low=low,
        high=high,
        arm_missed=arm_missed,
        base_missed=base_missed,
        detectable=detectable,
    )


def test_an_interval_above_one_is_a_saving_in_bold() -> None:
    # base/arm = 1.25 → the arm costs 0.8 of the baseline: a 20 % saving
    assert cell(ratio(1.25, 1.1, 1.4)) == "**+20.0 % [+9.1 %, +28.6 %]**"
    assert cell(ratio(0.8, 0.7, 0.9)) == "**-25.0 % [-42.9 %, -11.1 %]**"  # a loss, shown


def test_an_interval_across_one_is_no_effect_with_the_detectable_saving() -> None:
    text = cell(ratio(1.02, 0.95, 1.1, detectable=1.25))
    assert text == "no effect detected (+2.0 % [-5.3 %, +9.1 %]; detectable ≥ 20.0 %)"
    assert "detectable" not in cell(ratio(1.0, 0.9, 1.1, detectable=math.nan))


def test_a_saving_the_arms_missed_targets_could_fake_is_not_shown() -> None:
    # the arm's misses are charged its (cheaper) whole run: the saving is only an upper bound
    assert cell(ratio(1.25, 1.1, 1.4, arm_missed=2)).startswith("not shown: ≤ +20.0 %")
    # ... but a loss despite that bound stands, and the baseline's misses bound the other way
    assert cell(ratio(0.8, 0.7, 0.9, arm_missed=2)).startswith("**")
    assert cell(ratio(0.8, 0.7, 0.9, base_missed=1)).startswith("not shown: ≥ -25.0 %")
    assert cell(ratio(1.25, 1.1, 1.4, base_missed=1)).startswith("**")


def summary(preset, baseline, arms, budgets=(0.25, 0.5, 1.0)):
    return {
        "baseline": baseline,
        "metric": "accuracy",
        "target": 0.9,
        "seeds": [0, 1, 2, 3, 4],
        "config": {"preset": preset},
        "arms": {baseline: {}, **{a: {} for a in arms}},
        "quality_vs_cost": {
            "budgets": list(budgets),
            "arms": {a: {"saving": {"compute": r, "passes": r}} for a, r in arms.items()},
        },
    }


def write(path, data):
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(data))
    return path


def test_rows_are_arms_columns_comparisons_and_unmeasured_cells_a_dash(tmp_path) -> None:
    a = write(tmp_path / "a", summary("lenet-mnist", "sgd", {"isgd": ratio(1.0, 0.9, 1.1)}))
    b = write(
        tmp_path / "b",
        summary("charlm", "adamw", {"isgd": ratio(1.25, 1.1, 1.4), "skipstep": ratio(1, 1, 1)}),
    )
    never = summary("x", "sgd", {"sgd@isgd-passes": dict(n=0), "isgd": ratio(1, 1, 1)})
    never["arms"]["isgd"]["identical"] = {"untested": "ISGD did not act in any of the 5 seeds"}
    c = write(tmp_path / "c", never)
    table = answer_table([a, b, c])
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | lenet-mnist (vs sgd) | charlm (vs adamw) | x (vs sgd) |"
    assert rows[1].startswith("| isgd | no effect detected") and "**+20.0 %" in rows[1]
    assert rows[1].endswith("| not tested (see below) |")
    assert "- isgd on x (vs sgd): not tested — ISGD did not act in any of the 5 seeds" in table
    assert rows[2].startswith("| skipstep | — |")
    assert "sgd@isgd-passes" not in table  # measured nowhere: no row
    relabelled = answer_table([a, b, c], labels=["MNIST", "LM", "X"])
    assert "| method | MNIST | LM | X |" in relabelled
    with pytest.raises(RunError, match="2 labels for 3 comparisons"):
        answer_table([a, b, c], labels=["MNIST", "LM"])


def test_the_command_writes_the_table_and_refuses_a_non_comparison_in_one_line(
    tmp_path, capsys
) -> None:
    a = write(tmp_path / "a", summary("lenet-mnist", "sgd", {"isgd": ratio(1.25, 1.1, 1.4)}))
    assert main(["table", str(a), "--cost", "passes", "--out", str(tmp_path / "t.md")]) == 0
    printed = capsys.readouterr().out
    assert "Saving in passes" in printed and printed == (tmp_path / "t.md").read_text()
    assert main(["table", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no summary.json (not a finished isgd compare directory)")
    assert len(err.splitlines()) == 1


def test_a_one_seed_comparison_as_compare_writes_it_is_read_not_a_traceback(tmp_path) -> None:
    from isgd.training import runio

    one = summary("lenet-mnist", "sgd", {"isgd": ratio(1.1, math.nan, math.nan)})
    (tmp_path / "one").mkdir()
    runio.write_json(tmp_path / "one" / "summary.json", one)  # NaN as the string "nan"
    table = answer_table([tmp_path / "one"])
    assert "| isgd | no effect detected (+9.1 % [n/a, n/a]" in table
