"""One call of `kernels.lora_linear`, validated once, in one place: `LoraCall` and `make_call`.

Every backend reads a `LoraCall` and may assume what `make_call` checked (shapes, dtypes, devices,
the record's consistency, the dropout rate and seed); a backend only adds what it cannot do
(`Backend.reason`). Runs on every call, so it reads each attribute once (a torch attribute read
costs ~0.1-0.3 us) and builds no more than one small object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .formats import FLOAT_DTYPES, DenseWeight, check_weight

# Dropout seeds are ints in [0, SEED_END): the Philox key is two 32-bit words, Triton reads it as
# int64. A drawn seed (seed=None on the Triton backend) is uniform in [0, SEED_END - 1).
SEED_END = 2**63


@dataclass(slots=True)
class LoraCall:
    """y [M, N] = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T, with its inputs checked.

    x keeps the caller's shape [..., K] (M = x.numel() / K rows): flattening it here would add a view
    node through which autograd sums this layer's input-gradient terms first, a different rounding
    order than peft's graph. Tensors are already in the dtypes the ops run in (under torch.autocast:
    cast to the autocast dtype, as autocast's F.linear would).
    """

    x: torch.Tensor  # [..., K]
    weight: object  # a kernels.formats record, W [N, K]
    bias: Optional[torch.Tensor]  # [N] or None
    A: Optional[torch.Tensor]  # [r, K] in the LoRA dtype, or None (base layer only)
    B: Optional[torch.Tensor]  # [N, r]
    scaling: float
    dropout_p: float  # 0.0 outside training
    seed: Optional[int]  # explicit Philox seed, or None: each backend draws its own way
    N: int
    K: int
    x_pre_amp: Optional[torch.Tensor] = None  # [..., K]: x before the autocast cast (torch's dropout)

    @property
    def r(self) -> int:
        return 0 if self.A is None else self.A.shape[0]


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The active torch.autocast dtype for this device type, or None when autocast is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know (e.g. "meta"): not autocasting
        return None
    return torch.get_autocast_dtype(device_type)


def _amp_cast(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
    """Autocast's rule for F.linear inputs: floating tensors other than fp64 go to the autocast dtype."""
    if t is None or not t.is_floating_point() or t.dtype in (dt, torch.float64):
        return t
    return t.to(dt)


def make_call(x, weight, bias, A, B, scaling, dropout_p, training, seed, amp: Optional[torch.dtype]) -> LoraCall:
    """Validate one call and return it. Every error names the problem and the fix.

    amp: the autocast dtype (`autocast_dtype`) or None; with it, x, bias, A and B are cast to it here.
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
    if amp is None and isinstance(weight, DenseWeight) and weight.weight.dtype != x.dtype:
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
    p = float(dropout_p) if training and A is not None else 0.0
    if p != 0.0 and not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p={p}: must be in [0, 1)")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_END):
        raise ValueError(f"seed={seed!r}: must be an int in [0, 2**63) or None")
    pre_amp = None
    if amp is not None:
        cast = _amp_cast(x, amp)
        pre_amp = x if cast is not x else None
        x, bias, A, B = cast, _amp_cast(bias, amp), _amp_cast(A, amp), _amp_cast(B, amp)
    return LoraCall(x, weight, bias, A, B, float(scaling), p, seed if p else None, n, k, pre_amp)
