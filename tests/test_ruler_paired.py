"""scripts/ruler_paired.py: two RULER columns on the same samples, a paired bootstrap."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "ruler_paired.py"
    spec = importlib.util.spec_from_file_location("ruler_paired", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, rows: list[tuple]) -> Path:
    path.write_text("".join(json.dumps({"task": t, "index": i, "seed": s, "method": m,
                                        "budget": b, "score": x}) + "\n"
                            for t, i, s, m, b, x in rows))
    return path


def test_a_better_column_is_ahead_by_its_margin_and_the_interval_holds_it(tmp_path, capsys):
    rows = []
    for t in ("a", "b"):
        for i in range(20):
            rows += [(t, i, 100 + i, "full", None, 1.0),
                     (t, i, 100 + i, "x", 0.25, 1.0 if i < 18 else 0.0),
                     (t, i, 100 + i, "y", 0.25, 1.0 if i < 10 else 0.0)]
    f = _write(tmp_path / "r.jsonl", rows)
    script = _script()
    assert script.main([f"{f}:x:0.25", f"{f}:y:0.25", "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert "A 90.0, B 50.0; A - B +40.0 points" in out and "A scores higher 16, B higher 0" in out
    r = script.compare(script.paired(*script.load(f"{f}:x:0.25")[:2],
                                     *script.load(f"{f}:y:0.25")[:2]), 500)
    assert 0 < r["low"] < r["diff"] < r["high"]
    same = script.compare(script.paired(*script.load(f"{f}:x:0.25")[:2],
                                        *script.load(f"{f}:x:0.25")[:2]), 500)
    assert same["diff"] == same["low"] == same["high"] == 0


def test_other_samples_or_a_missing_column_are_named(tmp_path):
    a = _write(tmp_path / "a.jsonl", [("a", 0, 1, "full", None, 1.0), ("a", 0, 1, "x", 0.5, 1)])
    b = _write(tmp_path / "b.jsonl", [("a", 0, 2, "full", None, 1.0), ("a", 0, 2, "x", 0.5, 1)])
    script = _script()
    with pytest.raises(SystemExit, match="different samples"):
        script.main([f"{a}:x:0.5", f"{b}:x:0.5"])
    with pytest.raises(SystemExit, match="no records of method 'z'"):
        script.main([f"{a}:z:0.5", f"{a}:x:0.5"])
    with pytest.raises(SystemExit, match="RESULTS:METHOD:BUDGET"):
        script.main([f"{a}:x", f"{a}:x:0.5"])
    with pytest.raises(SystemExit, match="no file"):
        script.main([f"{tmp_path / 'none.jsonl'}:x:0.5", f"{a}:x:0.5"])
