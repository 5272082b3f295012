"""CPU checks of how GPU suite results become a card's record (tests/run_gpu_isolated.py ``merge``)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("run_gpu_isolated", Path(__file__).with_name("run_gpu_isolated.py"))
rgi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rgi)


def _result(card: str, cases: dict[str, str]) -> dict:
    return {"card": card, "versions": {"torch": "2.11.0"}, "command": "run_gpu_isolated.py f.py", "wall_s": 1.0,
            "collected": len(cases), "counts": {"passed": len(cases)},
            "cases": {n: {"outcome": o, "message": "", "seconds": 0.1, "isolated": False} for n, o in cases.items()}}


def _record() -> dict:
    record = {"what": "GPU suite", "runs": [], "counts_latest": {}, "cases": {}}
    return rgi.merge(record, _result("H200", {"a::x": "passed", "a::y": "failed"}), "A", "c0", "first")


def test_merge_adds_a_run_keeps_the_earlier_outcome_and_recounts():
    record = rgi.merge(_record(), _result("H200", {"a::y": "passed", "a::z": "skipped"}), "B", "c1", "again",
                       date="2026-12-08 01:00 UTC")
    assert [r["run"] for r in record["runs"]] == ["A", "B"]
    assert record["runs"][1]["date"] == "2026-12-08 01:00 UTC" and record["runs"][1]["code"] == "c1"
    assert record["cases"]["a::x"] == {"outcome": "passed", "message": "", "seconds": 0.1, "isolated": False,
                                       "run": "A"}
    assert record["cases"]["a::y"]["run"] == "B" and record["cases"]["a::y"]["before"] == "failed"
    assert "before" not in record["cases"]["a::z"]
    assert record["counts_latest"] == {"passed": 2, "skipped": 1}


def test_merge_refuses_a_used_letter_or_another_card(tmp_path, capsys):
    with pytest.raises(ValueError, match="run 'A' is already in the record"):
        rgi.merge(_record(), _result("H200", {"a::x": "passed"}), "A", "c", "n")
    with pytest.raises(ValueError, match=r"the record is of \['H200'\]; this result ran on 'H100'"):
        rgi.merge(_record(), _result("H100", {"a::x": "passed"}), "B", "c", "n")
    # the command line: the record rewritten in place, or left as it was with a one-line error (exit 2)
    rec, res = tmp_path / "rec.json", tmp_path / "res.json"
    rec.write_text(json.dumps(_record()))
    res.write_text(json.dumps(_result("H200", {"a::y": "passed"})))
    assert rgi.merge_main([str(rec), str(res), "--run", "B", "--code", "c1", "--note", "n"]) == 0
    assert json.loads(rec.read_text())["counts_latest"] == {"passed": 2}
    before = rec.read_text()
    with pytest.raises(SystemExit) as exc:
        rgi.merge_main([str(rec), str(res), "--run", "B", "--code", "c1", "--note", "n"])
    assert exc.value.code == 2 and "run 'B' is already in the record" in capsys.readouterr().err
    assert rec.read_text() == before
