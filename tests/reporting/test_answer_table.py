"""``isgd table``: each cell says what the paired saving shows, and nothing more."""

from __future__ import annotations

import math

import pytest

from isgd.cli import main
from isgd.errors import RunError
from isgd.reporting.answer_table import answer_table, cell
from isgd.training import runio


def ratio(r, low, high, *, detectable=1.25, **bounded):
    """A paired ratio over 5 seeds; ``bounded``: arm_missed, base_missed, arm_early, base_early."""
    return dict(n=5, ratio=r, low=low, high=high, detectable=detectable, **bounded)


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
    assert cell(ratio(0.8, 0.7, 0.9, arm_missed=2)).startswith("**≤ -25.0 %")
    assert cell(ratio(0.8, 0.7, 0.9, base_missed=1)).startswith("not shown: ≥ -25.0 %")
    assert cell(ratio(1.25, 1.1, 1.4, base_missed=1)).startswith("**≥ +20.0 %")
    # no effect either way: the estimate still says which way its bound goes
    assert cell(ratio(0.99, 0.9, 1.1, arm_missed=2)).startswith("no effect detected (≤ -1.0 %")
    assert cell(ratio(0.99, 0.9, 1.1, arm_missed=1, base_missed=1)).startswith(
        "no effect detected (-1.0 %"
    )


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
    runio.write_json(path / "summary.json", data)  # NaN as the string "nan", as compare does
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


def test_a_one_seed_comparison_says_it_has_no_interval_not_no_effect(tmp_path) -> None:
    one = summary("lenet-mnist", "sgd", {"isgd": {**ratio(1.1, math.nan, math.nan), "n": 1}})
    one["seeds"] = [0]
    (tmp_path / "one").mkdir()
    runio.write_json(tmp_path / "one" / "summary.json", one)  # NaN as the string "nan"
    table = answer_table([tmp_path / "one"])  # read, not a traceback
    assert "| isgd | 1 seed: no interval (+9.1 %) |" in table
    assert "no effect detected" not in table
    # its one seed's cost a bound: the saving says which way
    one_missed = {**ratio(1.1, math.nan, math.nan, arm_missed=1), "n": 1}
    assert cell(one_missed) == "1 seed: no interval (≤ +9.1 %)"
    assert cell({**ratio(0.9, math.nan, math.nan, arm_early=1), "n": 1}).endswith("(≥ -11.1 %)")


def test_a_spread_of_zero_drops_the_detectable_tail() -> None:
    # every seed the same ratio: sd of the log ratios 0, detectable ratio 1 (a 0 % saving)
    text = cell(ratio(1.0, 1.0, 1.0, detectable=1.0))
    assert text == "no effect detected (+0.0 % [+0.0 %, +0.0 %])"


def test_a_crossing_at_the_smallest_budget_bounds_the_saving_like_a_miss() -> None:
    # the arm's cost there is an upper bound (it may need less): a loss is only a lower bound
    assert cell(ratio(0.8, 0.7, 0.9, arm_early=1)) == (
        "not shown: ≥ -25.0 % [-42.9 %, -11.1 %], the arm reached it at the smallest budget in "
        "some seeds"
    )
    assert cell(ratio(1.25, 1.1, 1.4, arm_early=1)).startswith("**")  # a saving despite it
    # the baseline's cost there is an upper bound: a saving is only an upper bound
    assert cell(ratio(1.25, 1.1, 1.4, base_early=2, arm_missed=1)) == (
        "not shown: ≤ +20.0 % [+9.1 %, +28.6 %], the arm missed the target and the baseline "
        "reached it at the smallest budget in some seeds"
    )
    assert cell(ratio(0.8, 0.7, 0.9, base_early=2)).startswith("**")


def test_the_table_reads_crossings_at_the_smallest_budget_as_quality_vs_cost_marks_them(
    tmp_path,
) -> None:
    from isgd.experiments.budgets import quality_vs_cost

    def run(arm, budget, seed, passes, metric):
        return dict(
            arm=arm, budget=budget, seed=seed, passes=passes, train_seconds=1.0, final_metric=metric
        )

    records = []
    for seed in range(3):  # sgd crosses 0.9 between its budgets; fo is there at its smallest
        records += [run("sgd", 0.5, seed, 50, 0.8), run("sgd", 1.0, seed, 100, 0.95)]
        records += [run("fo", 0.5, seed, 110 + 10 * seed, 0.92), run("fo", 1.0, seed, 200, 0.96)]
    curves = quality_vs_cost(records, ["sgd", "fo"], target=0.9)
    saving = curves["arms"]["fo"]["saving"]["passes"]
    # budgets.py does not fold such a crossing into the misses: it marks how it was found
    assert (saving["arm_missed"], saving["base_missed"], saving["n"]) == (0, 0, 3)
    assert saving["how"]["fo"] == ["at the smallest budget"] * 3
    assert saving["high"] < 1  # a loss the interval excludes 0 from, fo's costs being bounds
    data = summary("lenet-mnist", "sgd", {})
    data["seeds"], data["arms"]["fo"], data["quality_vs_cost"] = [0, 1, 2], {}, curves
    table = answer_table([write(tmp_path / "a", data)], cost="passes")
    assert "| fo | not shown: ≥ " in table and "the arm reached it at the smallest budget" in table
    assert (
        "- fo on lenet-mnist (vs sgd): 3 of its seeds and 0 of the baseline's reached it already "
        "at the smallest budget; each is charged that budget's cost (a bound)"
    ) in table


def test_seeds_left_out_are_said_and_neither_reaching_the_target_is_a_cell(tmp_path) -> None:
    some = {**ratio(1.25, 1.1, 1.4), "n": 3, "left_out": 2, "both_missed": 2}
    none = dict(n=0, left_out=5, both_missed=5, arm_missed=0, base_missed=0, ratio=math.nan)
    data = summary("lenet-mnist", "sgd", {"fo": some, "skipstep": none})
    table = answer_table([write(tmp_path / "a", data)])
    assert "| fo | **+20.0 %" in table
    assert (
        "- fo on lenet-mnist (vs sgd): rests on 3 of 5 seeds (left out: 2 where both missed the "
        "target)"
    ) in table
    assert "| skipstep | neither reached the target |" in table
    assert (
        "- skipstep on lenet-mnist (vs sgd): rests on 0 of 5 seeds (left out: 5 where both "
        "missed the target)"
    ) in table


def test_a_single_budget_column_says_it_is_read_in_passes(tmp_path) -> None:
    budgets = write(tmp_path / "a", summary("lenet-mnist", "sgd", {"isgd": ratio(1.25, 1.1, 1.4)}))
    single = summary("cifar", "sgd", {})
    single.pop("quality_vs_cost")
    single["arms"]["isgd"] = {
        "paired": {"passes": ratio(1.1, 1.05, 1.2), "seconds": ratio(1, 1, 1)}
    }
    table = answer_table([budgets, write(tmp_path / "b", single)])
    assert table.startswith("Saving in modelled compute (or the cost a column's note names) ")
    assert "| isgd | **+20.0 %" in table and "| **+9.1 %" in table
    assert (
        "- cifar (vs sgd): target 0.9 (accuracy), seeds [0, 1, 2, 3, 4], budgets [1.0]; saving "
        "in passes (a single-budget comparison has no modelled compute)"
    ) in table
    assert (
        "- lenet-mnist (vs sgd): target 0.9 (accuracy), seeds [0, 1, 2, 3, 4], budgets "
        "[0.25, 0.5, 1.0]\n" in table
    )
    assert answer_table([budgets], cost="passes").startswith("Saving in passes at the target")


def test_two_comparisons_of_one_preset_get_the_directory_in_their_header(tmp_path) -> None:
    data = summary("lenet-mnist", "sgd", {"isgd": ratio(1.25, 1.1, 1.4)})
    a, b = write(tmp_path / "mnist-all", data), write(tmp_path / "mnist-small", data)
    header = answer_table([a, b]).splitlines()[2]
    assert header == (
        "| method | lenet-mnist (vs sgd) — mnist-all | lenet-mnist (vs sgd) — mnist-small |"
    )


def test_a_label_or_a_comparison_given_twice_is_refused_and_a_workload_is_named_short(
    tmp_path,
) -> None:
    data = summary("lenet-mnist", "sgd", {"isgd": ratio(1.25, 1.1, 1.4)})
    a, b = write(tmp_path / "a", data), write(tmp_path / "b", data)
    with pytest.raises(RunError, match=r"^label x given twice: each column needs its own$"):
        answer_table([a, b], labels=["x", "x"])
    with pytest.raises(RunError, match=r"comparison .*a given twice"):
        answer_table([a, tmp_path / "." / "a"])
    mine = dict(data, target=3.2041475590407047, config={"workload": "/home/me/wl/lm.py:build"})
    table = answer_table([write(tmp_path / "lm", mine)])
    assert "| method | lm.py:build (vs sgd) |" in table and "target 3.20415 (accuracy)" in table


def test_an_old_summary_without_paired_savings_is_refused_in_one_line(tmp_path, capsys) -> None:
    from isgd.experiments.compare import retarget
    from tests.experiments.test_records import write_comparison

    out = write_comparison(tmp_path / "cmp")  # a summary as isgd compare wrote it long ago
    with pytest.raises(RunError, match="no paired savings at the target"):
        answer_table([out])
    assert main(["table", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"isgd compare --retarget {out} --target 0.99" in captured.err
    # ... and what it advises works: the summary written again reads as a table
    assert "| isgd |" in answer_table([retarget(out, 0.7)])
