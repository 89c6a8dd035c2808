"""kvcrush-ov eval: prefill once, fork per method and budget, resumable results (tiny model:
plumbing only, its scores mean nothing)."""

from __future__ import annotations

import json

from kvcrush_ov.eval.runner import FULL, run_eval


def test_eval_runs_every_column_once_and_resumes(tiny_model, tmp_path):
    kw = dict(tasks=["niah_single_1", "vt"], num_samples=1,
              methods=["snapkv", "snapkv+kvcrush", "h2o", "genai-kvcrush"],
              budgets=[0.5, 0.25], max_seq_length=1024, say=lambda _: None)
    summary = run_eval(str(tiny_model), tmp_path, **kw)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 2 * (1 + 4 * 2)  # 2 samples x (full + 4 methods x 2 budgets)
    keys = {(r["task"], r["index"], r["method"], r["budget"]) for r in recs}
    assert len(keys) == len(recs)
    for r in recs:
        assert 0.0 <= r["score"] <= 1.0 and r["input_tokens"] <= 1024
    by = {(r["task"], r["method"], r["budget"]): r["kv_bytes"] for r in recs}
    for task in ("niah_single_1", "vt"):
        full = by[(task, FULL, None)]
        assert by[(task, "snapkv", 0.25)] < by[(task, "snapkv", 0.5)] < full
    assert "| snapkv+kvcrush | 0.25 |" in summary and (tmp_path / "summary.md").exists()
    assert (tmp_path / "plot.svg").read_text().startswith("<svg")
    run_eval(str(tiny_model), tmp_path, **kw)  # resume: everything is there already
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines


def test_plot_has_a_line_per_method(tmp_path):
    from kvcrush_ov.eval.plot import write_svg

    curves = {"snapkv": {0.5: 80.0, 0.25: 70.0, 0.125: 50.0},
              "snapkv+kvcrush": {0.5: 82.0, 0.25: 75.0, 0.125: 55.0}}
    svg = write_svg(tmp_path / "p.svg", {"m1": (curves, 85.0), "m2": (curves, None)}).read_text()
    assert svg.count("<polyline") == 4 and svg.count("stroke-dasharray") == 1
    assert "snapkv+kvcrush" in svg and "compression ratio" in svg
