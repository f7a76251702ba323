"""The autograd Function that ties a fused backend's forward to its backward.

`LoraFunction.apply(x, A, B, bias, call, backend)`: x [M, K], A [r, K], B [N, r], bias [N] are the
call's tensors (passed so autograd tracks them; A = B = None for the base layer alone), `call` the
validated `kernels.call.LoraCall`, `backend` what runs the math (the triton backend):
    backend.forward(ctx, call) -> y [M, N]      saves its tensors with ctx.save_for_backward
    backend.backward(ctx, g) -> (dx, dA, dB)     each None when not needed
(The torch backend records peft's graph with plain autograd instead: kernels/torch_ops.py.)

The chain rule it implements (W frozen; xd = dropout(x) = x * keep / (1 - p); s = scaling):
    y  = x @ W^T + bias + s * (xd @ A^T) @ B^T,   u = xd @ A^T   [M, r]
    dB = s * g^T @ u                 [N, r]
    v  = s * g @ B                   [M, r]
    dA = v^T @ xd                    [r, K]
    dx = g @ W + keep / (1 - p) * (v @ A)    [M, K]
    dbias = g.sum(0)                 [N]      (here, for every backend)
Nothing [N, K]-sized is saved between the passes: W is dequantized again in backward (by the fused
kernels inside their N loop), and the dropout mask is redrawn from its seed.

Autocast: `kernels.lora_linear` resolves torch.autocast before calling apply and runs it with
autocast disabled; backward disables it too, so the dtypes inside both passes are exactly the
ones the spec spells out, whatever context `loss.backward()` runs in (on CPU the engine runs
backward on the calling thread, where an autocast region may be active).

Activation checkpointing works in both modes: with use_reentrant=False the saved tensors go through
checkpoint's saved-tensor hooks; with use_reentrant=True the forward is re-run. Both restore the RNG
state before recomputing, so a seed drawn from torch's generator repeats.
"""
from __future__ import annotations

from typing import Optional

import torch

from .call import autocast_dtype


class LoraFunction(torch.autograd.Function):
    """y [M, N] = x @ deq(W)^T + bias + scaling * (dropout(x) @ A^T) @ B^T, backward by `backend`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], call, backend) -> torch.Tensor:
        ctx.backend, ctx.weight, ctx.scaling, ctx.dropout_p = backend, call.weight, call.scaling, call.dropout_p
        ctx.bias_dtype = None if bias is None else bias.dtype
        return backend.forward(ctx, call)  # [M, N]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()  # [M, N]; autograd may hand over an expanded or strided gradient
        if autocast_dtype(g.device.type) is None:  # no region to leave: skip entering one (~5 us)
            dx, dA, dB = ctx.backend.backward(ctx, g)
        else:
            with torch.autocast(g.device.type, enabled=False):
                dx, dA, dB = ctx.backend.backward(ctx, g)
        db = None
        if ctx.needs_input_grad[3]:
            db = g.sum(0)  # [N]: nn.Linear's bias gradient
            db = db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)
        return dx, dA, dB, db, None, None
