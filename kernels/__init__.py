"""LoRA ops: one entry point, `lora_linear`, over a PyTorch reference and fused Triton kernels.

(placeholder torch path; the kernels issue replaces it with the reference/autograd/Triton stack)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import dequantize
from .weights import BaseWeight, DenseWeight, Int8Weight, NestedAbsmax, Quant4bitWeight

BACKENDS = ("auto", "torch", "triton")

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
    autocast dtype), the LoRA branch computed in lora_A's dtype as peft does.
    """
    w = dequantize(weight, x.dtype if torch.is_floating_point(x) else None)
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if lora_A is None:
        return y
    xl = x.to(lora_A.dtype)
    if training and dropout_p > 0:
        xl = F.dropout(xl, dropout_p, training=True)
    return (y + F.linear(F.linear(xl, lora_A), lora_B) * scaling).to(y.dtype)
