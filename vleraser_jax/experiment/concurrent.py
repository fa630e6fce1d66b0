"""Independent tasks on a few worker processes, their results handed back in the order the tasks were given.

XLA:CPU does not keep two cores busy through a short method run (compilation, evaluation's small batches and
Python between steps are single-threaded), so two runs at once finish sooner on 2 cores than one after the other
(the demo's ten methods: 537 s in one process, 432 s on two, numbers identical).
Workers are spawned, not forked: a forked JAX runtime is not safe to use.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Sequence


class TaskFailed(RuntimeError):
    """A task raised in its worker; the message names the task (`task`)."""

    def __init__(self, message: str, task: Any = None):
        super().__init__(message)
        self.task = task


def run_in_workers(tasks: Sequence[Any], workers: int, task_fn: Callable[[Any], Any],
                   on_result: Callable[[Any, Any], None], *, initializer: Callable | None = None,
                   initargs: tuple = ()) -> None:
    """Run `task_fn(task)` for every task on `workers` spawned processes, at most `workers` at a time, and call
    `on_result(task, result)` in the main process in the order of `tasks` (a result that finishes early waits
    for the ones before it). `task_fn` and `initializer` must be importable module-level functions.

    After a failure no new task starts; the running ones finish and those before the failed task in order are
    still handed to `on_result`; then TaskFailed names the task (its exception chained)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    context = multiprocessing.get_context("spawn")
    pending: dict[Future, int] = {}
    finished: dict[int, Any] = {}
    failure: tuple[int, BaseException] | None = None
    handed = 0  # tasks [0, handed) went to on_result
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer,
                             initargs=initargs) as pool:
        queue = iter(range(len(tasks)))

        def submit_more() -> None:  # up to `workers` tasks in flight
            for index in queue:
                pending[pool.submit(task_fn, tasks[index])] = index
                if len(pending) == workers:
                    break

        submit_more()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                error = future.exception()
                if error is not None:
                    if failure is None or index < failure[0]:
                        failure = (index, error)
                    continue
                finished[index] = future.result()
            while handed in finished and (failure is None or handed < failure[0]):
                on_result(tasks[handed], finished.pop(handed))
                handed += 1
            if failure is None:
                submit_more()
    if failure is not None:
        index, error = failure
        raise TaskFailed(f"{tasks[index]!r} failed in its worker process: {type(error).__name__}: {error}",
                         tasks[index]) from error
