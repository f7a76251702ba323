"""The autograd Function that ties a LoRA op's forward to its backward.

`LoraLinearFunction.apply(x, A, B, bias, weight, scaling, dropout_p, seed, ops)` runs
`ops.lora_forward` and, in backward, `ops.lora_backward`, where `ops` is `kernels.reference` or one
of the Triton op modules (same signatures; see reference.py). Between the passes it saves only
x [M, K] (the input, which the caller holds anyway), u [M, r] and the LoRA weights A [r, K] and
B [N, r] (parameters, not copies) through `save_for_backward`, plus, on the torch path with
dropout, the bool mask [M, K] (the Triton kernels regenerate it from the seed instead); the base weight record and the
dropout seed ride on ctx as plain attributes. Nothing [N, K]-sized is saved: a quantized W is
dequantized again (or, in the fused kernels, inside the K loop) in backward.

Autocast: the entry point (`kernels.lora_linear`) resolves torch.autocast before calling apply
(casts x, A, B, bias to the autocast dtype, as autocast's F.linear would for peft's graph) and
calls apply with autocast disabled; backward disables autocast too, so the dtypes inside both
passes are exactly the ones the reference spells out, whatever context `loss.backward()` runs in
(on CPU the engine runs backward on the calling thread, where an autocast region may be active).

`kernels.lora_linear` uses this Function for quantized bases and for dropout; a dense base without
dropout on the "torch" backend runs the reference under plain autograd instead (it saves the same
references to x, u, W, A, B, and its backward is C++ with no Python call per layer).

Activation checkpointing works in both modes: with use_reentrant=False the saved tensors go
through checkpoint's saved-tensor hooks; with use_reentrant=True the forward is re-run. Both
restore the RNG state before recomputing, so a seed drawn from torch's generator repeats.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from . import reference
from .weights import BaseWeight


class LoraLinearFunction(torch.autograd.Function):
    """y [M, N] = x @ deq(W)^T + bias + scaling * (dropout(x) @ A^T) @ B^T, with a fused backward.

    Inputs: x [M, K]; A [r, K], B [N, r] in the LoRA dtype; bias [N] or None; weight: a base weight
    record (frozen: gets no gradient). Returns grads for x, A, B and bias (each only when needed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor],
                weight: BaseWeight, scaling: float, dropout_p: float, seed: Optional[int],
                ops: ModuleType) -> torch.Tensor:
        keep = None
        if ops is reference and dropout_p > 0.0:
            # The torch path draws the Philox mask once and keeps it for backward: bool [M, K], a
            # quarter of the fp32 dropout(x) that peft's graph saves; drawing it again costs ~8x
            # torch's own dropout on CPU. The fused kernels regenerate it in-kernel instead.
            keep = reference.dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
            y, u = ops.lora_forward(x, weight, bias, A, B, scaling, dropout_p, seed, keep=keep)
        else:
            y, u = ops.lora_forward(x, weight, bias, A, B, scaling, dropout_p, seed)  # [M, N], [M, r]
        ctx.save_for_backward(x, u, A, B, keep)
        ctx.weight, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.ops = weight, scaling, dropout_p, seed, ops
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if _autocast_on(g):
            with torch.autocast(g.device.type, enabled=False):
                return LoraLinearFunction._backward(ctx, g)
        return LoraLinearFunction._backward(ctx, g)  # no autocast region: skip entering one (~5 us)

    @staticmethod
    def _backward(ctx, g: torch.Tensor):
        x, u, A, B, keep = ctx.saved_tensors
        needs_dx, needs_dA, needs_dB, needs_db = ctx.needs_input_grad[:4]
        g = g.contiguous()  # [M, N]; autograd may hand over an expanded or strided gradient
        dx = dA = dB = db = None
        if needs_dx or needs_dA or needs_dB:
            extra = {} if keep is None else {"keep": keep}  # the torch path's saved mask
            dx, dA, dB = ctx.ops.lora_backward(g, x, u, ctx.weight, A, B, ctx.scaling,
                                               ctx.dropout_p, ctx.seed, needs_dx=needs_dx, **extra)
        if needs_db:
            db = _cast(g.sum(0), ctx.bias_dtype)  # [N]: nn.Linear's bias gradient
        return (dx if needs_dx else None, dA if needs_dA else None, dB if needs_dB else None, db,
                None, None, None, None, None)


class BaseLinearFunction(torch.autograd.Function):
    """y [M, N] = x @ deq(W)^T + bias for the base layer alone (adapter disabled or merged).

    Saves nothing tensor-sized: backward needs only W, which it dequantizes again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], weight: BaseWeight) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return reference.base_forward(x, weight, bias)  # [M, N]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if _autocast_on(g):
            with torch.autocast(g.device.type, enabled=False):
                return BaseLinearFunction._backward(ctx, g)
        return BaseLinearFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: torch.Tensor):
        needs_dx, needs_db = ctx.needs_input_grad[:2]
        dx = db = None
        if needs_dx:
            dx = _cast(g, ctx.x_dtype).mm(reference.dequantize_fast(ctx.weight, ctx.x_dtype))  # [M, K]
        if needs_db:
            db = _cast(g.sum(0), ctx.bias_dtype)  # [N]
        return dx, db, None


def _autocast_on(g: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(g.device.type)
    except RuntimeError:  # a device type autocast does not know: not autocasting
        return False


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipping the call when it would be a no-op (each torch call costs ~1-2 us)."""
    return t if t.dtype == dtype else t.to(dtype)
