"""The background data prefetch yields what the synchronous path yields, in order, and ends,
fails and stops like it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_latentcot.data.prefetch import Prefetcher


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield [{"tokens": torch.randint(0, 100, (2, 8), generator=g)}]


def test_prefetched_batches_equal_the_synchronous_ones():
    sync = list(_batches(7))
    source = _batches(7)
    got = list(Prefetcher(lambda: next(source), depth=2))
    assert len(got) == 7
    for a, b in zip(got, sync):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])


def test_it_reads_ahead_while_the_consumer_works():
    """The producer runs in another thread and is one item ahead after the first is taken."""
    threads, count = set(), [0]

    def produce() -> int:
        threads.add(threading.get_ident())
        count[0] += 1
        return count[0]

    fetch = Prefetcher(produce, depth=1)
    assert next(fetch) == 1
    deadline = time.monotonic() + 5
    while count[0] < 3 and time.monotonic() < deadline:  # item 2 queued, item 3 waiting
        time.sleep(0.01)
    assert count[0] == 3 and threading.get_ident() not in threads
    assert next(fetch) == 2
    fetch.close()


def test_errors_arrive_at_their_item_and_close_stops_the_thread():
    items = iter([1, 2])

    def produce() -> int:
        try:
            return next(items)
        except StopIteration:
            raise ValueError("bad sample 3") from None

    fetch = Prefetcher(produce)
    assert [next(fetch), next(fetch)] == [1, 2]
    with pytest.raises(ValueError, match="bad sample 3"):
        next(fetch)
    with pytest.raises(ValueError, match="bad sample 3"):  # and again, not a hang
        next(fetch)
    endless = Prefetcher(lambda: 0, depth=1)
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(lambda: 0, depth=0)


def test_pinned_copies_are_equal():
    from megatron_latentcot.data.prefetch import pin_batches

    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    batch = next(_batches(1))
    pinned = pin_batches(batch)
    assert pinned[0]["tokens"].is_pinned() and torch.equal(pinned[0]["tokens"], batch[0]["tokens"])
