"""Tasks on spawned worker processes: results handed back in task order, a failure named and the rest kept."""

from __future__ import annotations

import os
import time

import pytest

from vleraser_jax.experiment.concurrent import TaskFailed, run_in_workers


def _slow_square(x: int) -> tuple[int, int]:
    time.sleep(0.4 if x == 0 else 0.0)  # the first task finishes last
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x, os.getpid()


def test_results_come_back_in_task_order_from_several_processes():
    got = []
    run_in_workers([0, 1, 2, 4], 2, _slow_square, lambda task, result: got.append((task, result)))
    assert [task for task, _ in got] == [0, 1, 2, 4]
    assert [square for _, (square, _) in got] == [0, 1, 4, 16]
    assert len({pid for _, (_, pid) in got}) == 2 and os.getpid() not in {pid for _, (_, pid) in got}


def test_a_failure_names_its_task_and_keeps_the_results_before_it():
    got = []
    with pytest.raises(TaskFailed, match=r"^3 failed in its worker process: ValueError: three is not allowed") as e:
        run_in_workers([1, 2, 3, 4, 5, 6], 2, _slow_square, lambda task, result: got.append(task))
    assert e.value.task == 3 and isinstance(e.value.__cause__, ValueError)
    assert got == [1, 2]  # 4 may have finished beside 3, but it comes after the failure; 5 and 6 never start


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers"):
        run_in_workers([1], 0, _slow_square, lambda *_: None)
