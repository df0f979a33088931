"""Parallel loops with work stealing instead of TVM's static split.

TVM's thread pool runs a `T.parallel(n)` loop as one contiguous range of iterations per thread, fixed in advance; on
a shared machine threads do not run at the same speed, and a kernel lasts as long as its slowest thread.
`steal` gives every task a flag: a thread runs its own static range first, claiming each task with an atomic
fetch-and-add, then takes the tasks still unclaimed in the other ranges, from their far end (the far end: each thread
keeps reading the rows it read in the previous kernel, from its own caches). A task's code and results do not depend
on the thread that runs it: outputs are bit-identical to the static split. `steal` is the loop as a `@T.macro`.

TVM 0.27's LLVM backend has no atomic builtin for CPUs (`tirx.atomic_add`: "CPU backend does not support atomic add
yet"), so the fetch-and-add and the atomic load are LLVM IR functions imported with TVM's `pragma_import_llvm`
attribute (the backend links them into the module and inlines them: a `lock xadd`, a plain load).
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

# Kernels over rows (tokens, sequences) run fewer rows than this on the calling thread: waking the pool's threads
# costs more than a decode step's one row.
SERIAL_ROWS = 4

FETCH_ADD = "mlc_atomic_fetch_add_i32"
LOAD = "mlc_atomic_load_i32"
_IR = f"""define i32 @{FETCH_ADD}(ptr %p, i32 %v) {{
  %old = atomicrmw add ptr %p, i32 %v monotonic, align 4
  ret i32 %old
}}
define i32 @{LOAD}(ptr %p) {{
  %v = load atomic i32, ptr %p monotonic, align 4
  ret i32 %v
}}
"""


def _int(like, value: int):
    """`value` as an integer of `like`'s dtype (a buffer: the steal loop's task index type)."""
    return tvm.tirx.IntImm(str(like.dtype), value)


def _claim(flag, like):
    return T.Cast(str(like.dtype), T.call_extern("int32", FETCH_ADD, T.address_of(flag), 1) == 0)


@T.macro
def run_tasks(it, n, flags, done, q, body, args):
    """One thread's share of `steal`: its own tasks from `it` up while it can claim them, then the unclaimed ones
    from the last down; then it marks the loop done. q: the task to try, 1 once scanning down, 1 if claimed."""
    q[0] = it
    q[1] = _int(q, 0)
    while q[0] >= _int(q, 0):
        at = T.bind(q[0])
        down = T.bind(q[1])
        if down == _int(q, 0):
            q[2] = _claim(flags[at], q)
        elif T.call_extern("int32", LOAD, T.address_of(flags[at])) == 0:
            q[2] = _claim(flags[at], q)
        else:
            q[2] = _int(q, 0)
        if q[2] == _int(q, 1):
            task = T.bind(at)
            body(task, *args)
        if down == _int(q, 0) and q[2] == _int(q, 1) and at + _int(q, 1) < n:
            q[0] = at + _int(q, 1)
        elif down == _int(q, 0):
            q[0] = n - _int(q, 1)
            q[1] = _int(q, 1)
        else:
            q[0] = at - _int(q, 1)
    T.evaluate(T.call_extern("int32", FETCH_ADD, T.address_of(done[0]), 1))


def _capacity(capacity, ntasks):
    return ntasks if capacity is None else capacity


@T.macro
def steal(ntasks, body, args, per_thread=None, dtype="int64", capacity=None):
    """`body(task, *args)` (a macro; `args`: a tuple of the buffers and values it takes after the task) once per
    task 0 .. `ntasks` - 1 (of `dtype`), with work stealing. `per_thread(tasks, body, args)`, if given, is a macro
    run once per thread with work instead of `run_tasks(*tasks, body, args)`: it allocates the thread's scratch
    buffers (or sets up its hardware state) and calls `run_tasks(*tasks, body, args + scratch)` itself.
    `capacity`: the flags' buffer size where `ntasks` reads a buffer (TVM hoists allocations to the kernel's start:
    their size may only use parameters and shape variables), an upper bound of `ntasks`."""
    n = T.bind(ntasks)
    flags = T.alloc_buffer((_capacity(capacity, ntasks),), "int32", scope="global")
    for i in range(n):
        flags[i] = 0
    done = T.alloc_buffer((1,), "int32", scope="global")
    done[0] = 0
    with T.attr(0, "pragma_import_llvm", _IR):
        for it in T.parallel(n):
            q = T.alloc_buffer((3,), dtype, scope="global")
            if T.call_extern("int32", LOAD, T.address_of(done[0])) == 0:
                if per_thread is None:  # a Python condition: decided when built
                    run_tasks(it, n, flags, done, q, body, args)
                else:
                    per_thread((it, n, flags, done, q), body, args)
