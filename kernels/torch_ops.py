"""The torch backend: peft's own graph of PyTorch ops, with `kernels.reference`'s bits, made fast.

The LoRA branch is exactly the op sequence of peft's `lora.Linear.forward`, recorded by plain
autograd in the same order (base, then dropout, A, B, scale, add):
    y = base(x);  xd = F.dropout(x.to(A.dtype), p);  y = (y + F.linear(F.linear(xd, A), B) * s).to(x.dtype)
so forward, backward (autograd sums the gradient contributions into x in node order, and ours are
created in peft's order) and the dropout masks (`F.dropout` on the same tensor, from torch's
generator, in the same call order) equal peft's bit for bit from the same torch.manual_seed
(tests/kernels/test_peft_dropout.py). With an explicit seed the mask is instead the spec's Philox
one (`reference.dropout_mask`, what the Triton kernels draw).

What makes it fast, each tested equal to the spec (tests/kernels/test_torch_ops.py):
- `dequantize` runs bitsandbytes' own 4-bit kernel (one call instead of the spec's full-size
  temporaries, ~30x faster on CPU at 1024 x 1024) whenever its result equals the spec's, with its
  arguments built once per (frozen) record;
- a quantized base runs through `QuantizedLinearFunction`, which saves nothing [N, K]-sized (plain
  autograd would save the dequantized W) and dequantizes again in backward, as bitsandbytes'
  MatMul4Bit does; and peft's defensive `result.clone()` of the base output is skipped;
- without autograd, a power-of-two `scaling` (peft's usual alpha = r or 2r), which commutes exactly
  with every rounding, is folded into the up-projection's BLAS alpha, and the sum is made in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from .call import autocast_dtype
from .formats import DenseWeight, Quant4bitWeight


# ---------------------------------------------------------------------------------------------
# Dequantization through bitsandbytes' kernel
# ---------------------------------------------------------------------------------------------

def dequantize(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`reference.dequantize`, bit for bit; 4-bit records through bitsandbytes' kernel when it can.

    Falls back to the spec whenever bitsandbytes cannot take the record (see `_bnb_args`).
    """
    if isinstance(weight, DenseWeight):
        w = weight.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    if isinstance(weight, Quant4bitWeight):
        args = _bnb_args(weight)
        if args is not None:
            w = _BNB.dequantize_4bit(*args)  # [N, K] in weight.dtype
            return w if dtype is None or w.dtype == dtype else w.to(dtype)
    return reference.dequantize(weight, dtype)


# bitsandbytes is imported lazily, on the first quantized call: it imports a package named
# `kernels` during its own import (a hub loader), so importing it while ours is being imported
# would be circular.
_BNB = None
_BNB_DEVICES = ("cpu", "cuda")  # devices whose bnb 4-bit kernels are known to equal the spec
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_args(weight: Quant4bitWeight):
    """(packed [bytes, 1], QuantState) viewing the record's tensors, or None when bitsandbytes'
    dequantize_4bit would not give exactly `reference.dequantize(weight)`. Memoised on the record."""
    memo = weight.__dict__.get("_bnb_args", False)
    if memo is not False:
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
    # bnb's kernels use their built-in table, not `code`: only take records that carry it
    ok = ok and torch.equal(weight.code, _BNB.get_4bit_type(weight.quant_type, device=weight.code.device))
    memo = None
    if ok:
        state2 = offset = None
        if weight.nested is not None:
            nest = weight.nested
            state2 = _BNB.QuantState(absmax=nest.absmax, code=nest.code, blocksize=nest.blocksize,
                                     dtype=torch.float32)
            offset = nest.offset  # bnb adds it to the fp32 absmax: an fp32 add, as the spec's
        state = _BNB.QuantState(absmax=weight.absmax, shape=torch.Size(weight.shape), code=weight.code,
                                blocksize=weight.blocksize, quant_type=weight.quant_type, dtype=weight.dtype,
                                offset=offset, state2=state2)
        memo = (weight.packed_bytes.view(-1, 1), state)  # bnb's [bytes, 1] column
    object.__setattr__(weight, "_bnb_args", memo)
    return memo


# ---------------------------------------------------------------------------------------------
# Forward (backward: autograd, through peft's graph)
# ---------------------------------------------------------------------------------------------

class QuantizedLinearFunction(torch.autograd.Function):
    """y [..., N] = x @ deq(W)^T + bias for a quantized (frozen) W [N, K]; saves nothing tensor-sized.

    Backward: dx = g @ deq(W) (W dequantized again), dbias = g.sum(0), as bnb's MatMul4Bit does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], weight) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        w = dequantize(weight, x.dtype)  # [N, K]
        # F.linear's own ops, written into a fresh [..., N] tensor: F.linear on a 3-D x returns a view
        # of its [M, N] product, and the LoRA branch adds into this output in place
        y = x.new_empty(*x.shape[:-1], w.shape[0])
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, w.shape[0])
        if bias is None:
            torch.mm(x2, w.t(), out=y2)
        else:
            torch.addmm(bias.to(x.dtype), x2, w.t(), out=y2)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if autocast_dtype(g.device.type) is None:  # no region to leave: skip entering one (~5 us)
            return QuantizedLinearFunction._backward(ctx, g)
        with torch.autocast(g.device.type, enabled=False):  # the spec's dtypes (kernels/autograd.py)
            return QuantizedLinearFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: torch.Tensor):
        needs_dx, needs_db = ctx.needs_input_grad[:2]
        dx = db = None
        if needs_dx:  # [..., K]: torch.matmul folds the leading dims into one mm, as bnb's backward
            dx = torch.matmul(g if g.dtype == ctx.x_dtype else g.to(ctx.x_dtype), dequantize(ctx.weight, ctx.x_dtype))
        if needs_db:
            db = g.reshape(-1, g.shape[-1]).sum(0)  # [N]
            db = db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)
        return dx, db, None


def base_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [..., N] = x @ deq(W)^T + bias in x.dtype (bias cast to it, as nn.Linear / bnb do)."""
    if isinstance(weight, DenseWeight) or not torch.is_grad_enabled():
        w = dequantize(weight, x.dtype)  # [N, K]: the layer's own W when dense (gets its gradient)
        return F.linear(x, w, bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))
    return QuantizedLinearFunction.apply(x, bias, weight)


def dropout_input(x: torch.Tensor, x_pre_amp: Optional[torch.Tensor], lora_dtype: torch.dtype, p: float,
                  seed: Optional[int]) -> torch.Tensor:
    """The LoRA branch's input [..., K] in the LoRA dtype: dropout(x) as peft computes it (p > 0).

    peft applies `nn.Dropout` to x cast to the LoRA dtype, or, under torch.autocast, to x as it came
    (autocast's F.linear then casts the result): `x_pre_amp` is that x when the entry cast it.
    """
    xl = x_pre_amp if x_pre_amp is not None else (x if x.dtype == lora_dtype else x.to(lora_dtype))
    if seed is None:
        xd = F.dropout(xl, p, training=True)  # torch's generator: peft's draw, bit for bit
    else:
        keep = reference.dropout_mask(seed, xl.numel() // xl.shape[-1], xl.shape[-1], p, xl.device)
        xd = reference.apply_dropout(xl, keep.view(xl.shape), p)
    return xd if xd.dtype == lora_dtype else xd.to(lora_dtype)


def _exact_scale(s: float) -> bool:
    """True when s is a power of two: then fl(a * s) == fl(a) * s for every finite product that
    neither overflows nor underflows, so where s is applied does not change the bits."""
    return abs(math.frexp(s)[0]) == 0.5


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float, like: torch.Tensor) -> torch.Tensor:
    """fl(a @ b) * s [m, n] for 2-D a, b: the scale in the BLAS alpha when it is a power of two (the
    same bits, no extra pass; `like` is any tensor of the result's shape and dtype, never read
    with beta=0), else an in-place scale of the product."""
    if _exact_scale(s) and like.dtype == a.dtype:
        return torch.addmm(like, a, b, beta=0, alpha=s)
    return a.mm(b).mul_(s)


def add_lora(y: torch.Tensor, xl: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """(y + scaling * (xl @ A^T) @ B^T, u = xl @ A^T): peft's `result + lora_B(lora_A(x)) * scaling`
    bit for bit, summed in the promoted dtype and rounded once to y.dtype; in place on y when the
    dtypes agree and y is not a view. y [..., N]; xl [..., K] the LoRA input (dropout applied) in the LoRA dtype."""
    u = F.linear(xl, A)  # [..., r]
    u2 = u.reshape(-1, u.shape[-1])  # [M, r]
    y2 = y.view(-1, y.shape[-1])  # [M, N]
    lora = _scaled_mm(u2, B.t(), scaling, y2)  # [M, N] LoRA dtype
    if lora.dtype == y.dtype and not y._is_view():  # (autograd forbids in-place on some views)
        return y.add_(lora.view(y.shape)), u
    return (y + lora.view(y.shape)).to(y.dtype), u


class LoraBranchFunction(torch.autograd.Function):
    """out [..., N] = y + scaling * (xl @ A^T) @ B^T for the base output y, one autograd node.

    The same bits as peft's nodes for that expression (linear, linear, mul, add), with fewer [M, N]
    passes: a power-of-two scaling rides in the BLAS alpha (forward: of the up-projection;
    backward: of v = g @ B and dB = g^T @ u) instead of scaling g. Saves xl and u [M, r] (peft's
    graph saves xl too). Its gradient for y passes g on to the base layer's node, which is recorded
    before this one, so autograd delivers this layer's input-gradient terms in peft's order.
    """

    @staticmethod
    def forward(ctx, y, xl, A, B, scaling: float):
        out, u = add_lora(y, xl, A, B, scaling)
        if out is y:
            ctx.mark_dirty(y)
        ctx.save_for_backward(xl, u, A, B)
        ctx.scaling, ctx.y_dtype = scaling, y.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if autocast_dtype(g.device.type) is None:
            return LoraBranchFunction._backward(ctx, g)
        with torch.autocast(g.device.type, enabled=False):
            return LoraBranchFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: torch.Tensor):
        xl, u, A, B = ctx.saved_tensors
        needs_dy, needs_dxl, needs_dA, needs_dB = ctx.needs_input_grad[:4]
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])  # [M, N]
        gl = g2 if g2.dtype == A.dtype else g2.to(A.dtype)
        u2, x2 = u.reshape(-1, u.shape[-1]), xl.reshape(-1, xl.shape[-1])  # [M, r], [M, K]
        if _exact_scale(s):
            v = _scaled_mm(gl, B, s, u2)  # [M, r] = (g @ B) * s
            dB = _scaled_mm(gl.t(), u2, s, B) if needs_dB else None  # [N, r] = (g^T @ u) * s
        else:  # peft's order (g * s first): scaling after the product would round differently
            gs = gl * s
            v, dB = gs.mm(B), (gs.t().mm(u2) if needs_dB else None)
        dA = v.t().mm(x2) if needs_dA else None  # [r, K]
        dxl = v.mm(A).view(xl.shape) if needs_dxl else None  # [..., K]
        dy = g if not needs_dy or g.dtype == ctx.y_dtype else g.to(ctx.y_dtype)
        return dy, dxl, dA, dB, None


def lora_forward(call) -> torch.Tensor:
    """y [..., N] for a validated LoraCall: peft's graph (module doc), autograd-tracked when enabled."""
    x, A = call.x, call.A
    y = base_linear(x, call.weight, call.bias)  # [..., N] x.dtype, recorded first, as peft's base_layer(x)
    if A is None:
        return y
    if call.dropout_p:
        xl = dropout_input(x, call.x_pre_amp, A.dtype, call.dropout_p, call.seed)  # [..., K] LoRA dtype
    else:
        xl = x if x.dtype == A.dtype else x.to(A.dtype)
    if torch.is_grad_enabled():
        return LoraBranchFunction.apply(y, xl, A, call.B, call.scaling)
    return add_lora(y, xl, A, call.B, call.scaling)[0]
