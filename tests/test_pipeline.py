"""Pipeline plumbing on the tiny random Llama: generation options, metrics, guards, bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest

from conftest import prompt_of_length, refuses_bf16_here
from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    GenerationConfig,
    KVCacheConfig,
    KVCrushConfig,
    ModelError,
    Pipeline,
)
from kvcrush_ov.model_info import check_model_dir

SMALL_EVICTION = CacheEvictionConfig(max_cache_size=128, start_size=32, recent_size=32,
                                     snapkv_window_size=32, kvcrush=KVCrushConfig(budget=0.25))


@pytest.fixture(scope="module", params=["genai", "native"])
def pipe(tiny_model, request):
    """The same plumbing tests run on both backends."""
    return Pipeline(tiny_model, eviction=None, backend=request.param)


@pytest.fixture(scope="module")
def evicting_pipe(tiny_model):
    return Pipeline(tiny_model, eviction=SMALL_EVICTION, backend="genai")


def test_greedy_is_deterministic_and_metrics_are_consistent(pipe):
    a = pipe.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True)
    b = pipe.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids
    m = a.metrics[0]
    assert m.num_generated_tokens == len(a.token_ids[0]) == 12
    assert m.num_input_tokens > 4  # the chat template wraps the prompt
    assert 0 < m.ttft_s < a.generate_s
    assert m.tpot_s > 0 and m.tokens_per_s > 0
    assert a.finish_reasons == ["length"]
    assert a.cache.peak_kv_bytes >= a.cache.kv_block_bytes
    assert a.text == pipe.tokenizer.decode(a.token_ids[0])


def test_chat_template_on_and_off(pipe):
    on = pipe.generate("hello", max_new_tokens=2, apply_chat_template=True)
    off = pipe.generate("hello", max_new_tokens=2, apply_chat_template=False)
    assert on.metrics[0].num_input_tokens > off.metrics[0].num_input_tokens


def test_sampling_is_reproducible_under_a_seed(pipe):
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95,
                           top_k=50, rng_seed=7, ignore_eos=True)
    a = pipe.generate("Once upon a time", cfg)
    b = pipe.generate("Once upon a time", cfg)
    c = pipe.generate("Once upon a time", cfg, rng_seed=8)
    greedy = pipe.generate("Once upon a time", max_new_tokens=16, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids or a.token_ids != greedy.token_ids


def test_streaming_yields_the_whole_text(pipe):
    chunks: list[str] = []
    out = pipe.generate("Tell me a story", max_new_tokens=20, ignore_eos=True,
                        streamer=lambda s: chunks.append(s))
    assert len(chunks) > 1
    assert "".join(chunks) == out.text


def test_streamer_can_stop_generation(pipe):
    seen: list[str] = []

    def stop_after_three(s: str) -> bool:
        seen.append(s)
        return len(seen) >= 3

    out = pipe.generate("Tell me a story", max_new_tokens=40, ignore_eos=True,
                        streamer=stop_after_three)
    assert out.metrics[0].num_generated_tokens < 40


def test_stop_strings(pipe):
    free = pipe.generate("abc", max_new_tokens=20, ignore_eos=True)
    stop = free.text.strip()[:3]
    assert stop
    out = pipe.generate("abc", max_new_tokens=20, ignore_eos=True, stop_strings=(stop,),
                        include_stop_str_in_output=True)
    assert out.finish_reasons == ["stop"]
    assert out.metrics[0].num_generated_tokens < 20


@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_equals_returned_text_with_stop_strings(pipe, include):
    """What the streamer receives, joined, is the returned text: held back while it could
    still become a stop string, cut where one starts (it used to stream ".\n" and return ".")."""
    free = pipe.generate("Tell me a story", max_new_tokens=24, ignore_eos=True).text
    assert len(free) > 12
    for stop in (free[8], free[6:9], free[-3:]):
        chunks: list[str] = []
        out = pipe.generate("Tell me a story", max_new_tokens=24, ignore_eos=True,
                            stop_strings=[stop, "\u2603never"],
                            include_stop_str_in_output=include, streamer=chunks.append)
        assert out.finish_reasons == ["stop"], stop
        assert "".join(chunks) == out.text, (stop, chunks, out.text)
        assert (stop in out.text) if include else (stop not in out.text)


def test_batch_equals_one_by_one(pipe):
    prompts = ["alpha beta", "gamma delta epsilon zeta", "eta"]
    batch = pipe.generate(prompts, max_new_tokens=8, ignore_eos=True)
    single = [pipe.generate(p, max_new_tokens=8, ignore_eos=True).token_ids[0] for p in prompts]
    assert batch.token_ids == single
    assert len(batch.metrics) == 3


@pytest.mark.parametrize("precision", ["u8", "u4", "bf16", "f32"])
def test_kv_block_bytes_match_genai(tiny_model, precision):
    """Our per-block byte count equals what GenAI allocates for a fixed number of blocks."""
    info = check_model_dir(tiny_model)

    def make():
        return Pipeline(tiny_model, eviction=None, backend="genai",
                        kv_cache=KVCacheConfig(precision=precision, num_kv_blocks=10))

    if precision == "bf16" and refuses_bf16_here(make):
        return
    if precision == "u4":  # GenAI 2026.4.1 corrupts the heap with u4 (docs/reliability.md)
        with pytest.raises(ConfigError, match=r"kv_cache\.precision='u4'.*corrupts the heap"):
            make()
        return
    pipe = make()
    out = pipe.generate("hi", max_new_tokens=2)
    allocated = pipe.backend._pipeline(None).get_metrics().kv_cache_size_in_bytes
    assert allocated == 10 * info.kv_block_bytes(precision)
    assert out.cache.kv_block_bytes == info.kv_block_bytes(precision)


def test_upstream_defect_still_exists_so_the_guard_is_needed(tiny_model):
    """GenAI throws (and leaks blocks) for start_size < prompt < start_size + snapkv window.

    If this starts passing generation, upstream fixed it and the guard in backends/genai.py can go.
    """
    sc = ov_genai.SchedulerConfig()
    sc.enable_prefix_caching = False
    sc.use_cache_eviction = True
    sc.cache_eviction_config = ov_genai.CacheEvictionConfig(
        32, 32, 96, ov_genai.AggregationMode.NORM_SUM, False, 32, None)
    raw = ov_genai.ContinuousBatchingPipeline(str(tiny_model), sc, "CPU", {})
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = 64
    gc.ignore_eos = True
    handle = raw.add_request(0, ov.Tensor(np.full((1, 40), 5, dtype=np.int64)), gc)  # noqa: F841
    with pytest.raises(RuntimeError, match="new_scores_size >= num_snapkv_scores"):
        while raw.has_non_finished_requests():
            raw.step()


def test_every_prompt_length_from_1_to_80_generates(evicting_pipe):
    tok = evicting_pipe.tokenizer
    evicted = 0
    for n in range(1, 81):
        out = evicting_pipe.generate(prompt_of_length(tok, n), max_new_tokens=80, ignore_eos=True,
                                     apply_chat_template=False)
        assert out.metrics[0].num_input_tokens == n
        assert out.metrics[0].num_generated_tokens == 80, f"prompt of {n} tokens"
        evicted += out.metrics[0].kv_budget_tokens is not None
    assert evicted == 80 - 48  # prompts with n + 80 > 128 tokens were evicted


def test_eviction_keeps_the_budget_in_blocks(evicting_pipe):
    tok = evicting_pipe.tokenizer
    out = evicting_pipe.generate(prompt_of_length(tok, 600), max_new_tokens=24, ignore_eos=True,
                                 apply_chat_template=False)
    m, c = out.metrics[0], out.cache
    assert m.kv_budget_tokens == 128 and m.kvcrush_tokens == 32
    assert c.peak_kv_blocks >= 600 // 32  # GenAI evicts only after prefill
    # while decoding: the budget plus the block being filled
    assert c.final_kv_blocks <= 128 // 32 + 1


# -- bad input --------------------------------------------------------------------------------

def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        Pipeline(tmp_path / "nope")


def test_unknown_registry_name():
    with pytest.raises(ModelError, match="no registry model of that name"):
        Pipeline("llama-9000")


def test_incomplete_model_folder(tmp_path, tiny_model):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    (bad / "openvino_tokenizer.xml").unlink()
    with pytest.raises(ModelError, match="missing openvino_tokenizer.xml"):
        Pipeline(bad)


def test_corrupt_model_ir(tmp_path, tiny_model):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    (bad / "openvino_model.xml").write_text("<net><layers>truncated")
    with pytest.raises(ModelError, match="could not be loaded"):
        Pipeline(bad, eviction=None)


def test_corrupt_weights(tmp_path, tiny_model):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    with open(bad / "openvino_model.bin", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ModelError, match="could not be loaded"):
        Pipeline(bad, eviction=None)


def test_corrupt_config(tmp_path, tiny_model):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        Pipeline(bad)


@pytest.mark.parametrize("kwargs,field", [
    ({"device": "NPU7"}, "device"),
    ({"backend": "vllm"}, "backend"),
    ({"kv_cache": "u8"}, "kv_cache"),
    ({"eviction": 0.25}, "eviction"),
    ({"eviction": CacheEvictionConfig(start_size=16), "backend": "genai"}, "eviction.start_size"),
    ({"eviction": CacheEvictionConfig(recent_size=0), "backend": "genai"},
     "eviction.recent_size"),
    ({"eviction": CacheEvictionConfig(max_cache_size=170), "backend": "genai"},
     "eviction.max_cache_size"),
    ({"eviction": CacheEvictionConfig(apply_rotation=True)}, "eviction.apply_rotation"),
    ({"eviction": CacheEvictionConfig(apply_rotation=True), "backend": "genai"},
     "eviction.apply_rotation"),
    ({"eviction": CacheEvictionConfig(importance="adakv"), "backend": "genai"},
     "eviction.importance"),
    ({"eviction": CacheEvictionConfig(mode="prefill"), "backend": "genai"}, "eviction.mode"),
    ({"eviction": CacheEvictionConfig(pooling_offset=3), "backend": "genai"},
     "eviction.pooling_offset"),
    ({"eviction": CacheEvictionConfig(decode_window_size=8), "backend": "genai"},
     "eviction.decode_window_size"),
    ({"eviction": CacheEvictionConfig(kvcrush=KVCrushConfig(granularity="token")),
      "backend": "genai"}, "kvcrush.granularity"),
    ({"eviction": CacheEvictionConfig(kvcrush=KVCrushConfig(anchor_point_mode=("ones", "mean"))),
      "backend": "genai"}, "kvcrush.anchor_point_mode"),
    ({"eviction": CacheEvictionConfig(kvcrush=KVCrushConfig(taper=True)), "backend": "genai"},
     "kvcrush.taper"),
])
def test_bad_pipeline_arguments_fail_before_loading(kwargs, field, tmp_path):
    # the model folder does not exist: the argument must be rejected before it is looked at
    with pytest.raises(ConfigError) as info:
        Pipeline(tmp_path / "never-read", **kwargs)
    assert info.value.field == field


def test_rotation_is_rejected_even_with_an_f32_cache(tiny_model):
    with pytest.raises(ConfigError, match="apply_rotation=True.*corrupts the heap"):
        Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32"),
                 eviction=CacheEvictionConfig(apply_rotation=True), backend="genai")


@pytest.mark.parametrize("prompts,field", [
    ("", "prompt"), ("   ", "prompt"), ([], "prompts"), (["ok", ""], "prompts[1]"),
    ([3], "prompts[0]"), (None, "prompts"),
])
def test_bad_prompts(pipe, prompts, field):
    with pytest.raises(ConfigError) as info:
        pipe.generate(prompts, max_new_tokens=4)
    assert info.value.field == field


def test_prompt_longer_than_the_context(pipe):
    long = prompt_of_length(pipe.tokenizer, 2100)
    with pytest.raises(ConfigError, match=r"prompt=.*2100 tokens.*at most 2040 tokens.*context "
                                          r"is 2048"):
        pipe.generate(long, max_new_tokens=8, apply_chat_template=False)


def test_bad_generation_arguments(pipe):
    with pytest.raises(ConfigError, match="max_tokens"):
        pipe.generate("hi", max_tokens=5)
    with pytest.raises(ConfigError, match="temperature"):
        pipe.generate("hi", do_sample=True, temperature=-1.0)
    with pytest.raises(ConfigError, match="streamer"):
        pipe.generate(["a", "b"], streamer=print)


def test_pipeline_still_works_after_bad_input(pipe):
    with pytest.raises(ConfigError):
        pipe.generate("", max_new_tokens=4)
    out = pipe.generate("fine", max_new_tokens=3, ignore_eos=True)
    assert out.metrics[0].num_generated_tokens == 3


def test_cli_reports_errors_with_exit_code_2(tiny_model):
    cli = [sys.executable, "-m", "kvcrush_ov.cli"]
    r = subprocess.run(cli + ["generate", "", "--model", str(tiny_model)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: prompt=''" in r.stderr
    r = subprocess.run(cli + ["models", "fetch", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 2 and "error: model='nosuch'" in r.stderr
    r = subprocess.run(cli + ["generate", "hi", "--model", str(tiny_model), "--budget", "lots"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--budget='lots'" in r.stderr


def test_cli_generate(tiny_model):
    r = subprocess.run([sys.executable, "-m", "kvcrush_ov.cli", "generate", "hello there",
                        "--model", str(tiny_model), "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stderr and "KV held" in r.stderr


def test_cli_generate_with_fastkv_reports_the_split(tiny_model):
    r = subprocess.run([sys.executable, "-m", "kvcrush_ov.cli", "generate", "hello there " * 200,
                        "--model", str(tiny_model), "--max-new-tokens", "5", "--fastkv",
                        "--tsp-rate", "0.3", "--split-layer", "1", "--no-chat-template"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[FastKV: layers 0-1 processed" in r.stderr, r.stderr


def test_cli_generate_with_plain_prefill(tiny_model):
    """--plain-prefill runs; with --fastkv it is refused by name before any work."""
    base = [sys.executable, "-m", "kvcrush_ov.cli", "generate", "hello there " * 200,
            "--model", str(tiny_model), "--max-new-tokens", "3", "--no-chat-template",
            "--plain-prefill"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stderr
    r = subprocess.run(base + ["--fastkv"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "eviction.plain_prefill=True" in r.stderr, r.stderr


@pytest.mark.parametrize("args,field", [
    (["bench", "--repeats", "0"], "--repeats=0"),
    (["bench", "--new-tokens", "1"], "--new-tokens=1"),
    (["bench-eviction", "--long-tokens", "1000"], "--long-tokens=1000"),
    (["bench-eviction", "--capacity-full", "0"], "--capacity-full=0"),
    (["bench-eviction", "--repeats", "0"], "--repeats=0"),
    (["bench-prefill", "--tokens", "0"], "--tokens=[0]"),
    (["bench-prefill", "--repeats", "0"], "--repeats=0"),
    (["bench-prefill", "--tsp-rate", "1.5"], "fastkv.tsp_rate=1.5"),
    (["bench-prefill", "--split-layer", "-2"], "fastkv.split_layer=-2"),
])
def test_cli_bench_rejects_bad_numbers(args, field):
    r = subprocess.run([sys.executable, "-m", "kvcrush_ov.cli", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"error: {field} is invalid" in r.stderr


def test_selection_benchmark_reports_the_median_and_the_worst_request(tiny_model):
    from kvcrush_ov.bench_eviction import selection

    figures = {f.what: f for f in selection(str(tiny_model), prompt_tokens=256, new_tokens=8,
                                           warmups=1, repeats=3)}
    assert figures["eviction events"].value >= 1
    assert figures["selection share of latency"].value > 0
    assert figures["selection share of latency"].value <= figures[
        "selection share, worst request"].value
    assert "median of 3 after 1 warm-ups" in figures["selection share of latency"].note
    assert figures["selection per event, warm-up 1"].value > 0


def test_ttft_benchmark_alternates_full_and_eviction(tiny_model):
    from kvcrush_ov.bench_eviction import ttft

    figures = ttft(str(tiny_model), warmups=1, repeats=3, prompt=" ".join(["the river"] * 300))
    full, graph, evicting, graph_ratio, ratio, plain, plain_ratio = figures[:7]
    outside = figures[7:]
    assert [f.what for f in outside] == [f"outside OpenVINO and eviction, {k}" for k in (
        "full", "graph", "eviction", "eviction, plain prefill")]
    assert plain.value > 0 and plain_ratio.value == pytest.approx(plain.value / full.value)
    # bookkeeping is part of a request, never all of it
    assert all(0 < f.value < 1e3 * evicting.value * 10 for f in outside)
    assert re.search(r"\d+-token prompt, u8; median of 3 \(", full.note)
    assert full.value > 0 and evicting.value > 0 and graph.value > 0
    assert graph_ratio.value == pytest.approx(graph.value / full.value)
    assert ratio.value == pytest.approx(evicting.value / full.value)
    assert ratio.unit == "x" and "1.03x" in ratio.note


def test_flat_benchmark_counts_the_decode_time_evictions(tiny_model):
    import re

    from kvcrush_ov.bench_eviction import flat

    figs = flat(str(tiny_model), long_tokens=1024, short_tokens=256, new_tokens=48, repeats=2)
    short, graph, scored, continuous, every, prefill = figs
    assert "mean of 2 lockstep rounds" in short.note and short.value > 0
    assert "no eviction" in graph.what and "no eviction" in scored.what
    assert all(re.match(r"\d+\.\d{3}x; ", f.note) for f in figs[1:])
    # continuous: after the prompt's eviction, one more 32 tokens into the decode
    assert re.search(r"before each eviction; 1 decode-time eviction events", continuous.note)
    assert re.search(r"as GenAI does; 1 decode-time eviction events", every.note)
    assert re.search(r"while decoding; 0 decode-time eviction events", prefill.note)
    assert "0 decode-time eviction events" in graph.note and "0 decode-time" in scored.note
    # every round is listed: 2 per-round figures per row
    assert all(len(f.note.split("per round: ")[1].split(";")[0].split(" / ")) == 2
               for f in figs)
    assert all(re.search(r"first decode step per round: \d+ / \d+ ms", f.note) for f in figs)


def test_a_bf16_cache_is_refused_by_name_where_the_cpu_has_no_bf16(monkeypatch):
    import kvcrush_ov.device as pl

    monkeypatch.setattr(pl, "device_capabilities", lambda d: ["FP32", "INT8", "BIN"])
    with pytest.raises(ConfigError, match=r"kv_cache\.precision.*u8, u4 or f32 on CPU.*no BF16 "
                                          r"support \(OPTIMIZATION_CAPABILITIES: FP32, INT8"):
        Pipeline("no-such-model-is-loaded", kv_cache=KVCacheConfig(precision="bf16"))
    pl.check_kv_precision("CPU", "u8")  # other precisions are not affected
    monkeypatch.setattr(pl, "device_capabilities", lambda d: ["FP32", "BF16", "INT8"])
    pl.check_kv_precision("CPU", "bf16")


def test_this_machine_either_runs_a_bf16_cache_or_refuses_it_by_name(tiny_model):
    """Real devices: the guard agrees with what OpenVINO's CPU plugin can compile."""
    def make():
        return Pipeline(tiny_model, eviction=None, kv_cache=KVCacheConfig(precision="bf16"))

    if not refuses_bf16_here(make):
        assert len(make().generate("hi", max_new_tokens=2).token_ids[0]) == 2
        return
    # the guard is needed: without it the CPU plugin's PagedAttention rejects the cache itself
    from kvcrush_ov.device import compile_properties
    from kvcrush_ov.transformations.paged import read_paged_model

    model = read_paged_model(tiny_model, score_outputs=False, logits_indices=True)
    with pytest.raises(RuntimeError, match="kvcache type f32"):
        ov.Core().compile_model(model, "CPU", compile_properties("CPU", "bf16"))
