"""Real models fetched from the registry: the exported OpenVINO model against transformers on the
same checkpoint, and eviction / the demo on SmolLM2."""

from __future__ import annotations

import pytest

from kvcrush_ov import CacheEvictionConfig, KVCacheConfig, KVCrushConfig, Pipeline
from kvcrush_ov.models import store
from kvcrush_ov.models.registry import get_spec

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of the forest, there lived",
)

pytestmark = pytest.mark.real_model


def _hf(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = store.hf_dir(get_spec(name).name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"])
def model_pair(request, smollm2_fp16, qwen05_fp16):
    folder = smollm2_fp16 if request.param.startswith("SmolLM2") else qwen05_fp16
    pipe = Pipeline(folder, eviction=None, kv_cache=KVCacheConfig(precision="f32"))
    model, tok = _hf(request.param)
    yield request.param, pipe, model, tok
    del model


def test_tokenizer_ids_match_transformers(model_pair):
    _, pipe, _, hf_tok = model_pair
    for prompt in PROMPTS:
        ov_ids = list(pipe.backend.encode(prompt, apply_chat_template=False)[0])
        assert ov_ids == hf_tok(prompt)["input_ids"], prompt
        ov_chat = list(pipe.backend.encode(prompt, apply_chat_template=True)[0])
        hf_chat = hf_tok.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=True)
        if isinstance(hf_chat, dict) or hasattr(hf_chat, "input_ids"):
            hf_chat = hf_chat["input_ids"]
        assert ov_chat == list(hf_chat), f"chat template: {prompt}"


def test_greedy_16_tokens_match_transformers(model_pair):
    import torch

    name, pipe, model, hf_tok = model_pair
    for prompt in PROMPTS:
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=16, do_sample=False,
                                 pad_token_id=hf_tok.pad_token_id or hf_tok.eos_token_id)
        ref_new = ref[0, ids.shape[1]:].tolist()
        out = pipe.generate(prompt, max_new_tokens=16, apply_chat_template=False)
        assert out.token_ids[0][:16] == ref_new[:16], (
            f"{name}: {prompt!r}\nopenvino: {out.text!r}\ntransformers: "
            f"{hf_tok.decode(ref_new)!r}"
        )


def test_smollm2_eviction_holds_the_budget(smollm2_fp16):
    from kvcrush_ov.demo import build_prompt

    budget = 512
    pipe = Pipeline(smollm2_fp16, eviction=CacheEvictionConfig(
        max_cache_size=budget, kvcrush=KVCrushConfig(taper=False)))
    out = pipe.generate(build_prompt(), max_new_tokens=32)
    m, c = out.metrics[0], out.cache
    assert m.num_input_tokens > 3000
    assert m.kv_budget_tokens == budget and m.kvcrush_tokens == 128
    # the default tapers KVCrush's share: 512 of ~3,300 tokens (about 15%) leaves it about 2%
    tapered = Pipeline(smollm2_fp16, eviction=CacheEvictionConfig(max_cache_size=budget,
                                                                  log=True))
    m = tapered.generate(build_prompt(), max_new_tokens=2).metrics[0]  # evicts after token 1
    ratio = budget / m.eviction_log[-1].num_written
    assert 0 < m.kvcrush_tokens == round(0.25 * (ratio - 0.125) / 0.375 * budget) < 20
    assert c.peak_kv_blocks >= m.num_input_tokens // 32
    assert budget // 32 <= c.final_kv_blocks <= budget // 32 + 1
    assert c.final_kv_bytes == c.final_kv_blocks * c.kv_block_bytes
    assert out.text.strip()


def test_demo_runs_and_shrinks_the_cache(smollm2_fp16, capsys):
    from kvcrush_ov.demo import ANSWER, run_demo

    runs = run_demo(max_new_tokens=24)
    printed = capsys.readouterr().out
    full, crush = runs
    assert ANSWER in full.result.text  # SmolLM2 finds the detail with its full cache
    ratio = full.result.cache.final_kv_bytes / crush.result.cache.final_kv_bytes
    assert ratio > 3.0
    assert "KV held" in printed and "TTFT" in printed and "tok/s" in printed
