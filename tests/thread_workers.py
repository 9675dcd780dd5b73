"""Data-parallel workers as threads of one process, a stand-in for ``mpiexec -n N``.

Each worker runs ``work(rank)`` in its own thread; the collectives are hooks that meet at a
barrier, combine every worker's array, and meet again before the slots are reused, as
MPI's collectives do. An error in one worker aborts the barrier (the others stop waiting)
and is raised in the calling thread.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable
from typing import Any


#: Seconds a worker waits at a collective, or the whole run lasts, before the test fails:
#: a worker that calls one collective too many (or too few) must fail the test, not hang it.
TIMEOUT = 120


class ThreadWorkers:
    def __init__(self, size: int):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)

    def collective(self, rank: int, combine: Callable[[list], Any]) -> Callable[[Any], Any]:
        """Worker ``rank``'s hook: ``x -> combine(every worker's x, by rank)``."""

        def exchange(x):
            self.slots[rank] = x
            self.barrier.wait()
            out = combine(list(self.slots))
            self.barrier.wait()  # every worker has read the slots before they are reused
            return out

        return exchange

    def allreduce(self, rank: int, op: Callable[[Any, Any], Any] = operator.add) -> Callable[[Any], Any]:
        """The all-reduce hook of worker ``rank``: a sum, or ``op`` (e.g. ``xp.maximum``)."""
        return self.collective(rank, lambda xs: functools.reduce(op, xs))

    def broadcast(self, rank: int) -> Callable[[Any], Any]:
        """The broadcast hook of worker ``rank``: rank 0's array, a copy on every worker."""
        return self.collective(rank, lambda xs: xs[0].copy())

    def run(self, work: Callable[[int], Any]) -> list:
        """``work(rank)`` on every worker at once; the results by rank."""
        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = work(rank)
            except Exception as exc:  # surfaces in the calling thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,), daemon=True) for rank in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
            if t.is_alive():
                self.barrier.abort()
                raise TimeoutError(f"a worker was still running after {TIMEOUT} s: the workers' collectives "
                                   "do not match (one called more of them than the others)")
        if errors:
            raise errors[0]
        return results
