"""Files written by threads while the main thread predicts the next batch.

Encoding a PNG overlay costs more host time than a GPU spends refining the image (benchmarks/bench_output_writing.py),
so ``predict`` hands its writes to a small thread pool. PNG and zlib encoders release the GIL, so the threads run in
parallel. Each write is still atomic (``utils.io.atomic_write``); a failed write is raised by the next ``wait``, and
the report that lists the files is written only after ``wait(0)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ultrarefiner.utils.cores import usable_cores

__all__ = ["BackgroundWrites", "default_writers"]


def default_writers() -> int:
    """Writer threads: one per core the process may use, at most 8 (past that the main thread is the limit)."""
    return max(1, min(8, usable_cores()))


class BackgroundWrites:
    def __init__(self, workers: int | None = None, backlog: int | None = None, round_size: int = 1) -> None:
        """
        A bounded queue of file writes run by ``workers`` threads.

        Arguments:
          workers: threads; None: ``default_writers()``. 0 writes in the caller's thread (no pool).
          backlog: the most writes left pending by ``wait()`` (each holds its arrays in memory); None: two rounds'
            writes or two per thread, whichever is more.
          round_size: writes submitted between two ``wait()`` calls (a batch's). A backlog of two rounds lets the
            writes of one batch run while the next is predicted: a smaller one would stall the caller on them.
        """
        self.workers = default_writers() if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.backlog = max(2 * self.workers, 2 * round_size) if backlog is None else int(backlog)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def submit(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``write(*args, **kwargs)`` on a writer thread (at once, here, when ``workers`` is 0; its result is
        then returned by the next ``wait`` all the same)."""
        if self.workers == 0:
            done: Future = Future()
            done.set_result(write(*args, **kwargs))
            self._pending.append(done)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="writes")
        self._pending.append(self._pool.submit(write, *args, **kwargs))

    def wait(self, keep: int | None = None) -> list[Any]:
        """Block until at most ``keep`` writes are pending (None: ``backlog``; 0: all done, threads released);
        returns what the finished writes returned, oldest first. Raises the first failed write's exception; the
        writes submitted after it still run."""
        keep = self.backlog if keep is None else keep
        done = []
        try:
            while len(self._pending) > keep:
                done.append(self._pending.popleft().result())
        finally:
            if keep == 0:
                self.close()
        return done

    def close(self) -> None:
        """Wait for every submitted write and release the threads, without raising their errors (``wait(0)``
        raises them); a later ``submit`` starts a new pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)
