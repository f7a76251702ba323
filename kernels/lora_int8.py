"""Triton LoRA ops on a bitsandbytes LLM.int8() base weight: W = CB * SCB[:, None] * (1/127).

Implements reference.py's contract for `Int8Weight` with the format-generic fused kernels
(lora_fwd.py, lora_bwd.py, lora_decode.py) specialized by the FMT_INT8 constexpr; this file checks
the storage and builds the kernel arguments. Unlike bitsandbytes' own int8 matmul, activations are
NOT quantized and no outlier threshold applies: W is dequantized exactly (fp32, then x.dtype) inside
the K loop, so results are closer to the dense layer than bnb's (see DESIGN.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import triton_ops
from .lora_tiles import FMT_INT8
from .triton_common import INT32_MAX, TritonInputError, WeightArgs
from .weights import Int8Weight


def weight_args(weight: Int8Weight) -> WeightArgs:
    """Check CB [N, K] int8 and SCB [N] fp32 and return the kernels' weight arguments (views)."""
    if not isinstance(weight, Int8Weight):
        raise TritonInputError(f"lora_int8 needs an Int8Weight, got {type(weight).__name__}")
    CB, SCB = weight.CB, weight.SCB
    if CB.dtype != torch.int8 or CB.dim() != 2:
        raise TritonInputError(f"int8 CB must be a 2-D int8 [N, K] tensor, got {CB.dtype} "
                               f"{tuple(CB.shape)}")
    N, K = CB.shape
    if SCB is None or SCB.dtype != torch.float32 or SCB.numel() != N:
        raise TritonInputError(f"int8 SCB must be fp32 [N={N}] (bnb's per-row absmax), got "
                               f"{getattr(SCB, 'dtype', None)} {tuple(getattr(SCB, 'shape', ()))}")
    if SCB.device != CB.device:
        raise TritonInputError(f"int8 SCB is on {SCB.device}, CB on {CB.device}")
    if max(abs(CB.stride(0)), abs(CB.stride(1))) * max(N, K) > INT32_MAX:
        raise TritonInputError(f"int8 CB [{N}, {K}] is too large for int32 indexing: use "
                               "backend='torch'")
    SCB = SCB.reshape(-1)
    if not SCB.is_contiguous():
        SCB = SCB.contiguous()  # N floats: a copy this small is not a [out, in] tensor
    return WeightArgs(N=N, K=K, w=CB, s1=SCB, code=SCB, code2=SCB, s2=SCB, offset=0.0,
                      stride_wn=CB.stride(0), stride_wk=CB.stride(1), fmt=FMT_INT8)


def dequantize(weight: Int8Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W [N, K] in `dtype` (default fp32, as bnb's int8_vectorwise_dequant), bit-exact."""
    return triton_ops.dequantize_args(weight_args(weight), dtype or torch.float32)


dropout_mask = triton_ops.dropout_mask


# reference.py's contract for this format: the shared launchers, reading the record via weight_args.
lora_forward, lora_backward, unsupported_reason = triton_ops.bind_format(weight_args)
