"""Every policy of the shared matrix keeps the same positions as the numpy implementation did
before the selection kernels moved to C++ (kvcrush_ov._core).

tests/data/selection_digests.json holds, per (policy, case), a digest of the keep masks of every
budget of :func:`test_eviction_policies.budgets`, computed with the numpy code of commit 60e60e5
(the last one before the port). The inputs come from numpy's seeded Generator: should a numpy
release ever change its random streams, regenerate the file from a commit known to be right
(``python tests/test_selection_golden.py > tests/data/selection_digests.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_eviction_policies import CASES, POLICY_MATRIX, budgets, make_inputs

from kvcrush_ov.eviction.base import EvictionInputs

DIGESTS = Path(__file__).parent / "data" / "selection_digests.json"


def tied_inputs(seed: int, ragged: bool) -> EvictionInputs:
    """3 layers x 4 heads of 96 candidates (ragged: each head drops ~15%), scores in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    scores, positions = [], []
    for _ in range(3):
        rows = [np.flatnonzero(rng.random(96) > 0.15) if ragged else np.arange(96)
                for _ in range(4)]
        positions.append(rows)
        scores.append([rng.integers(0, 3, size=len(p)).astype(np.float32) for p in rows])
    return EvictionInputs.from_lists(scores, positions, block_size=8)


INPUTS = [(f"{k}{s}", lambda k=k, s=s: make_inputs(k, s)) for k, s in CASES]
INPUTS += [(f"tied{s}-{r}", lambda s=s, r=r: tied_inputs(s, r))
           for s in (10, 11) for r in (False, True)]


def digest(policy_name: str, factory, case) -> str:
    inputs = case()
    h = hashlib.sha256()
    for num_keep in budgets(inputs):
        keep = factory().select(inputs, num_keep, np.random.default_rng(7))
        h.update(np.packbits(keep).tobytes())
        h.update(str(keep.shape).encode())
    return h.hexdigest()[:16]


# the matrix lines that existed before the port (lines added later, e.g. kvzip-heads or kvzap,
# have no pre-port digests: the policy matrix's own invariants cover them)
PORTED = [(n, f) for n, f in POLICY_MATRIX
          if any(f"{n}|{case}" in json.loads(DIGESTS.read_text()) for case, _ in INPUTS)]


def test_only_the_lines_added_after_the_port_lack_digests() -> None:
    assert {n for n, _ in POLICY_MATRIX} - {n for n, _ in PORTED} == {"kvzip-heads", "kvzap",
                                                                    "kvcrush[kvzap]"}


@pytest.mark.parametrize(("name", "factory"), PORTED, ids=[n for n, _ in PORTED])
def test_same_kept_positions_as_before_the_port(name: str, factory) -> None:
    want = json.loads(DIGESTS.read_text())
    got = {f"{name}|{case}": digest(name, factory, make) for case, make in INPUTS}
    wrong = sorted(k for k, v in got.items() if k in want and want[k] != v)
    assert not wrong, wrong


if __name__ == "__main__":
    print(json.dumps({f"{n}|{c}": digest(n, f, m) for n, f in POLICY_MATRIX for c, m in INPUTS},
                     indent=0, sort_keys=True))
