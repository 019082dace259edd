"""Prepare the next iterations' micro-batches in a background thread while this one trains.

The thread only calls ``next()`` on the same deterministic iterator the training thread would
(dataset reads, collation; no RNG), in the same order, so training sees the same batches bit
for bit; a resume restarts the iterator from ``consumed_samples`` and what was prefetched but
not trained on is simply dropped. On CUDA the tensors are copied into pinned host memory
(``pin_batches``), so the copy to the GPU does not stage through pageable memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

_DONE = object()


def pin_batches(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The same micro-batches in page-locked host memory (fast, asynchronous H2D copies)."""
    return [{k: v.pin_memory() for k, v in mb.items()} for mb in batches]


class Prefetcher(Generic[T]):
    """Iterate ``produce()`` results computed ahead in a daemon thread: ``depth`` items queued,
    plus the one the thread holds while it waits for room.

    ``produce`` raising ``StopIteration`` ends the iteration; any other exception is raised in
    the consumer at the item where it happened, with its traceback. ``close()`` stops the
    thread (also when the consumer stops early, e.g. on preemption).
    """

    def __init__(self, produce: Callable[[], T], depth: int = 1,
                 transform: Callable[[T], T] | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._produce, self._transform = produce, transform
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._produce()
                if self._transform is not None:
                    item = self._transform(item)
            except StopIteration:
                self._put(_DONE)
                return
            except BaseException as e:  # handed to the consumer, raised there
                self._put(e)
                return
            if not self._put(item):
                return

    def _put(self, item: object) -> bool:
        """Block until there is room (or ``close()``); False when closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
