"""``kvcrush-ov eval-report``: publish finished (or partial) eval runs under docs/results/.

For every run folder (what ``kvcrush-ov eval --out`` wrote): ``<model>.md`` with the command,
the settings, the accuracy table and the fidelity table; ``<model>.results.jsonl`` and
``<model>.fidelity.jsonl`` (per-sample records); ``<model>.run.json`` (the run's settings);
and one ``plot.svg`` with a panel per model.

``kvcrush-ov eval-restore`` goes the other way: it rebuilds a run folder from published files, so
a partial run can be resumed on a new machine (``kvcrush-ov eval --out`` that folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eval.plot import write_svg
from kvcrush_ov.eval.runner import (
    Results,
    load_fidelity,
    method_curves,
    summarize,
    summarize_fidelity,
)
from kvcrush_ov.eval.targets import targets_section


def _tilde(text: str) -> str:
    """``text`` with this machine's home folder written as ~ (nothing machine-specific is
    published)."""
    return text.replace(str(Path.home()), "~")


def _portable(run: dict) -> dict:
    """run.json as published: every string (commands, a model folder) with the home as ~."""
    return {k: _tilde(v) if isinstance(v, str) else
            [_tilde(x) if isinstance(x, str) else x for x in v] if isinstance(v, list) else v
            for k, v in run.items()}


def _command(run: dict, out: Path) -> str:
    """The run's own command lines (one per line: a folder resumed with more methods has
    several), or one rebuilt from its settings (the home folder as ~)."""
    commands = run.get("commands") or ([run["command"]] if run.get("command") else [])
    if commands:
        return "\n".join(_tilde(c) for c in commands)
    parts = ["kvcrush-ov eval", f"--model {run['model']}", f"--out {_tilde(str(out))}",
             f"--samples {run['num_samples']}", f"--seed {run['seed']}",
             f"--precision {run['precision']}"]
    return " ".join(parts)


def _done_counts(results: Results) -> dict[str, int]:
    """Samples with a result, per method (the full cache under ``full``)."""
    out: dict[str, set] = {}
    for r in results.done.values():
        out.setdefault(r.method, set()).add((r.task, r.index, r.budget))
    return {m: len(v) for m, v in out.items()}


RUN_FILES = ("run.json", "results.jsonl", "fidelity.jsonl")  # what a run folder holds


def publish(runs: list[Path], to: Path) -> list[Path]:
    """Write the report files for ``runs`` into ``to``; returns the paths written."""
    for d in runs:
        if not (d / "run.json").exists() or not (d / "results.jsonl").exists():
            raise ConfigError("run", str(d), "a folder written by kvcrush-ov eval (run.json, "
                                             "results.jsonl)")
    to.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    panels = {}
    for d in runs:
        run = json.loads((d / "run.json").read_text())
        name = Path(str(run["model"])).name
        tag = name if run.get("precision", "u8") == "u8" else f"{name}-{run['precision']}"
        results = Results(d / "results.jsonl")
        budgets = run["budgets"]
        fid = load_fidelity(d / "fidelity.jsonl")
        counts = _done_counts(results)
        turns = run.get("multi_question") and "niah_multiquery" in run["tasks"]
        expected = (len(run["tasks"]) + int(bool(turns))) * run["num_samples"]
        want = {m: expected * (1 if m == "full" else len(budgets))
                for m in ["full", *run["methods"]]}
        partial = any(counts.get(m, 0) < n for m, n in want.items())
        lines = [f"# RULER-4K, {name} ({run.get('precision', 'u8')} cache, seed {run['seed']}, "
                 f"{run['num_samples']} samples per task)", "",
                 *(["**Partial run**: not every cell is done yet (counts below); averages "
                    "cover only the tasks present and are not results yet.", ""]
                   if partial else []),
                 "```bash", _command(run, d), "```", "",
                 f"Prompt: {run.get('prompt', '')}.", "",
                 *([f"Inference: {run['inference_precision']} on {run.get('device_name', '?')} "
                    "(bf16 on CPUs with BF16, f32 on others).", ""]
                   if run.get("inference_precision") else []),
                 "Results per method (sample x budget cells done / expected): "
                 + ", ".join(f"{m} {counts.get(m, 0)}/{n}" for m, n in want.items()) + ".",
                 "",
                 "Mean score x 100 per task; avg over the tasks where the full cache scores at "
                 "least 10; % of full is that average as a share of the full cache's.", "",
                 summarize(results, budgets), "",
                 "Against the targets and upstream (% of the full cache's average):", "",
                 targets_section(results, budgets, name)]
        if fid:
            lines += ["", "Fidelity (native methods, teacher-forced over the reference answer, "
                          "all tasks):", "", summarize_fidelity(fid, budgets)]
        md = to / f"{tag}.md"
        md.write_text("\n".join(lines) + "\n")
        written.append(md)
        for name in RUN_FILES:
            dst = to / f"{tag}.{name}"
            if name == "run.json":
                dst.write_text(json.dumps(_portable(run), indent=1))
            elif (d / name).exists():
                shutil.copyfile(d / name, dst)
            else:
                continue
            written.append(dst)
        panels[tag] = method_curves(results, budgets)
    written.append(write_svg(to / "plot.svg", panels))
    return written


def restore(report: Path, tag: str, out: Path) -> list[Path]:
    """Rebuild the run folder ``out`` from ``report/<tag>.run.json`` and its per-sample
    records (``<tag>.results.jsonl``, ``<tag>.fidelity.jsonl`` when present); returns the
    paths written. ``out`` must not hold results yet (nothing is overwritten)."""
    if not report.is_dir():
        raise ConfigError("from", str(report), "a folder written by kvcrush-ov eval-report")
    src = {name: report / f"{tag}.{name}" for name in RUN_FILES}
    for name in ("run.json", "results.jsonl"):
        if not src[name].exists():
            have = sorted(p.name[:-len(".run.json")] for p in report.glob("*.run.json"))
            raise ConfigError("model", tag, f"a run published in {report}: "
                              f"{', '.join(have) or 'none there'}", f"{src[name].name} is missing")
    if any((out / name).exists() for name in RUN_FILES):
        raise ConfigError("out", str(out), "a folder without run.json, results.jsonl or "
                                           "fidelity.jsonl", "nothing is overwritten")
    try:  # a broken file fails here, before any copy
        json.loads(src["run.json"].read_text())
    except ValueError as e:
        raise ConfigError("model", tag, "a run whose run.json is valid JSON",
                          f"{src['run.json']}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, path in src.items():
        if path.exists():
            shutil.copyfile(path, out / name)
            written.append(out / name)
    return written
