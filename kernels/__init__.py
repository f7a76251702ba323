"""LoRA ops: one entry point, `lora_linear`, over a PyTorch reference and fused Triton kernels.

    y = kernels.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training,
                            backend="auto", seed=None)

`weight` is a base weight record (`DenseWeight`, `Quant4bitWeight`, `Int8Weight`); the math and
dtypes are specified in `kernels.reference`, which is also the "torch" backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, reference
from .autograd import BaseLinearFunction, LoraLinearFunction
from .dispatch import BACKENDS
from .reference import dequantize
from .weights import (FLOAT_DTYPES, BaseWeight, DenseWeight, Int8Weight, NestedAbsmax, Quant4bitWeight,
                      check_weight)

__all__ = ["lora_linear", "dequantize", "BaseWeight", "DenseWeight", "Int8Weight", "Quant4bitWeight",
           "NestedAbsmax", "BACKENDS"]


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

    dropout_p applies only when `training`; its mask is Philox-generated from `seed` (an int in
    [0, 2**63); drawn from torch's default generator when None), so the torch and triton backends
    drop the same elements. backend: "torch" (the reference), "triton" (fused kernels; CUDA, or CPU
    under TRITON_INTERPRET=1), "auto" (triton when it supports the call, else torch with a one-time
    warning naming the reason). A base weight that requires grad (a dense base being trained) runs
    the reference under plain autograd, since the fused backward gives no weight gradient; so does
    backend "torch" on a dense base without dropout, where plain autograd saves nothing more than
    the autograd Function would and runs its backward without a Python call per layer.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: unknown; valid backends are {list(BACKENDS)}")
    p = float(dropout_p) if training else 0.0
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    amp = _autocast_on(device_type)
    n, k = _check_inputs(x, weight, bias, lora_A, lora_B, p, seed, amp)
    seed = _seed(seed, p)
    if not amp:
        return _run(x, weight, bias, lora_A, lora_B, float(scaling), p, backend, seed, n, k)
    # torch.autocast: compute in the autocast dtype, as autocast's F.linear does for peft's graph,
    # then run our ops with autocast off so their dtypes are exactly the reference's.
    dt = torch.get_autocast_dtype(device_type)
    x, bias, lora_A, lora_B = (_amp_cast(t, dt) for t in (x, bias, lora_A, lora_B))
    with torch.autocast(device_type, enabled=False):
        return _run(x, weight, bias, lora_A, lora_B, float(scaling), p, backend, seed, n, k)


def _run(x, weight, bias, lora_A, lora_B, scaling, p, backend, seed, n, k) -> torch.Tensor:
    lead = x.shape[:-1]
    flat = x.dim() != 2
    x2 = x.reshape(-1, k) if flat else x  # [M, K]: a view when x is contiguous
    if isinstance(weight, DenseWeight) and weight.weight.requires_grad and torch.is_grad_enabled():
        # Training the base weight itself: plain autograd through the reference (saves W).
        y, _ = reference.lora_forward(x2, weight, bias, lora_A, lora_B, scaling, p, seed)
        return y.reshape(*lead, n) if flat else y
    ops = dispatch.choose(backend, x2, weight, bias, lora_A, lora_B, p)
    if lora_A is None and ops is reference:
        # Base layer alone (adapter disabled or merged) on the reference: a Function that saves
        # nothing tensor-sized. On the triton backend the fused ops take A = B = None instead.
        y = BaseLinearFunction.apply(x2, bias, weight)
        return y.reshape(*lead, n) if flat else y
    if ops is reference and p == 0.0 and isinstance(weight, DenseWeight) and torch.is_grad_enabled():
        # Dense base, no dropout: plain autograd through the reference saves exactly what the
        # Function would (x, u and references to W, A, B, no copies: W is the layer's own tensor)
        # and runs its backward in C++ (the same graph as peft's), without the Python Function's
        # per-call cost. Quantized bases (autograd would save the dequantized W [N, K]) and dropout
        # (it would save the mask) keep the Function.
        y, _ = reference.lora_forward(x2, weight, bias, lora_A, lora_B, scaling, p, seed)
        return y.reshape(*lead, n) if flat else y
    if ops is not reference:
        # The kernels read x [M, K] as a row-major buffer (a copy only for a strided x).
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if lora_A is not None and not (lora_A.is_contiguous() and lora_B.is_contiguous()):
            raise ValueError("lora_A / lora_B must be contiguous for the triton backend "
                             f"(strides {lora_A.stride()}, {lora_B.stride()}); pass .contiguous() weights")
    y = LoraLinearFunction.apply(x2, lora_A, lora_B, bias, weight, scaling, p, seed, ops)  # [M, N]
    return y.reshape(*lead, n) if flat else y  # [..., N]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta"): not autocasting
        return False


def _amp_cast(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
    """Autocast's rule for F.linear inputs: floating tensors other than fp64 go to the autocast dtype."""
    if t is None or not t.is_floating_point() or t.dtype in (dt, torch.float64):
        return t
    return t.to(dt)


def _seed(seed: Optional[int], p: float) -> Optional[int]:
    if p == 0.0:
        return seed
    if seed is None:  # torch's default generator: reproducible, and restored by checkpointing
        return int(torch.randint(0, 2**62, ()).item())
    return seed


def _check_inputs(x, weight, bias, A, B, p, seed, amp: bool) -> tuple[int, int]:
    """Validate one call; returns (N, K). Every error names the problem and the fix.

    Runs on every call, so it reads each attribute once (a torch attribute read costs ~0.1-0.3 us).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., K], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x has unsupported dtype {x.dtype}; use one of {list(FLOAT_DTYPES)}")
    n, k = check_weight(weight)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but the base weight is [N={n}, K={k}]")
    device = x.device
    if weight.device != device:
        raise ValueError(f"device mismatch: x on {device}, base weight on {weight.device}; move both to one device")
    if not amp and isinstance(weight, DenseWeight) and weight.weight.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: x is {x.dtype} but the dense base weight is {weight.weight.dtype} "
                         "(nn.Linear would refuse too); cast one of them or run under torch.autocast")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape [N={n}], got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"device mismatch: x on {device}, bias on {bias.device}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bias has unsupported dtype {bias.dtype}")
    if (A is None) != (B is None):
        raise ValueError("lora_A and lora_B must both be tensors, or both None (base layer only)")
    if A is not None:
        a_shape, b_shape = A.shape, B.shape
        if len(a_shape) != 2 or a_shape[1] != k:
            raise ValueError(f"lora_A must be [r, K={k}], got {tuple(a_shape)}")
        r = a_shape[0]
        if b_shape != (n, r):
            raise ValueError(f"lora_B must be [N={n}, r={r}] to match W [N={n}, K={k}] and lora_A "
                             f"[{r}, {k}], got {tuple(b_shape)}")
        a_dtype = A.dtype
        if a_dtype != B.dtype or a_dtype not in FLOAT_DTYPES:
            raise ValueError(f"lora_A ({A.dtype}) and lora_B ({B.dtype}) must share one float dtype")
        if A.device != device or B.device != device:
            raise ValueError(f"device mismatch: x on {device}, lora_A on {A.device}, lora_B on {B.device}")
    if p != 0.0 and not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p={p}: must be in [0, 1)")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"seed={seed!r}: must be an int in [0, 2**63) or None")
    return n, k
