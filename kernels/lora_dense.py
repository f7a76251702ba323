"""Triton LoRA ops on a dense fp16/bf16/fp32 base weight, at any strides.

Implements reference.py's contract for `DenseWeight` with the format-generic fused kernels
(lora_fwd.py, lora_bwd.py, lora_decode.py) specialized by the FMT_DENSE constexpr. W is read
through its strides, so GPT-2's Conv1D (weight stored [in, out], handed over as the view weight.T)
needs no copy. A W in another dtype than x is cast per tile (as F.linear(x, W.to(x.dtype)) would).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import triton_ops
from .lora_tiles import FMT_DENSE
from .triton_common import INT32_MAX, TritonInputError, WeightArgs
from .weights import DenseWeight


def weight_args(weight: DenseWeight) -> WeightArgs:
    """Check W [N, K] (float, 2-D, any non-negative strides) and return the kernels' arguments."""
    if not isinstance(weight, DenseWeight):
        raise TritonInputError(f"lora_dense needs a DenseWeight, got {type(weight).__name__}")
    W = weight.weight
    if W.dtype not in (torch.float16, torch.bfloat16, torch.float32) or W.dim() != 2:
        raise TritonInputError(f"dense W must be a 2-D fp16/bf16/fp32 [N, K] tensor, got {W.dtype} "
                               f"{tuple(W.shape)}")
    N, K = W.shape
    if min(W.stride()) < 0 or (N > 1 and K > 1 and 0 in W.stride()):
        raise TritonInputError(f"dense W has unsupported strides {W.stride()} (broadcast or negative):"
                               " pass a real tensor or its .T view")
    if W.stride(0) * (N - 1) + W.stride(1) * (K - 1) > INT32_MAX:
        raise TritonInputError(f"dense W [{N}, {K}] is too large for int32 indexing: use "
                               "backend='torch'")
    return WeightArgs(N=N, K=K, w=W, s1=W, code=W, code2=W, s2=W, offset=0.0,
                      stride_wn=W.stride(0), stride_wk=W.stride(1), fmt=FMT_DENSE)


def dequantize(weight: DenseWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W [N, K] as a contiguous tensor of `dtype` (default: W's own dtype)."""
    wa = weight_args(weight)
    return triton_ops.dequantize_args(wa, dtype or weight.weight.dtype)


dropout_mask = triton_ops.dropout_mask


# reference.py's contract for this format: the shared launchers, reading the record via weight_args.
lora_forward, lora_backward, unsupported_reason = triton_ops.bind_format(weight_args)
