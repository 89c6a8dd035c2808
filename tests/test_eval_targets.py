"""The targets section of eval-report: hand-built records with known averages."""

from __future__ import annotations

from kvcrush_ov.eval.runner import Record, Results
from kvcrush_ov.eval.targets import DEFAULT_METHOD, paired, targets_for, targets_section


def _results(tmp_path, scores: dict[tuple[str, float | None], dict[str, list[float]]]) -> Results:
    res = Results(tmp_path / "results.jsonl")
    for (method, budget), per_task in scores.items():
        for task, vals in per_task.items():
            for i, v in enumerate(vals):
                res.add(Record(task, i, 0, method, budget, "", v, [], 100, 0))
    return res


def test_targets_section_compares_the_default_the_best_and_upstream(tmp_path):
    # full: vt 1.0 and 1.0, cwe 0 and 0 (cwe is below 10 and left out); avg over vt = 100
    res = _results(tmp_path, {
        ("full", None): {"vt": [1, 1], "cwe": [0, 0]},
        (DEFAULT_METHOD, 0.25): {"vt": [1, 0], "cwe": [1, 1]},  # 50% of full
        ("adakv+kvcrush", 0.25): {"vt": [1, 1], "cwe": [0, 0]},   # 100%
        ("genai-kvcrush", 0.25): {"vt": [0, 1], "cwe": [0, 0]},   # 50%
        ("snapkv", 0.25): {"vt": [1, 1], "cwe": [0, 0]},          # not a KVCrush method
    })
    md = targets_section(res, [0.25], "SmolLM2-135M-Instruct")
    row = next(line for line in md.splitlines() if line.startswith("| 0.25 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "50.0%"
    assert cells[2] == "adakv+kvcrush 100.0%"
    assert cells[3] == "50.0%"
    assert cells[4] == "1 / 0 / 1"  # sample 0 better, sample 1 worse (vt only)
    assert cells[5] == ">= 90%: **missed** by 40.0 points"
    assert "best configuration at 1 of 1 budgets, the default at 0 of 1" in md
    assert "1 tasks" in md and "moves an average by 50.00 points" in md


def test_targets_by_model_name_and_paired_counts(tmp_path):
    assert targets_for("Qwen2.5-Coder-0.5B-Instruct") == {0.25: 98.0, 0.125: 90.0}
    assert targets_for("/models/smollm2-135m-instruct") == {0.25: 90.0, 0.125: 80.0}
    assert targets_for("tiny-random-llama") == {}
    res = _results(tmp_path, {("a", 0.5): {"vt": [1, 0, 1]}, ("b", 0.5): {"vt": [1, 1, 0]}})
    assert paired(res, "a", "b", 0.5, ["vt"]) == (1, 1, 1)
    assert paired(res, "a", "b", 0.5, ["cwe"]) == (0, 0, 0)
    (tmp_path / "empty").mkdir()
    empty = _results(tmp_path / "empty", {})
    assert targets_section(empty, [0.5], "m").startswith("No full-cache")
