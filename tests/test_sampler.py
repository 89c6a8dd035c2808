"""Token sampler and stop criteria (pure numpy; expectations computed by hand)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kvcrush_ov.config import GenerationConfig
from kvcrush_ov.engine.sampler import SequenceSampler, sample_batch

EOS = 0
VOCAB = {0: "<eos>", 1: "a", 2: "b", 3: "c", 4: "xS", 5: "TOPy", 6: " ", 7: "d"}


def detok(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def make(prompt: list[int] | None = None, eos: tuple[int, ...] = (EOS,), detokenize=detok,
         **cfg) -> SequenceSampler:
    return SequenceSampler(GenerationConfig(**cfg), prompt or [], eos, detokenize)


def draws(sampler: SequenceSampler, logits: np.ndarray, n: int) -> list[int]:
    return [sampler.sample(logits) for _ in range(n)]


def logits_of(probs: list[float]) -> np.ndarray:
    """Logits [V] float32 whose softmax is ``probs``."""
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


# ---------------------------------------------------------------- greedy and penalty


def test_greedy_picks_argmax_and_lowest_id_on_ties():
    s = make()
    assert s.sample(np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)) == 1
    assert s.sample(np.array([1.0, 5.0, 5.0, -2.0], dtype=np.float32)) == 1


def test_repetition_penalty_divides_positive_logits():
    logits = np.array([0.0, 4.0, 3.0, 0.5], dtype=np.float32)
    assert make(prompt=[1]).sample(logits) == 1  # no penalty: plain argmax
    # id 1 was in the prompt: 4.0 / 2 = 2.0 < 3.0, so id 2 wins.
    assert make(prompt=[1], repetition_penalty=2.0).sample(logits) == 2
    assert logits[1] == 4.0  # the caller's array is left alone


def test_repetition_penalty_multiplies_negative_logits():
    logits = np.array([-1.0, -1.5, -3.0], dtype=np.float32)
    assert make(prompt=[0]).sample(logits) == 0
    # id 0 seen: -1.0 * 2 = -2.0 < -1.5 (dividing would give -0.5 and keep id 0).
    assert make(prompt=[0], repetition_penalty=2.0).sample(logits) == 1


def test_repetition_penalty_counts_generated_ids():
    s = make(repetition_penalty=2.0)
    logits = np.array([4.0, 3.0], dtype=np.float32)
    assert s.sample(logits) == 0
    s.append(7)  # a generated id outside this 2-token logits row is ignored
    assert s.sample(logits) == 0
    s2 = make(repetition_penalty=2.0, ignore_eos=True)
    s2.append(0)  # generated id 0 now penalised: 4 / 2 = 2 < 3
    assert s2.sample(logits) == 1


# ---------------------------------------------------------------- sampling


def test_very_low_temperature_approximates_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    best = int(np.argmax(logits))
    logits[best] += 0.05  # margin 0.05 / 1e-3 = 50 -> others have weight < e^-50
    s = make(do_sample=True, temperature=1e-3, rng_seed=5)
    assert set(draws(s, logits, 200)) == {best}
    hot = make(do_sample=True, temperature=1.0, rng_seed=5)
    assert len(set(draws(hot, logits, 200))) > 1  # the same logits do vary when not cold


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(1)
    for seed in range(20):
        logits = rng.normal(size=5000).astype(np.float32)
        s = make(do_sample=True, top_k=1, temperature=2.0, rng_seed=seed)
        assert s.sample(logits) == int(np.argmax(logits))


def test_full_distribution_frequencies():
    probs = [0.5, 0.25, 0.125, 0.125]
    s = make(do_sample=True, rng_seed=11)
    n = 20000
    counts = Counter(draws(s, logits_of(probs), n))
    for tok, p in enumerate(probs):
        assert counts[tok] / n == pytest.approx(p, abs=0.02)


# probabilities by id: sorted they are 0.4 (id 1), 0.3 (id 3), 0.15 (id 4), 0.1 (id 2), 0.05 (id 0)
NUCLEUS_PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]
NUCLEUS_CASES = [
    # top_p 0.6: cumulative 0.4 < 0.6, 0.7 >= 0.6 -> {1, 3}, renormalised by 0.7
    ({"top_p": 0.6}, {1: 0.4 / 0.7, 3: 0.3 / 0.7}),
    # top_p 0.75: 0.4, 0.7, 0.85 >= 0.75 -> {1, 3, 4}, renormalised by 0.85
    ({"top_p": 0.75}, {1: 0.4 / 0.85, 3: 0.3 / 0.85, 4: 0.15 / 0.85}),
    # top_p 0.8 alone: 0.4, 0.7, 0.85 -> {1, 3, 4}
    ({"top_p": 0.8}, {1: 0.4 / 0.85, 3: 0.3 / 0.85, 4: 0.15 / 0.85}),
    # top_k 3 first renormalises {1, 3, 4} to 0.471, 0.353, 0.176: cumulative 0.824 >= 0.8
    # after two tokens -> {1, 3}
    ({"top_k": 3, "top_p": 0.8}, {1: 0.4 / 0.7, 3: 0.3 / 0.7}),
    # top_k 2 alone -> {1, 3}
    ({"top_k": 2}, {1: 0.4 / 0.7, 3: 0.3 / 0.7}),
]


@pytest.mark.parametrize("cfg,expected", NUCLEUS_CASES,
                         ids=[str(c) for c, _ in NUCLEUS_CASES])
def test_top_p_keeps_exactly_the_nucleus(cfg, expected):
    s = make(do_sample=True, rng_seed=3, **cfg)
    n = 20000
    counts = Counter(draws(s, logits_of(NUCLEUS_PROBS), n))
    assert set(counts) == set(expected)
    for tok, p in expected.items():
        assert counts[tok] / n == pytest.approx(p, abs=0.02)


def test_top_p_on_a_large_flat_vocabulary():
    """A nucleus of ~2000 tokens: larger than the first candidate guess of the fast path."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=8000) * 0.3).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    size = int(np.argmax(np.cumsum(p[order]) >= 0.3)) + 1
    nucleus = set(order[:size].tolist())
    assert 1000 < size < 4000
    s = make(do_sample=True, top_p=0.3, rng_seed=9)
    seen = set(draws(s, logits, 5000))
    assert seen <= nucleus
    assert len(seen) > 1000


def test_same_seed_same_draws_different_seed_different():
    logits = np.zeros(1000, dtype=np.float32)
    a = draws(make(do_sample=True, rng_seed=7), logits, 50)
    b = draws(make(do_sample=True, rng_seed=7), logits, 50)
    c = draws(make(do_sample=True, rng_seed=8), logits, 50)
    assert a == b
    assert a != c
    assert len(set(a)) > 30  # uniform over 1000 ids: draws really vary


# ---------------------------------------------------------------- stop criteria


def test_eos_stops_and_is_excluded():
    s = make(max_new_tokens=10)
    assert s.append(1) is None
    assert s.append(2) is None
    assert s.finish_reason is None
    assert s.append(EOS) == "stop"
    assert s.finish_reason == "stop"
    assert s.output_ids == [1, 2]
    assert s.num_generated == 3
    assert s.output_text() == "ab"
    with pytest.raises(RuntimeError, match="already finished"):
        s.append(1)


def test_any_of_several_eos_ids_stops():
    s = make(eos=(EOS, 7))
    assert s.append(7) == "stop"
    assert s.output_ids == []


def test_ignore_eos_continues():
    s = make(ignore_eos=True, max_new_tokens=3)
    assert s.append(EOS) is None
    assert s.append(EOS) is None
    assert s.append(1) == "length"
    assert s.output_ids == [EOS, EOS, 1]


def test_max_new_tokens_gives_length():
    s = make(max_new_tokens=3)
    assert [s.append(t) for t in (1, 2, 3)] == [None, None, "length"]
    assert s.output_ids == [1, 2, 3]
    assert s.output_text() == "abc"
    assert s.num_generated == 3


def test_eos_at_the_last_allowed_step_is_stop():
    s = make(max_new_tokens=2)
    s.append(1)
    assert s.append(EOS) == "stop"


def test_stop_string_across_two_tokens_is_cut():
    s = make(stop_strings=("STOP",), max_new_tokens=10)
    assert s.append(1) is None  # "a"
    assert s.append(4) is None  # "axS"
    assert s.append(5) == "stop"  # "axSTOPy"
    assert s.output_ids == [1, 4, 5]
    assert s.output_text() == "ax"


def test_stop_string_kept_when_included():
    s = make(stop_strings=("STOP",), include_stop_str_in_output=True)
    for t in (1, 4):
        assert s.append(t) is None
    assert s.append(5) == "stop"
    assert s.output_text() == "axSTOPy"


def test_text_is_cut_at_the_first_of_several_stop_strings():
    s = make(stop_strings=("OPy", "STOP"))
    s.append(4)
    assert s.append(5) == "stop"
    assert s.output_text() == "x"  # "STOP" starts before "OPy"


def test_stop_string_found_late_with_short_decode_windows():
    windows: list[int] = []

    def counting(ids: list[int]) -> str:
        windows.append(len(ids))
        return detok(ids)

    s = make(stop_strings=("STOP",), max_new_tokens=500, detokenize=counting)
    for _ in range(200):
        assert s.append(2) is None
        assert s.append(6) is None
    assert max(windows) <= 2  # incremental: never re-decodes the whole output
    s.append(4)
    assert s.append(5) == "stop"
    assert s.output_text() == "b " * 200 + "x"


BYTES = {1: b"a", 10: b"\xc3", 11: b"\xa9!", 12: b"b"}


def byte_detok(ids: list[int]) -> str:
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_string_inside_a_split_multibyte_character():
    s = make(stop_strings=("é!",), detokenize=byte_detok)
    assert s.append(1) is None
    assert s.append(10) is None  # "a" + half of "é": held back, no match yet
    assert s.append(11) == "stop"
    assert s.output_text() == "a"
    s2 = make(stop_strings=("é!",), include_stop_str_in_output=True, detokenize=byte_detok)
    for t in (1, 10, 11):
        s2.append(t)
    assert s2.output_text() == "aé!"


def test_no_stop_string_no_stop():
    s = make(stop_strings=("zzz",), max_new_tokens=4)
    assert [s.append(t) for t in (4, 5, 4, 5)] == [None, None, None, "length"]
    assert s.output_text() == "xSTOPyxSTOPy"


# ---------------------------------------------------------------- batch


def _batch_samplers() -> list[SequenceSampler]:
    return [
        make(),
        make(prompt=[3, 17], repetition_penalty=1.5),
        make(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, rng_seed=3),
        make(do_sample=True, rng_seed=4),
        make(max_new_tokens=100),
    ]


def test_sample_batch_equals_per_row_sample():
    rng = np.random.default_rng(4)
    batch, single = _batch_samplers(), _batch_samplers()
    for step in range(6):
        logits = (rng.normal(size=(5, 300)) * 2).astype(np.float32)
        if step == 0:
            logits[1] = np.abs(logits[1])
            logits[1, 17] = logits[1].max() + 0.5  # penalised prompt id: 17 loses to another
        got = sample_batch(batch, logits)
        want = [s.sample(logits[i]) for i, s in enumerate(single)]
        assert got == want
        if step == 0:
            assert got[1] != 17
            assert got[0] == int(np.argmax(logits[0]))
        for s, t in zip(batch, got, strict=True):
            s.append(t)
        for s, t in zip(single, want, strict=True):
            s.append(t)


def test_sample_batch_all_greedy_and_shape_check():
    logits = np.array([[0.0, 1.0, 0.5], [2.0, -1.0, 2.0]], dtype=np.float32)
    assert sample_batch([make(), make()], logits) == [1, 0]
    with pytest.raises(ValueError, match="shape"):
        sample_batch([make()], logits)
