"""The PyTorch specification of every LoRA op (placeholder: being replaced by the kernels work)."""
from __future__ import annotations

import torch

from .weights import BaseWeight, DenseWeight, Int8Weight, Quant4bitWeight


def dequantize(weight: BaseWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [N, K] as a dense tensor of `dtype` (default: the weight's own dtype)."""
    if isinstance(weight, DenseWeight):
        return weight.weight if dtype is None else weight.weight.to(dtype)
    if isinstance(weight, Int8Weight):
        w = weight.CB.float() * (weight.SCB.float()[:, None] / 127.0)
        return w.to(dtype or torch.float32)
    if isinstance(weight, Quant4bitWeight):
        n, k = weight.shape
        flat = weight.packed.reshape(-1)
        q = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[: n * k].long()  # [N*K]
        absmax = weight.absmax
        if weight.nested is not None:
            nest = weight.nested
            idx = torch.arange(absmax.numel(), device=absmax.device) // nest.blocksize
            absmax = nest.code[absmax.long()] * nest.absmax[idx] + nest.offset
        scale = absmax.float().repeat_interleave(weight.blocksize)[: n * k]
        w = weight.code.float()[q] * scale
        return w.reshape(n, k).to(dtype or weight.dtype)
    raise TypeError(f"unknown base weight type {type(weight).__name__}")
