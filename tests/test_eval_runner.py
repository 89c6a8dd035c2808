"""kvcrush-ov eval: prefill once, fork per method and budget, resumable results (tiny model:
plumbing only, its scores mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eval.runner import FULL, run_eval


def test_eval_runs_every_column_once_and_resumes(tiny_model, tmp_path):
    kw = dict(tasks=["niah_single_1", "vt"], num_samples=1,
              methods=["snapkv", "snapkv+kvcrush", "h2o", "genai-kvcrush"],
              budgets=[0.5, 0.25], max_seq_length=1024)
    said: list[str] = []
    summary = run_eval(str(tiny_model), tmp_path, **kw, say=said.append)
    # progress: a line per native sample, per fidelity sample, and per GenAI task batch
    assert sum(x.startswith("[native ") for x in said) == 2
    assert sum(x.startswith("[fidelity ") for x in said) == 2
    genai = [x for x in said if x.startswith("[genai ")]
    assert len(genai) == 2 * 2 and genai[0].startswith("[genai 1/2] genai-kvcrush @ 0.5: ")
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
    fid = [json.loads(x) for x in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert len(fid) == 2 * 3 * 2  # genai columns have no fidelity: 3 native methods x 2 budgets
    for r in fid:
        assert r["kl"] >= -1e-6 and 0.0 <= r["top1"] <= 1.0 and r["positions"] >= 1
    assert "top-1 agreement" in summary
    run_eval(str(tiny_model), tmp_path, **kw, say=lambda _: None)  # resume: all there already
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    assert len((tmp_path / "fidelity.jsonl").read_text().splitlines()) == len(fid)


def test_fastkv_columns_fork_from_their_own_split_parent(tiny_model, tmp_path):
    run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=1,
             methods=["snapkv", "fastkv", "fastkv+kvcrush"], budgets=[0.5, 0.25],
             max_seq_length=1024, say=lambda _: None)
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    got = {(r["method"], r["budget"]) for r in recs}
    assert got == {(FULL, None)} | {(m, b) for m in ("snapkv", "fastkv", "fastkv+kvcrush")
                                     for b in (0.5, 0.25)}
    fid = [json.loads(x) for x in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert {r["method"] for r in fid} == {"snapkv", "fastkv", "fastkv+kvcrush"}
    by = {(r["method"], r["budget"]): r["kv_bytes"] for r in recs}
    # the same budget: FastKV's back layers hold fewer tokens, the total stays the budget
    assert by[("fastkv", 0.25)] == by[("snapkv", 0.25)]


def test_prefill_eviction_columns_run_their_own_prefill(tiny_model, tmp_path):
    said: list[str] = []
    run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=1,
             methods=["snapkv+kvcrush-prefill", "kvzip-prefill"], budgets=[0.25],
             max_seq_length=1024, max_num_batched_tokens=128, say=said.append)
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["budget"]) for r in recs} == {
        (FULL, None), ("snapkv+kvcrush-prefill", 0.25), ("kvzip-prefill", 0.25)}
    fid = [json.loads(x) for x in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in fid) == ["kvzip-prefill", "snapkv+kvcrush-prefill"]
    assert all(r["kl"] >= -1e-6 for r in fid)


def test_query_agnostic_protocol_runs_every_group_and_keeps_its_folder(tiny_model, tmp_path):
    """--protocol query-agnostic: window, all, replay (KVzip) and own (prefill eviction) groups
    each compress the context before the question; the folder records its protocol and a
    query-aware run into it is refused by name. GenAI columns are refused by name."""
    run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=1,
             methods=["snapkv", "h2o", "kvzip+kvcrush", "snapkv+kvcrush-prefill",
                      "kvzip-prefill"],
             budgets=[0.25], max_seq_length=1024, max_num_batched_tokens=128,
             protocol="query-agnostic", say=lambda _: None)
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in recs} == {FULL, "snapkv", "h2o", "kvzip+kvcrush",
                                            "snapkv+kvcrush-prefill", "kvzip-prefill"}
    assert json.loads((tmp_path / "run.json").read_text())["protocol"] == "query-agnostic"
    assert not (tmp_path / "fidelity.jsonl").exists()
    with pytest.raises(ConfigError, match="out=.*query-agnostic results"):
        run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=1, methods=["snapkv"],
                 budgets=[0.25], max_seq_length=1024, say=lambda _: None)
    with pytest.raises(ConfigError, match="methods='genai-snapkv'"):
        run_eval(str(tiny_model), tmp_path / "g", tasks=["vt"], methods=["genai-snapkv"],
                 protocol="query-agnostic", say=lambda _: None)


def test_multi_question_mode_asks_each_key_on_one_compressed_context(tiny_model, tmp_path):
    run_eval(str(tiny_model), tmp_path, tasks=["niah_multiquery"], num_samples=1,
             methods=["snapkv", "kvzip", "kvzip-chunk256", "kvzip-group16"], budgets=[0.5],
             max_seq_length=2048, max_num_batched_tokens=256, protocol="query-agnostic",
             multi_question=True,
             say=lambda _: None)
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    turns = {r["method"]: r for r in recs if r["task"] == "niah_multiquery-turns"}
    # three replays: steps of 16 and 256 summed, 256 by groups of 16
    assert set(turns) == {FULL, "snapkv", "kvzip", "kvzip-chunk256", "kvzip-group16"}
    for r in turns.values():
        assert len(r["prediction"].split(" | ")) == len(r["outputs"]) == 4
        assert r["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ConfigError, match="multi_question"):
        run_eval(str(tiny_model), tmp_path / "x", tasks=["niah_multiquery"], multi_question=True,
                 say=lambda _: None)


def test_the_question_split_is_found_in_every_task():
    from kvcrush_ov.eval.ruler import TASKS, build_task, question_start

    for task in TASKS:
        s = build_task(task, 1, lambda text: len(text) // 4, 4096, seed=7)[0]
        at = question_start(task, s.input)
        assert 0 < at < len(s.input) - 20 and len(s.input) - at < 200, task
        assert s.input[at:].lstrip().split()[0] in ("What", "Question:", "Answer"), task


def test_full_alone_runs_only_the_full_cache(tiny_model, tmp_path):
    run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=2, methods=["full"],
             budgets=[0.5], max_seq_length=1024, say=lambda _: None)
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in recs] == [(FULL, None)] * 2
    assert not (tmp_path / "fidelity.jsonl").exists()


def test_fidelity_on_the_first_samples_only(tiny_model, tmp_path):
    run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=2, methods=["snapkv"],
             budgets=[0.5], max_seq_length=1024, fidelity_samples=1, max_num_batched_tokens=2048,
             say=lambda _: None)
    assert json.loads((tmp_path / "run.json").read_text())["max_num_batched_tokens"] == 2048
    fid = [json.loads(x) for x in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert [(r["index"], r["method"]) for r in fid] == [(0, "snapkv")]


def test_run_json_keeps_the_methods_and_commands_of_earlier_runs(tmp_path):
    from kvcrush_ov.eval.runner import write_run_json

    path = tmp_path / "run.json"
    write_run_json(path, {"methods": ["snapkv", "h2o"], "command": "kvcrush-ov eval A"})
    write_run_json(path, {"methods": ["h2o"], "command": "kvcrush-ov eval A"})  # a resume
    run = json.loads(path.read_text())
    assert run["methods"] == ["h2o", "snapkv"] and run["commands"] == ["kvcrush-ov eval A"]
    write_run_json(path, {"methods": ["genai-kvcrush"], "command": "kvcrush-ov eval B"})
    run = json.loads(path.read_text())
    assert run["methods"] == ["genai-kvcrush", "h2o", "snapkv"]  # METHODS order
    assert run["commands"] == ["kvcrush-ov eval A", "kvcrush-ov eval B"]
    assert run["command"] == "kvcrush-ov eval A"


def test_run_json_keeps_the_budgets_and_sample_count_of_earlier_runs(tmp_path):
    from kvcrush_ov.eval.runner import write_run_json

    path = tmp_path / "run.json"
    write_run_json(path, {"methods": ["snapkv"], "budgets": [0.5, 0.25, 0.125],
                          "num_samples": 20, "command": "A"})
    write_run_json(path, {"methods": ["genai-kvcrush"], "budgets": [0.125], "num_samples": 20,
                          "command": "B"})  # one column, one budget at a time
    run = json.loads(path.read_text())
    assert run["budgets"] == [0.5, 0.25, 0.125] and run["num_samples"] == 20
    write_run_json(path, {"methods": ["h2o"], "budgets": [0.0625], "num_samples": 5,
                          "command": "C"})
    run = json.loads(path.read_text())
    assert run["budgets"] == [0.5, 0.25, 0.125, 0.0625] and run["num_samples"] == 20


def test_kl_and_top1():
    from kvcrush_ov.eval.runner import kl_top1

    a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32))
    b = np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], np.float32))
    assert kl_top1(list(a), list(a)) == (0.0, 1.0)
    kl, top1 = kl_top1(list(a), list(b))
    assert top1 == 0.5
    assert kl == pytest.approx((0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)) / 2, rel=1e-4)


def test_teacher_forcing_follows_the_forced_tokens(tiny_model):
    from kvcrush_ov import GenerationConfig, KVCacheConfig, SchedulerConfig
    from kvcrush_ov.engine.engine import LLMEngine

    eng = LLMEngine(tiny_model, "CPU", KVCacheConfig(), SchedulerConfig(), 2048)
    seq = eng.add_request(list(range(5, 60)), GenerationConfig(max_new_tokens=3, ignore_eos=True),
                          set(), lambda x: "")
    seq.extra["forced"] = [11, 12, 13]
    while eng.has_unfinished():
        eng.step()
    assert list(seq.output_ids) == [11, 12, 13] and len(seq.extra["logprobs"]) == 3
    assert all(abs(float(np.exp(r).sum()) - 1.0) < 1e-3 for r in seq.extra["logprobs"])


def test_plot_has_a_line_per_method(tmp_path):
    from kvcrush_ov.eval.plot import write_svg

    curves = {"snapkv": {0.5: 80.0, 0.25: 70.0, 0.125: 50.0},
              "snapkv+kvcrush": {0.5: 82.0, 0.25: 75.0, 0.125: 55.0}}
    svg = write_svg(tmp_path / "p.svg", {"m1": (curves, 85.0), "m2": (curves, None)}).read_text()
    assert svg.count("<polyline") == 4 and svg.count("stroke-dasharray") == 1
    assert "snapkv+kvcrush" in svg and "compression ratio" in svg


@pytest.mark.parametrize("kwargs,field", [
    ({"tasks": ["niah_single_9"]}, "tasks"),
    ({"tasks": []}, "tasks"),
    ({"methods": ["tova"]}, "methods"),
    ({"budgets": [0.25, 1.5]}, "budgets"),
    ({"budgets": [0]}, "budgets"),
    ({"num_samples": 0}, "num_samples"),
    ({"max_seq_length": 100}, "max_seq_length"),
    ({"seed": -1}, "seed"),
    ({"precision": "fp8"}, "kv_cache.precision"),
    ({"fidelity_samples": 0}, "fidelity_samples"),
    ({"max_num_batched_tokens": 0}, "scheduler.max_num_batched_tokens"),
    ({"protocol": "query-blind"}, "protocol"),
])
def test_bad_eval_arguments_fail_before_loading(tmp_path, kwargs, field):
    from kvcrush_ov import ConfigError

    with pytest.raises(ConfigError) as info:  # the model folder does not exist: never read
        run_eval(str(tmp_path / "never-read"), tmp_path / "out", **kwargs)
    assert info.value.field == field
    assert not (tmp_path / "out").exists()


def test_report_publishes_markdown_records_and_one_panel_per_run(tiny_model, tmp_path):
    from kvcrush_ov.eval.report import publish

    runs = []
    for precision in ("u8", "f32"):  # f32: every CPU holds it
        out = tmp_path / precision
        run_eval(str(tiny_model), out, tasks=["vt"], num_samples=1, methods=["snapkv"],
                 budgets=[0.5], max_seq_length=1024, precision=precision, fidelity=False,
                 command=f"kvcrush-ov eval --precision {precision}", say=lambda _: None)
        runs.append(out)
    written = publish(runs, tmp_path / "report")
    names = sorted(p.name for p in written)
    tag = tiny_model.name
    assert names == sorted([f"{tag}.md", f"{tag}.results.jsonl", f"{tag}.run.json",
                            f"{tag}-f32.md", f"{tag}-f32.results.jsonl", f"{tag}-f32.run.json",
                            "plot.svg"])
    md = (tmp_path / "report" / f"{tag}-f32.md").read_text()
    assert "kvcrush-ov eval --precision f32" in md and "| snapkv | 0.5 |" in md
    assert "snapkv 1/1" in md and "full 1/1" in md
    run = json.loads((runs[1] / "run.json").read_text())
    assert run["inference_precision"] == "f32"  # an f32 cache forces f32 inference
    assert f"Inference: f32 on {run['device_name']}" in md
    assert "Partial run" not in md
    runs[0].joinpath("run.json").write_text(runs[0].joinpath("run.json").read_text().replace(
        '"num_samples": 1', '"num_samples": 2'))
    publish(runs[:1], tmp_path / "report2")
    assert "**Partial run**" in (tmp_path / "report2" / f"{tag}.md").read_text()
    svg = (tmp_path / "report" / "plot.svg").read_text()
    assert svg.count(f">{tag}") == 2  # one panel title per run
    from kvcrush_ov import ConfigError

    with pytest.raises(ConfigError, match="run"):
        publish([tmp_path / "nothing-here"], tmp_path / "report")


def test_a_published_run_restores_to_a_folder_that_reports_the_same(tmp_path):
    from kvcrush_ov import ConfigError
    from kvcrush_ov.cli import main
    from kvcrush_ov.eval.report import publish

    run = {"model": "/models/Tiny", "tasks": ["vt"], "num_samples": 2, "seed": 3,
           "budgets": [0.5], "methods": ["snapkv"], "precision": "u8",
           "command": "kvcrush-ov eval --model Tiny", "inference_precision": "f32",
           "device_name": "a CPU"}
    here = dict(run, commands=[f"kvcrush-ov eval --out {Path.home()}/runs/tiny"])
    first = tmp_path / "first"
    first.mkdir()
    (first / "run.json").write_text(json.dumps(here))
    rows = [{"task": "vt", "index": 0, "seed": 9, "method": m, "budget": b, "prediction": "x",
             "score": s, "outputs": ["x"], "input_tokens": 900, "kv_bytes": 1}
            for m, b, s in (("full", None, 1.0), ("snapkv", 0.5, 0.5))]
    (first / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    publish([first], tmp_path / "report")
    md = (tmp_path / "report" / "Tiny.md").read_text()
    assert "**Partial run**" in md and "snapkv 1/2" in md

    again = tmp_path / "again"
    assert main(["eval-restore", "--from", str(tmp_path / "report"), "--model", "Tiny",
                 "--out", str(again)]) == 0
    # published without this machine's home folder
    assert json.loads((again / "run.json").read_text()) == dict(
        run, commands=["kvcrush-ov eval --out ~/runs/tiny"])
    assert (again / "results.jsonl").read_text() == (first / "results.jsonl").read_text()
    assert not (again / "fidelity.jsonl").exists()  # none was published
    publish([again], tmp_path / "report2")
    assert (tmp_path / "report2" / "Tiny.md").read_text() == md

    from kvcrush_ov.eval.report import restore

    with pytest.raises(ConfigError, match=r"out=.*nothing is overwritten"):
        restore(tmp_path / "report", "Tiny", again)
    with pytest.raises(ConfigError, match=r"model='Small'.*Tiny.*Small.run.json is missing"):
        restore(tmp_path / "report", "Small", tmp_path / "third")
    assert not (tmp_path / "third").exists()
    assert main(["eval-restore", "--from", str(tmp_path / "report"), "--model", "Small",
                 "--out", str(tmp_path / "third")]) == 2
    with pytest.raises(ConfigError, match=r"from=.*eval-report"):
        restore(tmp_path / "no-report", "Tiny", tmp_path / "third")
    (tmp_path / "report" / "Tiny.run.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"model='Tiny'.*valid JSON"):
        restore(tmp_path / "report", "Tiny", tmp_path / "third")
    assert not (tmp_path / "third").exists()


def test_explain_locates_the_references_and_reports_what_was_kept(tiny_model):
    from kvcrush_ov.eval.explain import (
        explain,
        format_explanation,
        kept_share,
        reference_spans,
        token_share,
    )
    from kvcrush_ov.pipeline import Pipeline

    e = explain(str(tiny_model), "niah_single_1", 0, "streaming", 0.25, max_seq_length=1024)
    assert len(e.spans) == len(e.references) == 1 and e.kept  # one eviction at least
    tok = Pipeline(str(tiny_model), eviction=None).tokenizer
    from kvcrush_ov.eval.runner import build_samples, chat_wrap

    # the span's tokens decode to the needle value (the location is right)
    sample = build_samples(Pipeline(str(tiny_model), eviction=None), ["niah_single_1"], 1, 42,
                           1024)[0]
    ids = tok.encode(sample.prompt(chat_wrap(tok)), add_special_tokens=False).input_ids.data[0]
    a, b = e.spans[0]
    assert e.references[0] in tok.decode(list(ids[max(a - 1, 0):b + 1]))
    for share in e.kept:
        assert share.shape[0] >= 1 and ((share >= 0) & (share <= 1)).all()
    assert "layer  0:" in format_explanation(e)
    # hand case: 2 layers x 1 head; positions 3, 4 wanted
    kept = [[np.array([0, 3, 4])], [np.array([0, 4, 9])]]
    assert kept_share(kept, [(3, 5)]).tolist() == [[1.0], [0.5]]
    assert token_share(kept, [(3, 5)]).tolist() == [0.5, 1.0]
    assert len(e.by_token) == len(e.kept) and e.by_token[0].shape == (b - a,)
    assert "per reference token, in order" in format_explanation(e)
    assert reference_spans(len, "abcdef", ["cd", "zz"]) == [(2, 4)]


@pytest.mark.parametrize("method", ["snapkv", "kvzip"])
def test_explain_query_agnostic_reports_the_contexts_eviction(tiny_model, tmp_path, method):
    """With protocol query-agnostic the context is compressed before the question is read:
    the one eviction reported is the context's (its budget a share of the context alone), and
    the answer is the one the eval records for that sample, method and budget."""
    from kvcrush_ov.eval.explain import explain
    from kvcrush_ov.eval.runner import build_samples, chat_wrap, context_and_question, run_eval
    from kvcrush_ov.pipeline import Pipeline

    e = explain(str(tiny_model), "niah_single_1", 0, method, 0.25, max_seq_length=1024,
                protocol="query-agnostic")
    assert len(e.kept) == 1 and len(e.spans) == 1
    tok = Pipeline(str(tiny_model), eviction=None).tokenizer
    sample = build_samples(Pipeline(str(tiny_model), eviction=None), ["niah_single_1"], 1, 42,
                           1024)[0]
    ctx, question = context_and_question(tok, sample, chat_wrap(tok))
    # the context alone (KVzip's replay leaves one position more written), not its question
    assert len(e.evicted_at) == 1 and 0 <= e.evicted_at[0] - len(ctx) <= 1 < len(question)
    run_eval(str(tiny_model), tmp_path, tasks=["niah_single_1"], num_samples=1,
             methods=[method], budgets=[0.25], max_seq_length=1024, fidelity=False,
             protocol="query-agnostic", say=lambda _: None)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    rec = next(r for r in rows if r["method"] == method)
    assert e.prediction == rec["prediction"] and e.score == rec["score"]


def test_explain_a_prefill_eviction_method_keeps_its_budget(tiny_model):
    """A method that evicts while reading (the probe reads the prompt part by part) is
    explained with the budget of its whole prompt: its first eviction comes once the parts read
    exceed half the prompt (budget 0.5), its last at the prompt's end."""
    from kvcrush_ov.eval.explain import explain

    e = explain(str(tiny_model), "niah_single_1", 0, "snapkv+kvcrush-prefill-probe64", 0.5,
                max_seq_length=1024)
    assert len(e.evicted_at) >= 2 and e.evicted_at[0] >= e.evicted_at[-1] / 2


@pytest.mark.parametrize("kwargs,field", [
    ({"task": "niah_single_9"}, "task"),
    ({"protocol": "query-blind"}, "protocol"),
    ({"method": "genai-kvcrush"}, "method"),
    ({"index": -1}, "index"),
    ({"budget": 1.5}, "budget"),
])
def test_bad_explain_arguments_fail_before_loading(tmp_path, kwargs, field):
    from kvcrush_ov import ConfigError
    from kvcrush_ov.eval.explain import explain

    args = {"task": "vt", "index": 0, "method": "snapkv", "budget": 0.25, **kwargs}
    with pytest.raises(ConfigError) as info:
        explain(str(tmp_path / "never-read"), **args)
    assert info.value.field == field


def test_every_method_builds_at_every_default_budget(tiny_model, tmp_path):
    import dataclasses
    import json

    from kvcrush_ov.config import LESSConfig
    from kvcrush_ov.eval.methods import DEFAULT_BUDGETS, METHODS
    from kvcrush_ov.eviction.factory import make_policy, make_spec
    from kvcrush_ov.less.kernels import LESSWeights, default_weights_path

    # the LESS columns load the model's default weights file: untrained kernels of the tiny
    # model stand in (a copy of its folder, so the shared cache gets no file)
    c = json.loads((tiny_model / "config.json").read_text())
    folder = tmp_path / "model" / "ov"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(c))
    LESSWeights.initial(c["num_hidden_layers"], c["num_attention_heads"],
                        c["num_key_value_heads"], c["head_dim"]).save(
        default_weights_path(folder))
    # the KVzap columns load the model's surrogate: a zero one stands in, beside the copy
    from kvcrush_ov.kvzap.train import save as save_kvzap
    from kvcrush_ov.kvzap.weights import default_path as kvzap_path

    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    save_kvzap(kvzap_path(folder), np.zeros((c["num_hidden_layers"], c["hidden_size"], heads),
                                            np.float32),
               np.zeros((c["num_hidden_layers"], heads), np.float32), "kvzip", {})
    with pytest.raises(ConfigError, match="less.weights"):  # no model folder, no default file
        make_spec(METHODS["snapkv+less"].make(0.25))
    for m in METHODS.values():
        for b in DEFAULT_BUDGETS:
            cfg = m.make(b)
            assert cfg.max_cache_size == b
            if m.backend == "native":
                spec = make_spec(cfg, folder)
                assert (spec.less is not None) == (cfg.less is not None)
                if cfg.less is not None:
                    assert isinstance(cfg.less, LESSConfig)
                    make_spec(dataclasses.replace(cfg, less=None))
    trailing = make_policy(METHODS["snapkv+kvcrush-trailing"].make(0.25))
    assert trailing.importance.offset == 15 and trailing.importance.pooling == "avg"
    assert make_policy(METHODS["snapkv+kvcrush"].make(0.25)).importance.offset == 0
    assert make_spec(METHODS["snapkv+kvcrush-decode8"].make(0.25)).decode_window == 8
    # the stored KVCrush columns keep a fixed share; only the default column (and the
    # candidate that measures the default's taper on KVzap) tapers it
    for name, m in METHODS.items():
        policy = make_spec(m.make(0.25), folder).policy if m.backend == "native" else None
        if name not in ("snapkv+kvcrush-taper-decode8", "default+less",
                        "kvzap+kvcrush-taper") and hasattr(policy, "taper"):
            assert policy.taper is None, name
    assert make_policy(METHODS["snapkv+kvcrush-taper-decode8"].make(0.25)).taper == (0.125, 0.5)
    assert make_spec(METHODS["snapkv+kvcrush"].make(0.25)).decode_window is None  # every step
    assert make_spec(METHODS["h2o"].make(0.25)).policy.score_mode == "all"
    # KVzap's tuning candidates keep the surrogate's scores (a KVzap policy, not KVzip's)
    for name, field, value in (("kvzap-max3", "pooling", "max"), ("kvzap-avg3", "pooling", "avg"),
                               ("kvzap-alpha05", "alpha", 0.5)):
        policy = METHODS[name].policy()
        assert policy.score_mode == "surrogate" and getattr(policy, field) == value, name
    for n in (64, 128):  # KVzap's recent window, the rest KVzap's defaults
        cfg = METHODS[f"kvzap-recent{n}"].make(0.25)
        assert (cfg.importance, cfg.recent_size, cfg.kvcrush) == ("kvzap", n, None)
    cfg = METHODS["kvzap+kvcrush-share10"].make(0.25)
    assert cfg.importance == "kvzap" and cfg.max_cache_size == 0.25
    assert (cfg.kvcrush.budget, cfg.kvcrush.taper) == (0.1, False)


def test_tuning_candidates_run_only_when_named():
    from kvcrush_ov.config import CacheEvictionConfig
    from kvcrush_ov.eval.methods import METHODS, REPORT_METHODS
    from kvcrush_ov.eval.runner import method_spec
    from kvcrush_ov.eviction.factory import make_policy

    candidates = {"snapkv+kvcrush-share10", "snapkv+kvcrush-scaled", "snapkv+kvcrush-taper",
                  "fastkv-max7", "fastkv+kvcrush-split7", "kvzip-head", "kvzip-ada",
                  "kvzip-prefill", "kvzip-chunk64", "kvzip-chunk256", "kvzip-heads",
                  "snapkv+less", "snapkv+kvcrush+less", "default+less",
                  "snapkv+kvcrush-prefill", "snapkv+kvcrush-prefill-probe32",
                  "snapkv+kvcrush-prefill-probe128", "kvzip-recent8", "kvzip-recent32",
                  "kvzip-max3", "kvzip-max7", "kvzip-lanes256", "kvzip-lanes128", "kvzap",
                  "kvzap+kvcrush", "kvzap+kvcrush-taper", "kvzap+kvcrush-share50",
                  "kvzip-qw16", "kvzip-qw32", "kvzap-replay12", "kvzap-replay25",
                  "kvzap-replay50", "kvzap-replay50+kvcrush", "kvzap-replay50q",
                  "kvzap-replay50w128", "kvzip-query256", "kvzip-group16", "kvzap-max3",
                  "kvzap-avg3", "kvzap-alpha05", "kvzap-recent64", "kvzap-recent128",
                  "kvzap+kvcrush-share10", "kvzap-qw16", "kvzap-qw32", "kvzap-early25",
                  "kvzap-early33", "kvzap-early50", "kvzap-late25", "kvzap-late50",
                  "kvzap-layer", "kvzap-alpha0"}
    assert set(METHODS) - set(REPORT_METHODS) == candidates
    for name, group in (("kvzip-query256", 1), ("kvzip-group16", 16)):
        policy = method_spec(METHODS[name], 0.25).policy
        assert (policy.replay_group, policy.replay_chunk) == (group, 256)
    assert method_spec(METHODS["kvzip"], 0.25).policy.replay_group is None
    for n in (16, 32):
        assert method_spec(METHODS[f"kvzip-qw{n}"], 0.25).policy.question_window == n
        assert METHODS[f"kvzap-qw{n}"].policy().question_window == n
    assert method_spec(METHODS["kvzip"], 0.25).policy.question_window == 1
    assert METHODS["kvzap-layer"].policy().scope == "layer"
    # the report's prefill-eviction column is the default probe; the candidates name theirs
    assert METHODS["snapkv+kvcrush-prefill-probe64"].make(0.25).probe_tokens() == \
        CacheEvictionConfig(prefill_eviction=True).probe_tokens()
    assert METHODS["snapkv+kvcrush-prefill"].make(0.25).probe_tokens() == 0
    assert method_spec(METHODS["kvzip-ada"], 0.25).policy.scope == "layer"
    assert METHODS["fastkv+kvcrush-split7"].make(0.25).fastkv.split_layer == 7
    assert method_spec(METHODS["kvzip-head"], 0.25).policy.alpha is None
    assert method_spec(METHODS["kvzip"], 0.25).policy.scope == "model"
    assert method_spec(METHODS["kvzip-chunk256"], 0.25).policy.replay_chunk == 256
    assert method_spec(METHODS["kvzip-chunk64"], 0.25).policy.replay_chunk == 64
    for k in (3, 7):
        pooled = method_spec(METHODS[f"kvzip-max{k}"], 0.25).policy
        assert (pooled.pooling, pooled.kernel_size) == ("max", k)
    assert method_spec(METHODS["kvzip"], 0.25).policy.pooling == "none"
    with pytest.raises(ConfigError, match="model_dir"):  # kvzip-heads is built from the model
        method_spec(METHODS["kvzip-heads"], 0.25)
    assert make_policy(METHODS["snapkv+kvcrush-share10"].make(0.25)).share == 0.1
    assert make_policy(METHODS["snapkv+kvcrush-scaled"].make(0.25)).share == 0.125
    assert make_policy(METHODS["snapkv+kvcrush-taper"].make(0.25)).share == pytest.approx(0.25 / 3)
    assert type(make_policy(METHODS["snapkv+kvcrush-taper"].make(0.125))).__name__ == "SnapKV"


def test_the_default_column_runs_the_pipeline_default():
    from kvcrush_ov.config import CacheEvictionConfig
    from kvcrush_ov.eval.methods import METHODS, default_method
    from kvcrush_ov.eval.targets import DEFAULT_METHOD

    assert DEFAULT_METHOD == default_method() == "snapkv+kvcrush-taper-decode8"
    assert METHODS[DEFAULT_METHOD].make(0.125) == CacheEvictionConfig(max_cache_size=0.125)
    # every other native column differs from the default in some field
    others = [m for m in METHODS.values() if m.backend == "native" and m.name != DEFAULT_METHOD]
    assert all(m.make(0.125) != CacheEvictionConfig(max_cache_size=0.125) for m in others)


def test_a_folder_is_not_resumed_under_another_inference_precision(tmp_path):
    from kvcrush_ov import ConfigError
    from kvcrush_ov.eval.runner import check_same_inference

    path = tmp_path / "run.json"
    here = {"device_name": "AMD EPYC", "inference_precision": "f32"}
    check_same_inference(path, here)  # a new folder
    path.write_text(json.dumps({"methods": ["snapkv"]}))
    check_same_inference(path, here)  # written before the field existed
    path.write_text(json.dumps({"inference_precision": "f32"}))
    check_same_inference(path, here)
    path.write_text(json.dumps({"inference_precision": "bf16"}))
    with pytest.raises(ConfigError, match=r"out.*bf16 inference, this machine runs f32 \(AMD"):
        check_same_inference(path, here)


def test_a_bf16_run_stops_before_any_work_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    import kvcrush_ov.device as dv
    from kvcrush_ov import ConfigError

    monkeypatch.setattr(dv, "device_capabilities", lambda d: ["FP32", "INT8"])
    with pytest.raises(ConfigError) as info:  # the model folder does not exist: never read
        run_eval(str(tmp_path / "never-read"), tmp_path / "out", precision="bf16")
    assert info.value.field == "kv_cache.precision"
    assert not (tmp_path / "out").exists()


def test_less_and_fastkv_columns_are_refused_together(tmp_path):
    from kvcrush_ov.eval.runner import run_eval

    with pytest.raises(ConfigError, match="methods=.*LESS columns and FastKV columns"):
        run_eval("SmolLM2-135M-Instruct", tmp_path / "out", tasks=("niah_single_1",),
                 num_samples=1, methods=("fastkv", "snapkv+less"), budgets=(0.25,))


def test_fastkv_columns_with_two_split_layers_are_refused_before_work(tmp_path):
    from kvcrush_ov.eval.runner import run_eval

    with pytest.raises(ConfigError, match="methods=.*one split layer per run"):
        run_eval(str(tmp_path / "never-read"), tmp_path / "out", tasks=("niah_single_1",),
                 num_samples=1, methods=("fastkv", "fastkv+kvcrush-split7"), budgets=(0.25,))
    assert not (tmp_path / "out").exists()


def test_grouped_replays_are_a_score_group_of_their_own():
    """kvzip-query256 / kvzip-group16 replay in steps of 256 as kvzip-chunk256 does, but score
    by groups of 1 / 16 queries beside the step: three parents, each replayed its way
    (runner._group)."""
    from kvcrush_ov.eval import runner
    from kvcrush_ov.eval.methods import METHODS
    from kvcrush_ov.eval.runner import method_spec

    names = ("kvzip-chunk256", "kvzip-query256", "kvzip-group16", "kvzip-lanes128")
    specs = {(n, b): method_spec(METHODS[n], b) for n in names for b in (0.25, 0.125)}
    groups = runner.score_groups(specs)
    assert sorted(groups) == ["replay:16:lanes128", "replay:256", "replay:256:g1",
                              "replay:256:g16"]
    assert [runner._group(m) for m in sorted(groups)] == [None, None, 1, 16]
    assert [runner._lanes(m) for m in sorted(groups)] == [128, None, None, None]
    assert {k[0] for k in groups["replay:256:g1"]} == {"kvzip-query256"}


def test_kvzap_columns_with_a_question_window_have_their_own_parent():
    """A parent scores the window its columns ask for: KVzap columns group by question window."""
    import dataclasses

    from kvcrush_ov.config import CacheEvictionConfig
    from kvcrush_ov.eval.runner import score_groups
    from kvcrush_ov.eviction.factory import make_spec
    from kvcrush_ov.eviction.kvzap import KVzap

    base = make_spec(CacheEvictionConfig(max_cache_size=0.25))
    specs = {(name, 0.25): dataclasses.replace(base, policy=policy) for name, policy in (
        ("kvzap", KVzap()), ("kvzap-qw16", KVzap(question_window=16)),
        ("kvzap-qw32", KVzap(question_window=32)))}
    assert score_groups(specs) == {"surrogate": [("kvzap", 0.25)],
                                   "surrogate:qw16": [("kvzap-qw16", 0.25)],
                                   "surrogate:qw32": [("kvzap-qw32", 0.25)]}
