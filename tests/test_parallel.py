"""The C++ core's parallel loops (cpp/include/kvcrush/parallel.hpp): every item runs once, on a
pool of workers reused between loops; a worker's exception reaches the caller and leaves the
pool usable; a loop inside a loop runs on the calling thread (no deadlock, no pool of pools)."""

from __future__ import annotations

import pytest

from kvcrush_ov import _core

N = 4096  # with work_per_item = 1 << 16: one thread per item up to the cores there are


def _expected(n: int) -> int:
    return n * (n - 1) // 2


def test_every_item_once_over_many_loops() -> None:
    for _ in range(200):  # the same workers serve every loop
        total, threads = _core.parallel_check(N, 1 << 16)
        assert total == _expected(N)
        assert 1 <= threads <= _core.available_cores()
    total, threads = _core.parallel_check(N, 1)  # too little work to share: one thread
    assert (total, threads) == (_expected(N), 1)


@pytest.mark.skipif(_core.available_cores() < 2, reason="needs two cores to run in parallel")
def test_large_loops_use_several_threads() -> None:
    # item 0 waits for a second thread (meet): a worker that never ran would fail this
    total, used = _core.parallel_check(N, 1 << 16, meet=True)
    assert total == _expected(N) and used >= 2


def test_an_items_exception_reaches_the_caller_and_the_pool_stays_usable() -> None:
    for fail_at in (0, 1, N // 2, N - 1):
        with pytest.raises(RuntimeError, match=f"item {fail_at}"):
            _core.parallel_check(N, 1 << 16, fail_at=fail_at)
        assert _core.parallel_check(N, 1 << 16)[0] == _expected(N)


def test_nested_loops_run_inline() -> None:
    n = 300
    total, _ = _core.parallel_check(n, 1 << 16, nested=True)
    assert total == n * _expected(n)
