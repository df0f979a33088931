"""Swap the project's CPU kernels into a model written with stock ops (model/decoder.py), so every family gets them.

- `use_cpu_kernels`: a Relax rewrite run before legalization. `R.nn.rms_norm` over the last axis of a [b, s, h]
  tensor (or [b, s, heads, d]: QK-norm, as [b, s * heads, d]) becomes our RMSNorm kernel, and `silu(gate) * up` on
  the two halves of one split (the gated MLP) becomes our activation kernel, named SILU_KERNEL so that
  `cpu_schedules.fuse_gate_up_silu` can fuse it with the gate_up GEMM.
  `gelu_tanh(gate) * up` (Gemma) becomes the same kernel with GELU's exponent (GELU_KERNEL). Shapes the kernels do
  not cover keep the stock ops.
- `replace_attention`: TVM's paged KV cache adds its CPU attention and RoPE kernels to the module; this swaps ours in
  under the same names and symbols (`cpu_attention`).
"""
from __future__ import annotations

import functools

import tvm
from tvm import relax

from . import cpu_activation, cpu_attention, cpu_gemv
from .cpu.amx import has_amx

SILU_KERNEL = "silu_mul_cpu"
GELU_KERNEL = "gelu_tanh_mul_cpu"
_ACTIVATIONS = {"relax.nn.silu": "silu", "relax.nn.gelu_tanh": "gelu_tanh"}  # op -> silu_mul_kernel's `act`
RMS_NORM_KERNEL = "rms_norm_cpu"


def _static_dims(ty) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else -1 for d in ty.shape.values]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod

    def _bound(self, expr):
        """The value a dataflow var is bound to (the expression itself if it is not a var)."""
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            return value if value is not None else expr
        return expr

    def _split_half(self, expr, index: int):
        """The tensor split in two along its last axis whose half `index` `expr` is, else None."""
        item = self._bound(expr)
        if not isinstance(item, relax.TupleGetItem) or item.index != index:
            return None
        split = self._bound(item.tuple_value)
        if not (isinstance(split, relax.Call) and split.op.same_as(tvm.ir.Op.get("relax.split"))):
            return None
        dims = _static_dims(split.args[0].ty)
        if dims is None or len(dims) != 3 or int(split.attrs.axis) not in (-1, 2):
            return None
        sections = split.attrs.indices_or_sections
        if not (isinstance(sections, tvm.tirx.IntImm) and int(sections) == 2):
            return None
        return split.args[0]

    def _rms_norm(self, call: relax.Call):
        x, w = call.args
        dims = _static_dims(x.ty)
        axes = [int(a) for a in call.attrs.axes]
        if dims is None or len(dims) not in (3, 4) or axes not in ([-1], [len(dims) - 1]) or dims[-1] < 0 \
                or not cpu_activation.supported(dims[-1]):
            return None
        kernel = cpu_activation.rms_norm_kernel(dims[-1], float(call.attrs.epsilon), x.ty.dtype)
        gv = self.builder_.add_func(kernel, RMS_NORM_KERNEL)
        if len(dims) == 3:
            return relax.call_tir(gv, [x, w], call.ty)
        # [b, s, heads, d] (QK-norm, per head) as [b, s * heads, d] rows for the kernel
        b, s, h, d = x.ty.shape.values
        rows = relax.ShapeExpr([b, s * h, d])
        y = self.builder_.emit(relax.call_tir(gv, [self.builder_.emit(relax.op.reshape(x, rows)), w],
                                              relax.TensorType(rows.values, x.ty.dtype)))
        return relax.op.reshape(y, x.ty.shape)

    def _silu_mul(self, call: relax.Call):
        act, up = (self._bound(a) for a in call.args)
        kind = _ACTIVATIONS.get(act.op.name) if isinstance(act, relax.Call) and isinstance(act.op, tvm.ir.Op) else None
        if kind is None:
            return None
        gu = self._split_half(act.args[0], 0)
        if gu is None or not gu.same_as(self._split_half(call.args[1], 1)):
            return None
        inter = _static_dims(gu.ty)[2] // 2
        if not cpu_activation.supported(inter):
            return None
        kernel = cpu_activation.silu_mul_kernel(inter, gu.ty.dtype, kind)
        gv = self.builder_.add_func(kernel, SILU_KERNEL if kind == "silu" else GELU_KERNEL)
        return relax.call_tir(gv, [gu], call.ty)

    def visit_call_(self, call: relax.Call):
        call = self.visit_expr_post_order(call)
        new = None
        if call.op.same_as(tvm.ir.Op.get("relax.nn.rms_norm")):
            new = self._rms_norm(call)
        elif call.op.same_as(tvm.ir.Op.get("relax.multiply")):
            new = self._silu_mul(call)
        return call if new is None else new

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="UseCPUKernels")
def use_cpu_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    mod = _Rewriter(mod).transform()
    return relax.transform.DeadCodeElimination()(mod)  # the split / silu the activation kernel replaced


# TVM's paged KV cache adds its CPU kernels under these names (the runtime's) with these symbols.
STOCK_SYMBOLS = {"tir_attention_decode_cpu": "batch_decode_paged_kv_cpu",
                 "tir_attention_prefill_ragged_cpu": "batch_prefill_ragged_kv",
                 "tir_attention_prefill_cpu": "batch_prefill_paged_kv_cpu", "tir_split_rotary": "fused_rope"}


def replace_attention(kv: dict, amx: bool) -> tvm.transform.Pass:
    """`kv`: the KV-cache shape of the model (`num_attention_heads`, `num_key_value_heads`, `head_dim`, `dtype`,
    `rope_theta`, `rope_scaling`, `sliding_window` of the windowed layers), as in the library's metadata. `amx`:
    ragged prefill on AMX tiles."""
    hq, hkv, d, dtype = kv["num_attention_heads"], kv["num_key_value_heads"], kv["head_dim"], kv["dtype"]

    @tvm.transform.module_pass(opt_level=0, name="ReplaceCPUAttention")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        makers = {STOCK_SYMBOLS[name]: make for name, make in cpu_attention.KERNELS.items()}
        makers[STOCK_SYMBOLS["tir_attention_prefill_ragged_cpu"]] = functools.partial(
            cpu_attention.ragged_prefill_kernel, amx=amx)
        kernels = {sym: make(hq, hkv, d, dtype) for sym, make in makers.items()
                   if d % 8 == 0 or make is cpu_attention.decode_kernel}
        if kv.get("sliding_window", -1) > 0:  # the windowed layers' variants
            kernels["batch_decode_paged_kv_cpu_sliding_window"] = cpu_attention.decode_kernel(hq, hkv, d, dtype,
                                                                                              sliding=True)
            if d % 8 == 0:
                kernels["batch_prefill_paged_kv_cpu_sliding_window"] = cpu_attention.paged_prefill_kernel(
                    hq, hkv, d, dtype, window=kv["sliding_window"])
        if "rope_type" not in (kv.get("rope_scaling") or {}):  # other RoPE scalings keep TVM's kernel
            kernels[STOCK_SYMBOLS["tir_split_rotary"]] = cpu_attention.rope_kernel(hq, hkv, d, dtype, kv["rope_theta"])
        for gv, func in list(mod.functions_items()):
            sym = func.attrs.get("global_symbol") if isinstance(func, tvm.tirx.PrimFunc) and func.attrs else None
            if sym in kernels:
                mod[gv] = kernels[sym].with_attr("global_symbol", sym).with_attr(cpu_gemv.KERNEL_ATTR, "cpu_attention")
        return mod

    return run


def cpu_kernel_passes(target: tvm.target.Target, kv: dict | None) -> list:
    """The passes above for a CPU target (attention only when the model's KV-cache shape is known)."""
    passes = [use_cpu_kernels]
    if kv is not None:
        passes.insert(0, replace_attention(kv, has_amx(target)))
    return passes
