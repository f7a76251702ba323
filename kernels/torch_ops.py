"""The torch backend: peft's `lora.Linear.forward` on PyTorch ops, with its bits, made fast.

    y = base(x);  xl = dropout(x.to(A.dtype));  y = (y + F.linear(F.linear(xl, A), B) * s).to(x.dtype)

The dropout is peft's own call (`F.dropout` on the same tensor, from torch's generator, in the
same call order), every product is the op peft's graph runs, and backward produces peft's
gradients with the same roundings, so from the same adapter and torch.manual_seed the outputs,
masks and gradients equal peft's bit for bit (tests/kernels/test_peft_dropout.py). With an
explicit seed the mask is instead the spec's Philox one (`reference.dropout_mask`, what the Triton
kernels draw).

What makes it fast, each tested equal to the spec (tests/kernels/test_torch_ops.py):
- `dequantize` runs bitsandbytes' own 4-bit kernel (one call instead of the spec's full-size
  temporaries, ~30x faster on CPU at 1024 x 1024) whenever its result equals the spec's, with its
  arguments built once per (frozen) record;
- a quantized base runs through `QuantizedLoraFunction`, which saves nothing [N, K]-sized (plain
  autograd would save the dequantized W) and dequantizes again in backward, as bitsandbytes'
  MatMul4Bit does; peft's defensive `result.clone()` of the base output is skipped;
- the LoRA branch is one autograd node (`LoraBranchFunction`, or inside `QuantizedLoraFunction`)
  instead of peft's four, with the LoRA term added in place;
- a power-of-two `scaling` (peft's usual alpha = r or 2r), which commutes exactly with every
  rounding, rides in the BLAS alpha of the up-projection (forward) and of g @ B, g^T @ u (backward)
  instead of an [M, N] multiplication.
The nodes are recorded so that autograd adds each layer's two input-gradient terms (LoRA, then
base) to x's gradient in peft's order: float addition is not associative, and any other order
changes the last bits of every gradient upstream.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import reference
from .call import autocast_dtype
from .formats import DenseWeight, Quant4bitWeight


# ---------------------------------------------------------------------------------------------
# Dequantization through bitsandbytes' kernel
# ---------------------------------------------------------------------------------------------

def dequantize(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`reference.dequantize`, bit for bit; 4-bit records through bitsandbytes' kernel when it can.

    Falls back to the spec whenever bitsandbytes cannot take the record (see `_bnb_takes`). Under
    torch.compile a 4-bit record goes through the custom op `lorafuse::dequantize_4bit`
    (kernels/ops.py), which runs this function: whether bitsandbytes' kernel gives the spec's bits
    depends on the code table's values, which a traced function cannot read.
    """
    if isinstance(weight, DenseWeight):
        w = weight.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    if isinstance(weight, Quant4bitWeight):
        if torch.compiler.is_compiling():
            from .ops import dequantize_4bit

            w = dequantize_4bit(weight)  # [N, K] in weight.dtype
            return w if dtype is None or w.dtype == dtype else w.to(dtype)
        if _bnb_takes(weight):
            w = _bnb_dequantize_4bit(weight)  # [N, K] in weight.dtype
            return w if dtype is None or w.dtype == dtype else w.to(dtype)
    return reference.dequantize(weight, dtype)


# bitsandbytes is imported lazily, on the first quantized call: it imports a package named
# `kernels` during its own import (a hub loader), so importing it while ours is being imported
# would be circular.
_BNB = None
_BNB_DEVICES = ("cpu", "cuda")  # devices whose bnb 4-bit kernels are known to equal the spec
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_takes(weight: Quant4bitWeight) -> bool:
    """True when bitsandbytes' 4-bit kernel gives exactly `reference.dequantize(weight)`.
    Memoised on the record (the code-table check is also memoised per code tensor)."""
    memo = weight.__dict__.get("_bnb_takes")
    if memo is not None:
        return memo
    global _BNB
    if _BNB is None:
        try:
            import bitsandbytes.functional as bnbf
            _BNB = bnbf
        except Exception:  # not installed, or no kernel library for this platform
            _BNB = False
    ok = (_BNB is not False and weight.device.type in _BNB_DEVICES and weight.blocksize in _BNB_BLOCKSIZES
          # bnb 0.50's CPU kernel applies absmax per row-block: wrong when a block straddles two rows
          # (K not a multiple of blocksize). Real layers have K a multiple of the blocksize.
          and weight.shape[1] % weight.blocksize == 0 and weight.dtype in _BNB_DTYPES
          and weight.shape[0] * weight.shape[1] > 1)
    ok = ok and _builtin_code(weight.code, weight.quant_type)
    object.__setattr__(weight, "_bnb_takes", ok)
    return ok


def _bnb_dequantize_4bit(weight: Quant4bitWeight) -> torch.Tensor:
    """W [N, K] in weight.dtype by bitsandbytes' ops, as `bitsandbytes.functional.dequantize_4bit`
    runs them (without its QuantState objects: a few microseconds less per call)."""
    absmax = weight.absmax  # fp32 [n_blocks], or uint8 codes with nested absmax
    nest = weight.nested
    if nest is not None:  # fp32 nest.code[q] * nest.absmax[i // nest.blocksize], then + offset in fp32
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nest.absmax, nest.code,
                                                                     nest.blocksize, torch.float32)
        absmax += nest.offset
    return torch.ops.bitsandbytes.dequantize_4bit(weight.packed_bytes, absmax, weight.blocksize,
                                                          weight.quant_type, list(weight.shape), weight.dtype)


_BUILTIN_CODE = WeakIdKeyDictionary()  # code tensor -> {quant_type: it holds bnb's table}


def _builtin_code(code: torch.Tensor, quant_type: str) -> bool:
    """True when `code` holds bitsandbytes' built-in `quant_type` table, which its kernels use
    instead of `code`. A data-dependent check (a host sync on a GPU): once per code tensor."""
    memo = _BUILTIN_CODE.setdefault(code, {})
    if quant_type not in memo:
        memo[quant_type] = torch.equal(code, _BNB.get_4bit_type(quant_type, device=code.device))
    return memo[quant_type]


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------

def _quantized_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ deq(W)^T + bias [..., N] with F.linear's own ops (mm / addmm on the 2-D view of x),
    written into a fresh tensor: F.linear on a 3-D x returns a view of its product, and the LoRA
    term is added into this output in place."""
    bias = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    if torch.compiler.is_compiling():  # W never leaves the op (kernels/ops.py says why)
        if isinstance(weight, Quant4bitWeight):
            from .ops import matmul_4bit

            return matmul_4bit(x, weight, True, bias, None, None, 1.0)  # [..., N]
        return F.linear(x, dequantize(weight, x.dtype), bias)
    w = dequantize(weight, x.dtype)  # [N, K], what bnb's MatMul4Bit multiplies by
    if x.dim() == 2:
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    y = x.new_empty(*x.shape[:-1], w.shape[0])
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, w.shape[0])
    if bias is None:
        torch.mm(x2, w.t(), out=y2)
    else:
        torch.addmm(bias, x2, w.t(), out=y2)
    return y


def base_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [..., N] = x @ deq(W)^T + bias in x.dtype (bias cast to it, as nn.Linear / bnb do), for a
    dense base (autograd-tracked: a trainable W gets its gradient) or without autograd."""
    if isinstance(weight, DenseWeight):
        w = weight.weight  # [N, K]: the layer's own W
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype),
                        bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))
    return _quantized_linear(x, weight, bias)


def dropout_input(x: torch.Tensor, x_pre_amp: Optional[torch.Tensor], lora_dtype: torch.dtype, p: float,
                  seed: Optional[int]) -> torch.Tensor:
    """The LoRA branch's input [..., K] in the LoRA dtype: dropout(x) as peft computes it (p > 0).

    peft applies `nn.Dropout` to x cast to the LoRA dtype, or, under torch.autocast, to x as it came
    (autocast's F.linear then casts the result): `x_pre_amp` is that x when the entry cast it.
    """
    xl = x_pre_amp if x_pre_amp is not None else (x if x.dtype == lora_dtype else x.to(lora_dtype))
    if seed is None and xl.device.type == "cpu":
        xd = PeftDropoutFunction.apply(xl, p)  # torch's generator: peft's draw, bit for bit
    elif seed is None:  # CUDA's F.dropout is one fused kernel (its own draw) that already keeps a bool mask
        xd = F.dropout(xl, p, training=True)
    else:
        keep = reference.dropout_mask(seed, xl.numel() // xl.shape[-1], xl.shape[-1], p, xl.device)
        xd = reference.apply_dropout(xl, keep.view(xl.shape), p)
    return xd if xd.dtype == lora_dtype else xd.to(lora_dtype)


class PeftDropoutFunction(torch.autograd.Function):
    """xd [..., K] = dropout(xl) with F.dropout's own draw and bits on CPU, saving a bool mask.

    CPU `F.dropout` is `noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); x * noise` and
    keeps the fp32 `noise` [..., K] for backward (4 bytes per element; peft's graph holds it). We
    draw and compute the same (same generator calls, same ops, so the same bits) but keep only
    `noise != 0` (1 byte per element): the kept value of noise is one constant, recomputed exactly
    by the same `div_` in backward, so the gradient grad * noise is bit-identical."""

    @staticmethod
    def forward(ctx, xl: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(xl).bernoulli_(1 - p)  # [..., K] 0./1., torch's default generator
        noise.div_(1 - p)
        ctx.save_for_backward(noise != 0)
        ctx.p = p
        return xl * noise

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return g * keep.to(g.dtype).div_(1 - ctx.p), None


def _exact_scale(s: float) -> bool:
    """True when s is a power of two: then fl(a * s) == fl(a) * s for every finite product that
    neither overflows nor underflows, so where s is applied does not change the bits."""
    return abs(math.frexp(s)[0]) == 0.5


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float, like: torch.Tensor) -> torch.Tensor:
    """fl(a @ b) * s [m, n] for 2-D a, b: the scale in the BLAS alpha when it is a power of two (the
    same bits, no extra pass; `like` is any tensor of the result's shape and dtype, never read
    with beta=0), else an in-place scale of the product. Under torch.compile a plain product and
    scale: Inductor fuses the scale into the pointwise pass that follows, while its addmm with
    beta=0 first copies `like` into the output (an extra [m, n] pass)."""
    if torch.compiler.is_compiling():
        return a.mm(b) * s
    if _exact_scale(s) and like.dtype == a.dtype:
        return torch.addmm(like, a, b, beta=0, alpha=s)
    return a.mm(b).mul_(s)


def add_lora(y: torch.Tensor, xl: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """(y + scaling * (xl @ A^T) @ B^T, u = xl @ A^T): peft's `result + lora_B(lora_A(x)) * scaling`
    bit for bit, summed in the promoted dtype and rounded once to y.dtype; in place on y when the
    dtypes agree and y is not a view. y [..., N]; xl [..., K]: the LoRA input (dropout applied), LoRA dtype."""
    u = F.linear(xl, A)  # [..., r]
    lora = _scaled_mm(_rows(u), B.t(), scaling, _rows(y))  # [M, N] LoRA dtype
    if y.dim() != 2:
        lora = lora.view(y.shape)
    # in place unless y is a view (autograd forbids in-place on some views) or torch.compile traces
    # this (Dynamo refuses a Function that marks its input dirty; the compiled graph is functional)
    if lora.dtype == y.dtype and y._base is None and not torch.compiler.is_compiling():
        return y.add_(lora), u
    return (y + lora).to(y.dtype), u


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., n] as [M, n] (a view; t itself when already 2-D: each torch call costs ~1 us)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def lora_grads(saved, s: float, g: torch.Tensor, needs_dxl: bool, needs_dA: bool, needs_dB: bool,
               v_for_dxl: bool = False):
    """(dxl [..., K], dA [r, K], dB [N, r]) of y + s * (xl @ A^T) @ B^T for g [..., N], in peft's
    autograd order (g * s first); a power-of-two s goes into the BLAS alpha of the thin products
    instead (the same bits, no [M, N] pass). saved: the forward's (xl, u, A, B). v_for_dxl: give
    v = s * g @ B [M, r] in dxl's place (dxl = v @ A, for a caller that adds it into dx itself)."""
    xl, u, A, B = saved
    gl = _rows(g) if g.dtype == A.dtype else _rows(g).to(A.dtype)  # [M, N]
    u2, x2 = _rows(u), _rows(xl)  # [M, r], [M, K]
    if _exact_scale(s):
        v = _scaled_mm(gl, B, s, u2)  # [M, r] = (g @ B) * s
        dB = _scaled_mm(gl.t(), u2, s, B) if needs_dB else None  # [N, r] = (g^T @ u) * s
    else:
        gs = gl * s
        v, dB = gs.mm(B), (gs.t().mm(u2) if needs_dB else None)
    dA = v.t().mm(x2) if needs_dA else None  # [r, K]
    dxl = None
    if v_for_dxl:
        return v, dA, dB
    if needs_dxl:
        dxl = v.mm(A)  # [M, K]
        dxl = dxl if xl.dim() == 2 else dxl.view(xl.shape)
    return dxl, dA, dB


def _no_autocast(backward):
    """Run a Function's backward with autocast off (the spec's dtypes; kernels/autograd.py says why)."""
    def run(ctx, g):
        if autocast_dtype(g.device.type) is None:  # no region to leave: skip entering one (~5 us)
            return backward(ctx, g)
        with torch.autocast(g.device.type, enabled=False):
            return backward(ctx, g)
    return run


class LoraBranchFunction(torch.autograd.Function):
    """out [..., N] = y + scaling * (xl @ A^T) @ B^T for a dense base's output y: one node with the
    bits of peft's linear, linear, mul and add nodes, and fewer [M, N] passes (`lora_grads`).
    Saves xl and u [M, r] (peft's graph saves xl too). Its gradient for y goes on to the base
    layer's node, recorded before this one, so autograd adds this layer's two input-gradient terms
    to x's in peft's order (LoRA term, then base term)."""

    @staticmethod
    def forward(ctx, y, xl, A, B, scaling: float):
        out, u = add_lora(y, xl, A, B, scaling)
        if out is y:
            ctx.mark_dirty(y)
        ctx.save_for_backward(xl, u, A, B)
        ctx.scaling, ctx.y_dtype = scaling, y.dtype
        return out

    @staticmethod
    @_no_autocast
    def backward(ctx, g: torch.Tensor):
        needs_dy, needs_dxl, needs_dA, needs_dB = ctx.needs_input_grad[:4]
        dxl, dA, dB = lora_grads(ctx.saved_tensors, ctx.scaling, g, needs_dxl, needs_dA, needs_dB)
        dy = g if not needs_dy or g.dtype == ctx.y_dtype else g.to(ctx.y_dtype)
        return dy, dxl, dA, dB, None


class QuantizedLoraFunction(torch.autograd.Function):
    """out [..., N] = x @ deq(W)^T + bias + scaling * (xl @ A^T) @ B^T for a quantized (frozen) W:
    one node that saves nothing [N, K]-sized (W is dequantized again in backward, as bitsandbytes'
    MatMul4Bit does; plain autograd would save the dequantized W). A = B = None: the base alone.

    x_base is x behind a pass-through view recorded before the LoRA input xl (kernels/torch_ops.py
    lora_forward): the base term of x's gradient then reaches x after the LoRA term, as in peft's
    graph, where the base layer's node runs after the LoRA branch's. xl=None: xl is x_base itself
    (torch.compile refuses a tensor passed twice to a Function).

    Under torch.compile, with a 4-bit W and the LoRA weights in x's dtype, the up-projection is
    accumulated into the base product inside `lorafuse::matmul_4bit` (one pass over y [M, N]
    instead of the three of Inductor's product-then-add), and so is v @ A into dx in backward
    when xl is x_base itself (no dropout)."""

    @staticmethod
    def forward(ctx, x_base, xl, A, B, bias, weight, scaling: float):
        fused = (A is not None and A.dtype == x_base.dtype and isinstance(weight, Quant4bitWeight)
                 and torch.compiler.is_compiling())
        ctx.fused_dx = fused and xl is None
        xl = x_base if xl is None else xl
        u = None
        if fused:
            from .ops import matmul_4bit

            u = F.linear(xl, A)  # [..., r]
            y = matmul_4bit(x_base, weight, True, bias, u, B.t(), scaling)  # [..., N]
        else:
            y = _quantized_linear(x_base, weight, bias)  # [..., N]
            if A is not None:
                y, u = add_lora(y, xl, A, B, scaling)
        ctx.save_for_backward(xl if A is not None else None, u, A, B)
        ctx.weight, ctx.scaling, ctx.x_dtype = weight, scaling, x_base.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @_no_autocast
    def backward(ctx, g: torch.Tensor):
        needs_dx, needs_dxl, needs_dA, needs_dB, needs_db = ctx.needs_input_grad[:5]
        dxl = dA = dB = dx = db = None
        saved = ctx.saved_tensors  # (xl, u, A, B); read once (checkpointing unpacks each once)
        if saved[2] is not None:
            dxl, dA, dB = lora_grads(saved, ctx.scaling, g, needs_dxl, needs_dA, needs_dB,
                                     v_for_dxl=ctx.fused_dx and needs_dx)
        if needs_dx:  # [..., K]: torch.matmul folds the leading dims into one mm, as bnb's backward
            gx = g if g.dtype == ctx.x_dtype else g.to(ctx.x_dtype)
            if torch.compiler.is_compiling() and isinstance(ctx.weight, Quant4bitWeight):
                from .ops import matmul_4bit

                v = dxl if ctx.fused_dx else None  # [M, r]: dx = g @ W + v @ A in one pass
                dx = matmul_4bit(gx, ctx.weight, False, None, v, saved[2] if ctx.fused_dx else None, 1.0)
                dxl = None if ctx.fused_dx else dxl
            else:
                dx = torch.matmul(gx, dequantize(ctx.weight, ctx.x_dtype))
        if needs_db:
            db = _rows(g).sum(0)  # [N]
            db = db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)
        return dx, dxl, dA, dB, db, None, None


def lora_forward(call) -> torch.Tensor:
    """y [..., N] for a validated LoraCall: peft's graph (module doc), autograd-tracked when enabled."""
    x, A, weight = call.x, call.A, call.weight
    fused = torch.is_grad_enabled() and not isinstance(weight, DenseWeight)  # a quantized base, training
    if fused:  # x_base first: see QuantizedLoraFunction (the order of the two terms is Inductor's when compiled)
        x_base = x.view_as(x) if x.requires_grad and not torch.compiler.is_compiling() else x
    else:
        y = base_linear(x, weight, call.bias)  # [..., N] x.dtype, recorded first, as peft's base_layer(x)
    xl = None
    if A is not None:
        if call.dropout_p:
            xl = dropout_input(x, call.x_pre_amp, A.dtype, call.dropout_p, call.seed)  # [..., K] LoRA dtype
        else:
            xl = x if x.dtype == A.dtype else x.to(A.dtype)
    if fused:
        return QuantizedLoraFunction.apply(x_base, None if xl is x_base else xl, A, call.B, call.bias, weight,
                                           call.scaling)
    if A is None:
        return y
    if torch.is_grad_enabled():
        return LoraBranchFunction.apply(y, xl, A, call.B, call.scaling)
    return add_lora(y, xl, A, call.B, call.scaling)[0]
