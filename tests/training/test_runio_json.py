"""One JSON convention: strict JSON (no NaN/Infinity tokens), non-finite floats as the strings
"inf", "-inf", "nan", read back as floats; bare NaN/Infinity tokens are refused."""

from __future__ import annotations

import json
import math

import pytest

from isgd.training import runio


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_round_trip_through_strict_json(tmp_path):
    record = {"missed": math.inf, "low": -math.inf, "loss": math.nan, "xs": [1.0, math.inf]}
    text = runio.dumps(record)
    assert _strict(text) == {"missed": "inf", "low": "-inf", "loss": "nan", "xs": [1.0, "inf"]}
    back = runio.loads(text)
    assert back["missed"] == math.inf and back["low"] == -math.inf and math.isnan(back["loss"])
    assert back["xs"] == [1.0, math.inf]
    runio.write_json(tmp_path / "s.json", {"nested": {"t": math.inf}, "path": tmp_path})
    assert _strict((tmp_path / "s.json").read_text())["nested"]["t"] == "inf"
    writer = runio.JsonlWriter(tmp_path / "r.jsonl")
    writer.write(record)
    writer.close()
    _strict((tmp_path / "r.jsonl").read_text())
    assert next(runio.read_jsonl(tmp_path / "r.jsonl"))["missed"] == math.inf


def test_bare_nan_and_infinity_are_refused_naming_file_and_line(tmp_path):
    (tmp_path / "old.jsonl").write_text('{"t": 3}\n{"t": Infinity, "loss": NaN}\n{"t": 4}\n')
    with pytest.raises(runio.RunError, match=r"old\.jsonl:2: malformed JSON \(Infinity is not"):
        list(runio.read_jsonl(tmp_path / "old.jsonl"))


def test_the_jsonl_reader_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')  # killed mid-write
    assert [r["a"] for r in runio.read_jsonl(path)] == [1, 2]
    path.write_text('{"a": 1}\n{oops\n{"a": 3}\n')
    with pytest.raises(runio.RunError, match=r"r\.jsonl:2: malformed JSON"):
        list(runio.read_jsonl(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(runio.RunError, match=r"r\.jsonl:1: expected a JSON object"):
        list(runio.read_jsonl(path))
