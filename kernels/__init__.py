"""LoRA ops: one entry point, `lora_linear`, over a torch backend and fused Triton kernels.

    y = kernels.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training,
                            backend="auto", seed=None)

`weight` is a base weight record (`DenseWeight`, `Quant4bitWeight`, `Int8Weight`; kernels/formats).
A call is validated once (kernels/call.py), handed to a backend (kernels/backends.py: "torch" or
"triton", or "auto" to pick), which runs it: kernels/torch_ops.py, or kernels/triton/ through the
autograd Function in kernels/autograd.py, where each pass picks a strategy by a static cost model
(kernels/triton/strategy.py). `backend_report()` says which backend and strategy ran, per call
shape. The math is specified in kernels/reference.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .backends import BACKEND_NAMES as BACKENDS
from .call import autocast_dtype, make_call
from .formats import BaseWeight, DenseWeight, Int8Weight, NestedAbsmax, Quant4bitWeight
from .torch_ops import dequantize  # reference.dequantize's bits, through bitsandbytes' kernel when it can

__all__ = ["lora_linear", "dequantize", "backend_report", "BaseWeight", "DenseWeight", "Int8Weight",
           "Quant4bitWeight", "NestedAbsmax", "BACKENDS"]


def backend_report() -> list[dict]:
    """What `lora_linear` ran in this process: one dict per (pass, call shape, backend, strategy) with
    keys pass, backend, strategy, why, M, N, K, r, format, calls, predicted_us (triton: every
    strategy's predicted H100 time in us, the static model of kernels/triton/strategy.py)."""
    return backends.report()


def lora_linear(
    x: torch.Tensor,
    weight: BaseWeight,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """y = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T.

    x [..., K]; W [N, K] described by `weight`; bias [N] or None; lora_A [r, K], lora_B [N, r], or
    both None for the base layer alone. Output [..., N] in the base output dtype (x's dtype, or the
    autocast dtype), the LoRA branch computed in lora_A's dtype as peft does (in the autocast dtype
    under torch.autocast, as autocast's F.linear would).

    dropout_p applies only when `training`. With seed=None (what LoraLinear passes) each backend
    draws its own mask: "torch" exactly as peft's nn.Dropout does (torch's generator, so the same
    torch.manual_seed gives peft's mask), "triton" a Philox mask keyed by a seed it draws on the
    device. An explicit seed (an int in [0, 2**63)) gives the Philox mask `reference.dropout_mask`
    on both backends. backend: "torch", "triton" (CUDA, or CPU under TRITON_INTERPRET=1; raises
    when it cannot take the call) or "auto" (triton when it takes the call, else torch, saying so
    once per reason in one plain stderr line: `kernels: backend 'auto' uses torch (<reason>)`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: unknown; valid backends are {list(BACKENDS)}")
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    amp = autocast_dtype(device_type)
    call = make_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed, amp)
    chosen = backends.choose(backend, call)
    if amp is None:
        return chosen.run(call)  # [..., N]
    with torch.autocast(device_type, enabled=False):  # the spec's dtypes inside (kernels/autograd.py)
        return chosen.run(call)
