"""The C++ samples (samples/cpp) build with CMake and give the Python Pipeline's greedy output.

The samples are built once per session into ``build/test-samples`` (incremental on reruns)
against the openvino / openvino_tokenizers packages of this interpreter, as the README's
command builds them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvcrush_ov as kv

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "test-samples"
# cmake on PATH, or the one PyPI's cmake package put next to this interpreter
CMAKE = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.real_model

# ~300 tokens: the prompt runs in two chunks of max_num_batched_tokens=256, as in Python
PROMPT = "".join(
    f"Day {i}: the train left the station at {6 + i} o'clock, crossed the river and the "
    f"wheat fields, and reached the coast {i + 2} hours later, where the travellers ate "
    f"bread and fish before walking to the lighthouse.\n" for i in range(1, 8)) + "Day 8:"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="session")
def samples() -> Path:
    """The folder of the built sample executables."""
    # scripts/setup.sh installs both (g++ from the system's packages, cmake from PyPI)
    assert CMAKE is not None, "cmake not found: run scripts/setup.sh (installs it from PyPI)"
    assert shutil.which("c++") or shutil.which("g++"), "no C++ compiler: run scripts/setup.sh"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    for cmd in ([CMAKE, "-S", str(REPO / "samples" / "cpp"), "-B", str(BUILD),
                 f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"],
                [CMAKE, "--build", str(BUILD), "--target", "all", "kvcrush_config_messages",
                 "kvcrush_eviction_log"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
        assert "warning:" not in res.stdout + res.stderr, res.stdout + res.stderr
    return BUILD


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run_generate(samples: Path, model: Path, prompt: str, *args: str,
                 one_core: bool = False) -> tuple[str, dict]:
    """(answer text, {"generated": n, "evictions": n, "held": KiB}) printed by generate
    (``one_core``: in a process limited to one core)."""
    res = subprocess.run([str(samples / "generate"), str(model), prompt, *args],
                         capture_output=True, text=True, timeout=600,
                         preexec_fn=_one_core if one_core else None)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr}"
    text, _, stats = res.stdout.rpartition("\n--\n")
    numbers = {key: int(re.search(pattern, stats).group(1)) for key, pattern in
               [("generated", r"(\d+) generated"), ("evictions", r"(\d+) evictions"),
                ("held", r"held (\d+) KiB")]}
    return text, numbers


def test_generate_full_cache_matches_python(samples, smollm2_fp16):
    text, stats = run_generate(samples, smollm2_fp16, PROMPT, str(MAX_NEW_TOKENS), "full")
    out = kv.Pipeline(smollm2_fp16, eviction=None).generate(
        PROMPT, max_new_tokens=MAX_NEW_TOKENS, apply_chat_template=False)
    assert out.metrics[0].num_input_tokens > 256  # more than one prefill chunk
    assert stats["generated"] == out.metrics[0].num_generated_tokens
    assert text == out.texts[0]
    assert text.strip()  # a real continuation, not an immediate EOS
    assert stats["evictions"] == 0


def test_generate_runs_in_a_one_core_process(samples, tiny_model):
    """OpenVINO 2026.4 dies (SIGFPE) compiling for bf16 inference on one core: the C++ runners
    compute in f32 there (kvcrush::kv_cache_properties), the full cache and the per-head graph
    alike."""
    prompt = "hello world " * 200
    for args in (["4", "full"], ["4"]):
        _, stats = run_generate(samples, tiny_model, prompt, *args, one_core=True)
        assert stats["generated"] == 4


def test_generate_default_eviction_matches_python(samples, smollm2_fp16):
    """The default CacheEvictionConfig (SnapKV + KVCrush, 25% of the prompt, at least 160
    tokens): an eviction after the prompt and one while decoding (40 tokens: the cache grows
    evict_interval=32 past its budget)."""
    new_tokens = 40
    text, stats = run_generate(samples, smollm2_fp16, PROMPT, str(new_tokens))
    out = kv.Pipeline(smollm2_fp16).generate(PROMPT, max_new_tokens=new_tokens,
                                             apply_chat_template=False)
    m = out.metrics[0]
    assert m.num_evictions == 2 and m.num_generated_tokens == new_tokens
    assert stats["generated"] == new_tokens
    assert stats["evictions"] == m.num_evictions
    assert stats["held"] == out.cache.final_kv_bytes // 1024
    assert text == out.texts[0]


def test_long_document_qa_matches_python(samples, smollm2_fp16, tmp_path):
    """Both runs of the sample (full cache, KVCrush at 25%) answer as the Python Pipeline, on
    the demo's task cut to ~300 tokens (an essay's first sentences, then the demo's detail)."""
    from kvcrush_ov.data import essays
    from kvcrush_ov.demo import DETAIL, ESSAYS, QUESTION

    text = essays()[ESSAYS[0]]
    document, question = text[:text.find(". ", 1100) + 1] + DETAIL + "\n", QUESTION
    (tmp_path / "doc.txt").write_text(document)
    res = subprocess.run([str(samples / "long_document_qa"), str(smollm2_fp16),
                          str(tmp_path / "doc.txt"), question, "12"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    runs = re.split(r"^(full cache|KVCrush 25%) .*tokens/s\n", res.stdout, flags=re.M)[1:]
    answers = dict(zip(runs[0::2], runs[1::2], strict=True))
    prompt = f"{document}\n\nQuestion: {question} Answer briefly."
    for label, eviction in (("full cache", None),
                            ("KVCrush 25%", kv.CacheEvictionConfig(max_cache_size=0.25))):
        out = kv.Pipeline(smollm2_fp16, eviction=eviction).generate(
            prompt, max_new_tokens=12, apply_chat_template=False)
        answer = out.texts[0].lstrip(" \n")  # the sample prints it without leading blanks
        assert answers[label] == f"  {answer}\n", label
        assert answer.strip(), label  # a real answer, not an immediate EOS


@pytest.mark.parametrize(("importance", "mode", "events"), [
    ("snapkv", "continuous", 3), ("h2o", "continuous", 3), ("adakv", "prefill", 1)])
def test_eviction_events_match_python(samples, smollm2_fp16, tmp_path, importance, mode,
                                      events):
    """Every eviction keeps the same positions in every layer and KV head as Python's (its
    eviction log), and the tokens after the evictions are the same. The default config with
    4 sinks and 16 recent tokens, so that the policy (with KVCrush) chooses 64 of the 84 tokens
    kept (with the default 32 + 128 it would choose none of this prompt's). snapkv: the default;
    h2o: every query scored; adakv: per-head budgets (heads hold different tokens), evicting
    once after the prompt."""
    new_tokens, start, recent = 72, 4, 16  # continuous: evictions after the prompt, 32 and 64
    (tmp_path / "prompt.txt").write_text(PROMPT)
    res = subprocess.run([str(samples / "kvcrush" / "kvcrush_eviction_log"), str(smollm2_fp16),
                          str(tmp_path / "prompt.txt"), str(new_tokens), str(start), str(recent),
                          importance, mode], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    eviction = kv.CacheEvictionConfig(start_size=start, recent_size=recent, log=True,
                                      importance=importance, mode=mode)
    out = kv.Pipeline(smollm2_fp16, eviction=eviction).generate(
        PROMPT, max_new_tokens=new_tokens, apply_chat_template=False, ignore_eos=True)
    log = out.metrics[0].eviction_log
    assert len(log) == events
    assert [int(t) for t in lines[0].split()] == out.token_ids[0]
    at = 1
    for record in log:
        assert lines[at] == f"{record.num_written} {record.budget}"
        at += 1
        for layer in record.kept:
            for kept in layer:
                assert lines[at].split() == [str(p) for p in kept.tolist()], f"line {at}"
                at += 1
    assert at == len(lines)


# the cases of cpp/tests/config_messages.cpp, in its order
INVALID = [
    (kv.CacheEvictionConfig, {"max_cache_size": 0}),
    (kv.CacheEvictionConfig, {"max_cache_size": 1.5}),
    (kv.CacheEvictionConfig, {"max_cache_size": 100}),
    (kv.CacheEvictionConfig, {"start_size": -1}),
    (kv.CacheEvictionConfig, {"importance": "magic"}),
    (kv.CacheEvictionConfig, {"aggregation_mode": "mean"}),
    (kv.CacheEvictionConfig, {"mode": "sometimes"}),
    (kv.CacheEvictionConfig, {"evict_interval": 0}),
    (kv.CacheEvictionConfig, {"kernel_size": 4}),
    (kv.CacheEvictionConfig, {"pooling_offset": 16}),
    (kv.CacheEvictionConfig, {"decode_window_size": 33}),
    (kv.CacheEvictionConfig, {"pooling": "median"}),
    (kv.CacheEvictionConfig, {"recent_size": -1}),
    (kv.CacheEvictionConfig, {"importance": "upstream", "plain_prefill": True}),
    (kv.CacheEvictionConfig, {"importance": "kvzip", "max_cache_size": 40}),
    (kv.KVCrushConfig, {"budget": 1.25}),
    (kv.KVCrushConfig, {"budget": 1e-7 - 1}),
    (kv.KVCrushConfig, {"anchor_point_mode": "it's"}),
    (kv.KVCrushConfig, {"granularity": "page"}),
    (kv.KVCacheConfig, {"precision": "u9"}),
    (kv.KVCacheConfig, {"cache_size": -0.5}),
    (kv.SchedulerConfig, {"max_num_batched_tokens": 0}),
    (kv.GenerationConfig, {"max_new_tokens": 0}),
]


def test_config_errors_read_as_in_python(samples, smollm2_fp16):
    res = subprocess.run([str(samples / "kvcrush" / "kvcrush_config_messages"),
                          str(smollm2_fp16)], capture_output=True, text=True, check=True)
    invalid = [lambda cls=cls, kwargs=kwargs: cls(**kwargs) for cls, kwargs in INVALID] + [
        lambda: kv.Pipeline(smollm2_fp16, kv_cache=kv.KVCacheConfig(num_kv_blocks=3)),
        lambda: kv.Pipeline(smollm2_fp16, kv_cache=kv.KVCacheConfig(cache_size=0.0001)),
        lambda: kv.Pipeline(smollm2_fp16, eviction=None).generate(
            "hi", max_new_tokens=8192, apply_chat_template=False),
    ]
    expected = []
    for make in invalid:
        with pytest.raises(kv.ConfigError) as err:
            make()
        expected.append(str(err.value))
    assert res.stdout.splitlines() == expected


def test_generate_rejects_a_missing_model(samples, tmp_path):
    res = subprocess.run([str(samples / "generate"), str(tmp_path / "none"), "hi", "4", "full"],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "no openvino_model.xml" in res.stderr


def test_benchmark_generate_times_warm_runs_and_answers_as_python(samples, smollm2_fp16):
    """benchmark_generate: WARMUP untimed runs, then ITERS timed ones in one process; its text
    is the Python Pipeline's; bad arguments are named."""
    res = subprocess.run([str(samples / "benchmark_generate"), str(smollm2_fp16), PROMPT,
                          str(MAX_NEW_TOKENS), "eviction", "1", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    text, _, stats = res.stdout.rpartition("\n--\n")
    assert len(re.findall(r"^run \d+: TTFT [\d.]+ s, decode [\d.]+ tokens/s$", text,
                          re.MULTILINE)) == 2
    answer = text.split("\n", 2)[2]  # after the two run lines
    out = kv.Pipeline(smollm2_fp16).generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS,
                                             apply_chat_template=False)
    assert answer == out.texts[0]
    m = re.search(r"median of 2 after 1 warm-up: TTFT ([\d.]+) s, decode ([\d.]+) tokens/s; "
                  r"0 prompt chunks on the plain graph", stats)
    assert m is not None and float(m.group(1)) > 0 and float(m.group(2)) > 0
    for args, named in ((["4", "some"], "mode=some: allowed full, eviction, plain"),
                        (["4", "full", "x"], "WARMUP=x: allowed an integer >= 0"),
                        (["4", "full", "1", "0"], "ITERS=0: allowed an integer >= 1")):
        bad = subprocess.run([str(samples / "benchmark_generate"), str(smollm2_fp16), "hi",
                              *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and named in bad.stderr


def test_plain_prefill_answers_as_python_and_as_the_per_head_graph(samples, smollm2_fp16):
    """benchmark_generate's ``plain`` mode (CacheEvictionConfig::plain_prefill): the prompt's
    first chunk, which nobody scores, runs on the plain graph over the per-head pools; the
    answer is the Python Pipeline's with plain_prefill and the per-head graph's alone."""
    res = subprocess.run([str(samples / "benchmark_generate"), str(smollm2_fp16), PROMPT,
                          str(MAX_NEW_TOKENS), "plain", "0", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    text, _, stats = res.stdout.rpartition("\n--\n")
    assert "; 1 prompt chunks on the plain graph" in stats  # of the two
    answer = text.split("\n", 1)[1]  # after the run line
    g = kv.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, apply_chat_template=False)
    plain = kv.Pipeline(smollm2_fp16, eviction=kv.CacheEvictionConfig(plain_prefill=True))
    out = plain.generate(PROMPT, g)
    assert plain.backend.engine.runner.plain_steps == 1
    assert answer == out.texts[0]
    assert answer == kv.Pipeline(smollm2_fp16).generate(PROMPT, g).texts[0]
