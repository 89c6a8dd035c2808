"""How a run stands against the accuracy targets and against upstream GenAI KVCrush.

The targets (% of the full cache's RULER-4K average, u8 cache) are the accuracy harness issue's:
SmolLM2-135M >= 90% at a 25% budget and >= 80% at 12.5%; Qwen2.5-0.5B >= 98% and >= 90%; and the
best native KVCrush configuration above upstream GenAI KVCrush at every budget.
"""

from __future__ import annotations

from kvcrush_ov.eval.methods import default_method
from kvcrush_ov.eval.runner import FULL, Results, method_curves, scored_tasks, task_means

TARGETS = {"SmolLM2": {0.25: 90.0, 0.125: 80.0}, "Qwen2.5": {0.25: 98.0, 0.125: 90.0}}
DEFAULT_METHOD = default_method()  # the Pipeline's default eviction
UPSTREAM = "genai-kvcrush"


def targets_for(model: str) -> dict[float, float]:
    """Budget -> target % of full for ``model`` (a registry name or folder), {} if none."""
    for key, t in TARGETS.items():
        if key.lower() in model.lower():
            return t
    return {}


def paired(results: Results, a: str, b: str, budget: float, tasks: list[str]) -> tuple[int, ...]:
    """(samples where ``a`` scores higher, equal, lower than ``b``) at ``budget`` over ``tasks``."""
    def by_sample(method: str) -> dict[tuple[str, int], float]:
        return {(r.task, r.index): r.score for r in results.done.values()
                if r.method == method and r.budget == budget and r.task in tasks}

    sa, sb = by_sample(a), by_sample(b)
    common = sa.keys() & sb.keys()
    return (sum(sa[k] > sb[k] for k in common), sum(sa[k] == sb[k] for k in common),
            sum(sa[k] < sb[k] for k in common))


def targets_section(results: Results, budgets: list[float], model: str,
                    min_full: float = 10.0) -> str:
    """Markdown: per budget, the default and the best native KVCrush method as % of full, upstream
    GenAI KVCrush beside them, the paired sample counts, and the model's targets."""
    curves, full_avg = method_curves(results, budgets, min_full)
    if not full_avg:
        return "No full-cache average yet: nothing to compare."
    _, good = scored_tasks(task_means(results), min_full)
    target = targets_for(model)
    rel = {m: {b: 100 * v / full_avg for b, v in c.items()} for m, c in curves.items()}
    crush = [m for m in rel if "kvcrush" in m and not m.startswith("genai")]
    lines = ["| budget | default (" + DEFAULT_METHOD + ") | best native KVCrush | "
             + UPSTREAM + " | default vs upstream, samples better / equal / worse | target |",
             "|---|---|---|---|---|---|"]
    for b in budgets:
        d = rel.get(DEFAULT_METHOD, {}).get(b)
        cands = [(rel[m][b], m) for m in crush if b in rel[m]]
        best = max(cands) if cands else None
        up = rel.get(UPSTREAM, {}).get(b)
        pair = paired(results, DEFAULT_METHOD, UPSTREAM, b, good) if up is not None else None
        t = target.get(b)
        verdict = "-" if t is None or d is None else (
            f">= {t:.0f}%: **met** (+{d - t:.1f})" if d >= t else
            f">= {t:.0f}%: **missed** by {t - d:.1f} points")
        lines.append(
            f"| {b} | {'-' if d is None else f'{d:.1f}%'} | "
            + ("-" if best is None else f"{best[1]} {best[0]:.1f}%") + " | "
            + ("-" if up is None else f"{up:.1f}%") + " | "
            + ("-" if pair is None else " / ".join(map(str, pair))) + f" | {verdict} |")
    ahead = [b for b in budgets if rel.get(UPSTREAM, {}).get(b) is not None
             and any(b in rel[m] for m in crush)]
    if ahead:
        wins = [b for b in ahead
                if max(rel[m][b] for m in crush if b in rel[m]) > rel[UPSTREAM][b]]
        dwins = [b for b in ahead if rel.get(DEFAULT_METHOD, {}).get(b, -1) > rel[UPSTREAM][b]]
        lines += ["", f"Native KVCrush above upstream GenAI KVCrush: best configuration at "
                      f"{len(wins)} of {len(ahead)} budgets, the default at {len(dwins)} of "
                      f"{len(ahead)}."]
    n = max(sum(1 for r in results.done.values() if r.method == FULL and r.task == t)
            for t in good) if good else 0
    flip = 100 / (n * len(good)) if n and good else 0.0
    lines += ["", f"Averages over the {len(good)} tasks where the full cache scores at least "
                  f"{min_full:.0f} ({', '.join(good)}); the full cache's average is "
                  f"{full_avg:.1f}. One sample of one task changing its score by 1 moves an "
                  f"average by {flip:.2f} points, {100 * flip / full_avg:.1f}% of full."]
    return "\n".join(lines)
