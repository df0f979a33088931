"""Work-stealing parallel loops (compiler/cpu/tasks.py, `steal`): every task runs exactly once, whatever the task
count, and a thread held up by a slow task has its remaining tasks taken by the others."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # as mlc_llm.serve.runner (TVM's default: 1 here)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402

from tvm.script import tirx as T  # noqa: E402

from mlc_llm.compiler.cpu.tasks import FETCH_ADD, LOAD, run_tasks, steal  # noqa: E402


# Each task counts its runs atomically and records the parallel iteration that ran it (handed to the tasks by a
# `per_thread` macro). Task `slow` waits until every other task has run (an atomic count, capped at a few hundred
# million loads in case no other thread exists), so a second thread in the pool must take all of them, however the
# OS schedules the threads.
@T.macro
def record(task, runs, owner, others_done, slow, n, it):
    T.evaluate(T.call_extern("int32", FETCH_ADD, T.address_of(runs[task]), 1))
    owner[task] = T.Cast("int32", it)
    if task == T.Cast("int64", slow):
        waited = T.alloc_buffer((1,), "int32", scope="local")
        waited[0] = 0
        while T.call_extern("int32", LOAD, T.address_of(others_done[0])) < T.Cast("int32", n) - 1 and \
                waited[0] < 300000000:
            waited[0] = waited[0] + 1
    else:
        T.evaluate(T.call_extern("int32", FETCH_ADD, T.address_of(others_done[0]), 1))


@T.macro
def with_iteration(tasks, body, args):
    run_tasks(*tasks, body, args + (tasks[0],))


@T.prim_func
def _kernel(var_runs: T.handle, var_owner: T.handle, others_done: T.Buffer((1,), "int32"), slow: T.int32):
    n = T.int64()
    runs = T.match_buffer(var_runs, (n,), "int32")
    owner = T.match_buffer(var_owner, (n,), "int32")
    steal(n, record, (runs, owner, others_done, slow, n), per_thread=with_iteration)


@pytest.fixture(scope="module")
def kernel():
    func = _kernel.with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target.from_device(tvm.cpu()))["main"]


def _run(kernel, n: int, slow: int = -1):
    dev = tvm.cpu()
    runs = tvm.runtime.tensor(np.zeros(n, np.int32), dev)
    owner = tvm.runtime.tensor(np.full(n, -1, np.int32), dev)
    kernel(runs, owner, tvm.runtime.tensor(np.zeros(1, np.int32), dev), slow)
    return runs.numpy(), owner.numpy()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 100, 1000])
def test_every_task_runs_once(kernel, n):
    for _ in range(20):  # races, if any, would not show on every call
        runs, owner = _run(kernel, n)
        np.testing.assert_array_equal(runs, np.ones(n, np.int32))
        assert (owner >= 0).all() and (owner < max(n, 1)).all()


def test_a_held_up_thread_loses_its_tasks(kernel):
    n = 64
    runs, owner = _run(kernel, n, slow=0)
    np.testing.assert_array_equal(runs, np.ones(n, np.int32))
    assert owner[0] == 0  # the first iteration claims task 0 first
    if (owner[1:] == 0).all():
        pytest.skip("one thread in TVM's pool: nothing to steal")
    # TVM's static split would leave tasks 1 .. n/threads - 1 to the held-up thread; the others take them all
    assert (owner[1:] != 0).all(), owner
