"""Parallel loops with work stealing instead of TVM's static split.

TVM's thread pool runs a `T.parallel(n)` loop as one contiguous range of iterations per thread, fixed in advance; on
a shared machine threads do not run at the same speed, and a kernel lasts as long as its slowest thread.
`steal_loop` gives every task a flag: a thread runs its own static range first, claiming each task with an atomic
fetch-and-add, then takes the tasks still unclaimed in the other ranges, from their far end (the far end: each thread
keeps reading the rows it read in the previous kernel, from its own caches). A task's code and results do not depend
on the thread that runs it: outputs are bit-identical to the static split. `steal_loop` / `steal_parallel` write the
loop as text (for the attention kernels, still text); `steal` is the same loop as a `@T.macro` for `@T.prim_func`
kernels.

TVM 0.27's LLVM backend has no atomic builtin for CPUs (`tirx.atomic_add`: "CPU backend does not support atomic add
yet"), so the fetch-and-add and the atomic load are LLVM IR functions imported with TVM's `pragma_import_llvm`
attribute (the backend links them into the module and inlines them: a `lock xadd`, a plain load).
"""
from __future__ import annotations

import textwrap

from tvm.script import tirx as T

from .text import indent

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


def _fetch_add(elem: str, v: int = 1) -> str:
    return f'T.call_extern("int32", "{FETCH_ADD}", T.address_of({elem}), {v})'


def _load(elem: str) -> str:
    return f'T.call_extern("int32", "{LOAD}", T.address_of({elem}))'


def steal_loop(ntasks: str, body: str, setup: str = "", teardown: str = "", task: str = "task",
               name: str = "", dtype: str = "int64", capacity: str = "") -> str:
    """TIR text of a parallel loop over tasks 0 .. `ntasks` - 1 with work stealing. Each task has a flag, claimed by
    the first fetch-and-add on it. A thread's first iteration i runs tasks i, i+1, ... in order while it can claim
    them (its own range of TVM's static split: what it wrote in the kernels before stays in its core's caches), then
    scans all tasks from the last one down and runs those still unclaimed (the slower threads' ranges, from their
    far end); an iteration that completes its scan marks the loop done, and the iterations left skip. `body` runs
    once per task with `task` bound to its index; `setup` / `teardown` once per iteration that has work (per-thread
    state: tile configuration, scratch buffers). `name` suffixes the loop's variables (two loops in one kernel);
    `dtype`: the type of `ntasks` and `task`. `capacity`: the flags' buffer size if `ntasks` reads a buffer (TVM
    hoists allocations to the kernel's start: their size may only use parameters and shape variables), an upper
    bound of ntasks."""
    flags, done, it, q, n = f"flags{name}", f"done{name}", f"it{name}", f"q{name}", f"ntasks{name}"
    one, zero, q0, q1 = f"T.{dtype}(1)", f"T.{dtype}(0)", f"{q}_at", f"{q}_up"
    # q[0]: the task to try (bound as q0); q[1]: 0 going up from the iteration's own task, 1 scanning down (bound
    # as q1); q[2]: 1 if this iteration claimed task q0
    claim = (f"if {q1} == {zero}:\n"
             f"    {q}[2] = T.Cast(\"{dtype}\", {_fetch_add(f'{flags}[{q0}]')} == 0)\n"
             f"elif {_load(f'{flags}[{q0}]')} == 0:\n"
             f"    {q}[2] = T.Cast(\"{dtype}\", {_fetch_add(f'{flags}[{q0}]')} == 0)\n"
             f"else:\n    {q}[2] = {zero}\n")
    step = (f"if {q}[2] == {one}:\n" + indent(f"{task} = T.bind({q0})\n" + body.strip("\n"), 1) + "\n"
            f"if {q1} == {zero} and {q}[2] == {one} and {q0} + {one} < {n}:\n"
            f"    {q}[0] = {q0} + {one}\n"
            f"elif {q1} == {zero}:\n"
            f"    {q}[0] = {n} - {one}\n"
            f"    {q}[1] = {one}\n"
            f"else:\n    {q}[0] = {q0} - {one}\n")
    loop = (f"{q}[0] = {it}\n{q}[1] = {zero}\n"
            f"while {q}[0] >= {zero}:\n"
            f"    {q0} = T.bind({q}[0])\n    {q1} = T.bind({q}[1])\n" + indent(claim + step, 1)
            + f"T.evaluate({_fetch_add(f'{done}[0]')})\n")
    inner = (setup.strip("\n") + "\n" if setup.strip() else "") + loop
    if teardown.strip():
        inner += teardown.strip("\n") + "\n"
    return (f"{n} = T.bind({ntasks})\n"
            f'{flags} = T.alloc_buffer(({capacity or ntasks},), "int32", scope="global")\n'
            f"for i in range({n}):\n    {flags}[i] = 0\n"
            f'{done} = T.alloc_buffer((1,), "int32", scope="global")\n'
            f"{done}[0] = 0\n"
            f'with T.attr(0, "pragma_import_llvm", {_IR!r}):\n'
            f"    for {it} in T.parallel({n}):\n"
            f'        {q} = T.alloc_buffer((3,), "{dtype}", scope="global")\n'
            f"        if {_load(f'{done}[0]')} == 0:\n" + indent(inner, 3))


def steal_parallel(text: str, var: str = "task", name: str = "", dtype: str = "int64", capacity: str = "") -> str:
    """`text` (TVMScript) with each loop `for <var> in T.parallel(<n>):` turned into a `steal_loop` over the same
    tasks and body (the body's allocations stay per task); the k-th such loop's variables are suffixed `name` + k
    from the second one on."""
    head = f"for {var} in T.parallel("
    lines = text.split("\n")
    at = [i for i, line in enumerate(lines) if line.lstrip().startswith(head)]
    if not at:
        raise ValueError(f"no `{head}...` loop in the kernel text")
    for k in range(len(at)):
        i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(head))
        pad = len(lines[i]) - len(lines[i].lstrip())
        ntasks = lines[i].strip()[len(head):-2]
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > pad):
            end += 1
        body = textwrap.dedent("\n".join(lines[i + 1:end]))
        loop = steal_loop(ntasks, body, task=var, name=name + (str(k) if k else ""), dtype=dtype, capacity=capacity)
        lines = lines[:i] + indent(loop, pad // 4).rstrip("\n").split("\n") + lines[end:]
    return "\n".join(lines)


def _claim(flag):
    return T.Cast("int64", T.call_extern("int32", FETCH_ADD, T.address_of(flag), 1) == 0)


@T.macro
def run_tasks(it, n, flags, done, q, body, args):
    """One thread's share of `steal`: its own tasks from `it` up while it can claim them, then the unclaimed ones
    from the last down; then it marks the loop done."""
    q[0] = it
    q[1] = T.int64(0)
    while q[0] >= T.int64(0):
        at = T.bind(q[0])
        down = T.bind(q[1])
        if down == T.int64(0):
            q[2] = _claim(flags[at])
        elif T.call_extern("int32", LOAD, T.address_of(flags[at])) == 0:
            q[2] = _claim(flags[at])
        else:
            q[2] = T.int64(0)
        if q[2] == T.int64(1):
            task = T.bind(at)
            body(task, args)
        if down == T.int64(0) and q[2] == T.int64(1) and at + T.int64(1) < n:
            q[0] = at + T.int64(1)
        elif down == T.int64(0):
            q[0] = n - T.int64(1)
            q[1] = T.int64(1)
        else:
            q[0] = at - T.int64(1)
    T.evaluate(T.call_extern("int32", FETCH_ADD, T.address_of(done[0]), 1))


@T.macro
def steal(ntasks, body, args, per_thread=None):
    """`steal_loop` for `@T.prim_func` kernels: `body(task, args)` (a macro; `args`: a tuple of the buffers it
    needs) once per task 0 .. `ntasks` - 1 (int64), with work stealing. `per_thread(tasks, body, args)`, if given, is
    a macro run once per thread with work instead of `run_tasks(*tasks, body, args)`: it allocates the thread's
    scratch buffers (or sets up its hardware state) and calls `run_tasks(*tasks, body, args + scratch)` itself."""
    n = T.bind(ntasks)
    flags = T.alloc_buffer((ntasks,), "int32", scope="global")
    for i in range(n):
        flags[i] = 0
    done = T.alloc_buffer((1,), "int32", scope="global")
    done[0] = 0
    with T.attr(0, "pragma_import_llvm", _IR):
        for it in T.parallel(n):
            q = T.alloc_buffer((3,), "int64", scope="global")  # task to try; 1 once scanning down; 1 if claimed
            if T.call_extern("int32", LOAD, T.address_of(done[0])) == 0:
                if per_thread is None:  # a Python condition: decided when built
                    run_tasks(it, n, flags, done, q, body, args)
                else:
                    per_thread((it, n, flags, done, q), body, args)
