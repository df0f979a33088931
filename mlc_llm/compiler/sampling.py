"""Token sampling inside the model library, so that on a GPU only token ids (and their logprobs) cross to the host.

Two Relax functions over a batch of logits rows, added to every compiled model:

    sample_greedy(logits f32[B, V])                                   -> (tokens i32[B], logprobs f32[B])
    sample_top_p(logits f32[B, V], temperature f32[B], top_p f32[B], uniform f32[B]) -> (tokens, logprobs)

Stock Relax ops only (softmax, argsort, cumsum, multinomial_from_uniform, argmax); the target's dispatch passes pick
the kernels (GPU sort / scan / sampling on CUDA). The rule is the host sampler's (serve/sampler.py): temperature, then
the smallest set of most likely tokens whose probability reaches top_p, then the first token whose cumulative
probability exceeds `uniform` × the kept total. A row with temperature <= 0 takes the argmax. logprobs are of the
model's own distribution (log-softmax of the raw logits), as the host sampler returns them.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.op import (argmax, argsort, astype, cumsum, divide, expand_dims, gather_elements, greater,
                          greater_equal, less, logical_or, minimum, multinomial_from_uniform, squeeze, subtract,
                          sum as rsum, where, zeros_like)
from tvm.relax.op.nn import log_softmax, softmax

FUNCTIONS = ("sample_greedy", "sample_top_p")


def _logprob_of(bb: relax.BlockBuilder, logits: relax.Expr, tokens: relax.Expr) -> relax.Expr:
    """log_softmax(logits)[row, token] (a hand-fused log-sum-exp trips dlight's GEMV rule; log_softmax is a pattern
    its GeneralReduction rule schedules)."""
    lp = bb.emit(log_softmax(logits, axis=-1))
    return bb.emit(squeeze(gather_elements(lp, expand_dims(astype(tokens, "int64"), -1), axis=1), axis=[1]))


def add_sampling_functions(mod: tvm.IRModule, vocab_size: int) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    batch = tirx.Var("batch_size", "int64")
    vocab = vocab_size

    logits = relax.Var("logits", relax.TensorType((batch, vocab), "float32"))
    with bb.function("sample_greedy", [logits]):
        with bb.dataflow():
            tokens = bb.emit(astype(argmax(logits, axis=-1), "int32"))
            out = bb.emit_output(relax.Tuple([tokens, _logprob_of(bb, logits, tokens)]))
        bb.emit_func_output(out)

    logits = relax.Var("logits", relax.TensorType((batch, vocab), "float32"))
    temperature = relax.Var("temperature", relax.TensorType((batch,), "float32"))
    top_p = relax.Var("top_p", relax.TensorType((batch,), "float32"))
    uniform = relax.Var("uniform", relax.TensorType((batch,), "float32"))
    with bb.function("sample_top_p", [logits, temperature, top_p, uniform]):
        with bb.dataflow():
            sampled_rows = bb.emit(greater(temperature, relax.const(0.0, "float32")))
            t = bb.emit(where(sampled_rows, temperature, relax.const(1.0, "float32")))
            probs = bb.emit(softmax(divide(logits, expand_dims(t, -1)), axis=-1))
            # rows with top_p < 1 draw over the tokens sorted by probability, the others in vocabulary order (as
            # the host sampler does, so a seeded request draws the same token on either)
            whole = bb.emit(expand_dims(greater_equal(top_p, relax.const(1.0, "float32")), -1))
            vocab_order = bb.emit(expand_dims(relax.op.arange(vocab, dtype="int64"), 0))
            order = bb.emit(where(whole, vocab_order, argsort(probs, axis=-1, descending=True, dtype="int64")))
            sorted_p = bb.emit(gather_elements(probs, order, axis=1))
            # keep a token while the probability before it is below top_p: the smallest set reaching top_p
            before = bb.emit(subtract(cumsum(sorted_p, axis=1), sorted_p))
            keep = bb.emit(logical_or(less(before, expand_dims(top_p, -1)), whole))
            kept = bb.emit(where(keep, sorted_p, zeros_like(sorted_p)))
            kept = bb.emit(divide(kept, expand_dims(rsum(kept, axis=-1), -1)))
            rows = bb.emit(relax.op.arange(relax.prim_value(batch), dtype="int64"))
            pos = bb.emit(multinomial_from_uniform(kept, expand_dims(uniform, -1), expand_dims(rows, -1),
                                                   dtype="int64"))
            # a uniform above the kept total's float32 rounding must not fall past the kept tokens
            last = bb.emit(subtract(rsum(astype(keep, "int64"), axis=-1, keepdims=True), relax.const(1, "int64")))
            pos = bb.emit(minimum(pos, last))
            drawn = bb.emit(squeeze(gather_elements(order, pos, axis=1), axis=[1]))
            tokens = bb.emit(astype(where(sampled_rows, drawn, argmax(logits, axis=-1)), "int32"))
            out = bb.emit_output(relax.Tuple([tokens, _logprob_of(bb, logits, tokens)]))
        bb.emit_func_output(out)
    return bb.get()
