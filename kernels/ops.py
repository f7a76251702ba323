"""The operators `kernels` registers with torch.library, so that torch.compile traces a LoRA call whole.

Dynamo cannot trace a choice that reads tensor values on the host, nor our Triton launchers; each
such place would split the compiled graph (a graph break) in every LoRA layer. Behind an operator
it records one call instead, with the output shapes from the operator's fake (meta) function, and
AOTAutograd takes the backward from the operator's autograd registration.

    lorafuse::dequantize_4bit   W [N, K] of a 4-bit record: kernels.torch_ops.dequantize, which uses
                                bitsandbytes' kernel only where it gives the spec's bits (a check
                                that reads the code table's values)
    lorafuse::matmul_4bit       a @ W^T or a @ W with W dequantized inside (the torch backend's base
                                product and its input gradient under torch.compile)
    lorafuse::triton_forward    the Triton backend's fused forward, (y [..., N], u [M, r] fp32)
    lorafuse::triton_backward   its fused backward, (dx [..., K], dA [r, K], dB [N, r])

These run only while torch.compile traces (`torch.compiler.is_compiling()`); eager calls keep
their direct paths, which cost less on the host (an operator call adds a dispatch, ~2 us here,
more with torch.library.custom_op, whose per-call aliasing and autograd checks cost ~10 us, which
is why the operators are registered with torch.library.define + impl instead).

A weight record crosses an operator boundary as plain arguments (`flatten`), since operators take
only tensors and numbers, and is rebuilt inside (`unflatten`). `torch.library.opcheck` passes on
each operator (tests/kernels/test_ops.py; the Triton ones on CPU under Triton's interpreter).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .call import LoraCall
from .formats import DenseWeight, Int8Weight, NestedAbsmax, Quant4bitWeight


def _register(name: str, fake: Callable) -> Callable:
    """Register the decorated function as `lorafuse::<name>` (schema from its annotations), with
    `fake` as its fake implementation; returns the operator (torch.ops.lorafuse.<name>.default)."""
    def register(fn: Callable):
        qualname = f"lorafuse::{name}"
        torch.library.define(qualname, torch.library.infer_schema(fn, mutates_args=()))
        torch.library.impl(qualname, "default")(fn)
        torch.library.register_fake(qualname)(fake)
        return getattr(torch.ops.lorafuse, name).default
    return register


# ---------------------------------------------------------------------------------------------
# A weight record as operator arguments: (format, its tensors, [N, K, its integers], quant type, dtype)
# ---------------------------------------------------------------------------------------------

def flatten(weight) -> tuple[str, list[Optional[Tensor]], list[int], str, torch.dtype]:
    """The record's tensors and numbers. Double quantization's offset travels as a 0-d tensor (as
    bitsandbytes keeps it), so that nothing is read on the host."""
    n, k = weight.shape
    if isinstance(weight, DenseWeight):
        return "dense", [weight.weight], [n, k], "", weight.weight.dtype
    if isinstance(weight, Int8Weight):
        return "int8", [weight.CB, weight.SCB], [n, k], "", torch.float32
    nest = weight.nested
    tensors = [weight.packed_bytes, weight.absmax, weight.code]
    ints = [n, k, weight.blocksize]
    if nest is not None:
        offset = nest.offset
        if not isinstance(offset, Tensor):  # a record built by hand with a float offset
            offset = torch.full((), offset, dtype=torch.float32, device=weight.device)
        tensors += [nest.code, nest.absmax, offset]
        ints.append(nest.blocksize)
    return "4bit", tensors, ints, weight.quant_type, weight.dtype


def unflatten(fmt: str, tensors: list[Optional[Tensor]], ints: list[int], quant_type: str, dtype: torch.dtype):
    """The record `flatten` took apart."""
    if fmt == "dense":
        return DenseWeight(tensors[0])
    if fmt == "int8":
        return Int8Weight(CB=tensors[0], SCB=tensors[1])
    nested = None
    if len(tensors) > 3:
        nested = NestedAbsmax(code=tensors[3], absmax=tensors[4], blocksize=ints[3], offset=tensors[5])
    return Quant4bitWeight(packed=tensors[0], absmax=tensors[1], code=tensors[2], blocksize=ints[2],
                           shape=(ints[0], ints[1]), quant_type=quant_type, dtype=dtype, nested=nested)


# ---------------------------------------------------------------------------------------------
# 4-bit weights: the torch backend under torch.compile
# ---------------------------------------------------------------------------------------------

def _dequantize_4bit_fake(fmt, tensors, ints, quant_type, dtype):
    return tensors[0].new_empty(ints[:2], dtype=dtype)  # [N, K]


@_register("dequantize_4bit", _dequantize_4bit_fake)
def _dequantize_4bit(fmt: str, tensors: list[Optional[Tensor]], ints: list[int], quant_type: str,
                     dtype: torch.dtype) -> Tensor:
    from .torch_ops import dequantize

    w = dequantize(unflatten(fmt, tensors, ints, quant_type, dtype))  # [N, K] dtype
    return w.clone() if w._base is not None else w  # an operator's output may not alias an input


def _matmul_4bit_fake(a, transpose, bias, u, up, scaling, fmt, tensors, ints, quant_type, dtype):
    n, k = ints[:2]
    return a.new_empty((*a.shape[:-1], n if transpose else k))


@_register("matmul_4bit", _matmul_4bit_fake)
def _matmul_4bit(a: Tensor, transpose: bool, bias: Optional[Tensor], u: Optional[Tensor], up: Optional[Tensor],
                 scaling: float, fmt: str, tensors: list[Optional[Tensor]], ints: list[int], quant_type: str,
                 dtype: torch.dtype) -> Tensor:
    from .torch_ops import dequantize

    w = dequantize(unflatten(fmt, tensors, ints, quant_type, dtype), a.dtype)  # [N, K] a.dtype
    a2 = a.reshape(-1, a.shape[-1])  # [M, K] (transpose) or [M, N]
    w = w.t() if transpose else w
    out = a2.mm(w) if bias is None else torch.addmm(bias, a2, w)  # [M, N] or [M, K]
    if u is not None:
        out.addmm_(u.reshape(-1, u.shape[-1]), up, alpha=scaling)  # + scaling * u [M, r] @ up [r, out]
    return out.view(*a.shape[:-1], out.shape[-1])


def dequantize_4bit(weight: Quant4bitWeight) -> Tensor:
    """W [N, K] in weight.dtype through `lorafuse::dequantize_4bit` (bit for bit kernels.dequantize)."""
    return _dequantize_4bit(*flatten(weight))


def matmul_4bit(a: Tensor, weight: Quant4bitWeight, transpose: bool, bias: Optional[Tensor],
                u: Optional[Tensor], up: Optional[Tensor], scaling: float) -> Tensor:
    """a @ W^T [..., N] (transpose; a [..., K]) or a @ W [..., K] (a [..., N]), + bias (in a.dtype),
    + scaling * u @ up (u [..., r], up [r, N or K], both in a.dtype), with W dequantized to a.dtype
    inside `lorafuse::matmul_4bit`.

    W [N, K] is then never a value of the compiled graph, which therefore cannot keep it from
    forward to backward (with a separate dequantization op, AOTAutograd merges the forward's and
    the backward's calls into one and saves W). The u @ up term is accumulated into the product
    in place by the BLAS (one read and write of the output; Inductor's fused add of a separate
    product reads two [M, N] tensors and the product writes one more).

    No default values: it runs inside autograd.Functions, and under torch.compile(dynamic=True)
    Dynamo turns a float it reads from a named place (a default, a module constant) into a graph
    input that it then fails to pass into the Function's subgraph (torch 2.13: "AssertionError:
    lift_tracked_freevar_to_input should not be called on root SubgraphTracer"); a literal at the
    call site stays a constant."""
    return _matmul_4bit(a, transpose, bias, u, up, scaling, *flatten(weight))


# ---------------------------------------------------------------------------------------------
# The Triton backend under torch.compile
# ---------------------------------------------------------------------------------------------
# Operators have no optional outputs: a missing u, dx, dA or dB comes back as an empty tensor.

def _launch():
    from .triton import launch

    return launch


def _triton_forward_fake(x, A, B, bias, seed, fmt, tensors, ints, quant_type, dtype, scaling, dropout_p):
    n, k = ints[:2]
    m = x.numel() // k
    r = 0 if A is None else A.shape[0]
    return x.new_empty((*x.shape[:-1], n)), x.new_empty((m, r), dtype=torch.float32)


@_register("triton_forward", _triton_forward_fake)
def _triton_forward(x: Tensor, A: Optional[Tensor], B: Optional[Tensor], bias: Optional[Tensor],
                    seed: Optional[Tensor], fmt: str, tensors: list[Optional[Tensor]], ints: list[int],
                    quant_type: str, dtype: torch.dtype, scaling: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    weight = unflatten(fmt, tensors, ints, quant_type, dtype)
    n, k = weight.shape
    call = LoraCall(x, weight, bias, A, B, scaling, dropout_p, None, n, k)
    y, u = _launch().forward(call, seed)  # [..., N] x.dtype, [M, r] fp32 or None
    return y, (x.new_empty((x.numel() // k, 0), dtype=torch.float32) if u is None else u)


def _triton_backward_fake(g, x, u, A, B, seed, fmt, tensors, ints, quant_type, dtype, scaling, dropout_p,
                          needs_dx):
    r = 0 if A is None else A.shape[0]
    dx = x.new_empty(x.shape if needs_dx else (0,))
    if not r:
        return dx, x.new_empty(0), x.new_empty(0)
    return dx, A.new_empty(A.shape), B.new_empty(B.shape)


@_register("triton_backward", _triton_backward_fake)
def _triton_backward(g: Tensor, x: Tensor, u: Tensor, A: Optional[Tensor], B: Optional[Tensor],
                     seed: Optional[Tensor], fmt: str, tensors: list[Optional[Tensor]], ints: list[int],
                     quant_type: str, dtype: torch.dtype, scaling: float, dropout_p: float,
                     needs_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    weight = unflatten(fmt, tensors, ints, quant_type, dtype)
    dx, dA, dB = _launch().backward(g, x, None if A is None else u, weight, A, B, scaling, dropout_p, seed,
                                    needs_dx=needs_dx)
    empty = x.new_empty(0)
    return (empty if dx is None else dx), (empty if dA is None else dA), (empty if dB is None else dB)


def _setup_triton(ctx, inputs, output) -> None:
    x, A, B, bias, seed, fmt, tensors, ints, quant_type, dtype, scaling, dropout_p = inputs
    ctx.save_for_backward(x, output[1], A, B, seed, *tensors)
    ctx.meta = (fmt, len(tensors), ints, quant_type, dtype, scaling, dropout_p)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _backward_triton(ctx, g: Tensor, _g_u):
    """The chain rule of kernels/autograd.py (LoraFunction), through `lorafuse::triton_backward`."""
    x, u, A, B, seed, *tensors = ctx.saved_tensors
    fmt, _, ints, quant_type, dtype, scaling, dropout_p = ctx.meta
    needs_dx, needs_dA, needs_dB, needs_db = ctx.needs_input_grad[:4]
    g = g.contiguous()  # [..., N]
    dx = dA = dB = db = None
    if needs_dx or needs_dA or needs_dB:
        dx, dA, dB = _triton_backward(g, x, u, A, B, seed, fmt, tensors, ints, quant_type, dtype, scaling,
                                      dropout_p, needs_dx)
    if needs_db:
        db = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)  # [N]: nn.Linear's bias gradient
    # one entry per input, a list for the list of weight tensors (frozen: no gradient)
    return ((dx if needs_dx else None), (dA if needs_dA else None), (dB if needs_dB else None), db,
            None, None, [None] * ctx.meta[1], None, None, None, None, None)


torch.library.register_autograd("lorafuse::triton_forward", _backward_triton, setup_context=_setup_triton)


def triton_lora(call: LoraCall, seed: Optional[Tensor]) -> Tensor:
    """y [..., N] of a validated call on the Triton kernels, through `lorafuse::triton_forward`
    (autograd through `lorafuse::triton_backward`). seed: the int64 [1] Philox seed (dropout)."""
    y, _ = torch.ops.lorafuse.triton_forward.default(call.x, call.A, call.B, call.bias, seed, *flatten(call.weight),
                                                     call.scaling, call.dropout_p)
    return y
