"""Helpers shared by the hand-written CPU kernels (`compiler/cpu_*.py`):
  text     TVMScript text -> PrimFunc, and the conventions every kernel text follows
  vecmath  vector math as TIR text: 2^x, a 16-lane horizontal reduction, act(gate) * up
  amx      AMX-BF16: which targets have it, the tile state request, tile configuration, bfloat16 splitting
  tasks    work-stealing task loops (an atomic counter) for kernels whose tasks differ in cost
"""
