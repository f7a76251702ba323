"""Triton LoRA ops on a bitsandbytes NF4/FP4 base weight (fp32 or double-quantized absmax).

Implements reference.py's contract for `Quant4bitWeight`: `dequantize`, `dropout_mask`,
`lora_forward`, `lora_backward`, `unsupported_reason`. The kernels are the format-generic ones
(lora_fwd.py, lora_bwd.py, lora_decode.py) specialized by the FMT_4BIT constexpr: this file only
checks bitsandbytes' storage and turns it into kernel arguments (`weight_args`).

Layout (bitsandbytes' GPU layout): W [N, K] flattened row-major, two 4-bit codes per byte, high
nibble first; absmax per `blocksize` consecutive flat elements. Any N, K, any power-of-two
blocksize (blocks may straddle rows): the tile loader indexes absmax per element. bitsandbytes'
CPU-repacked layout (quant_state.packing_format_for_cpu) is rejected with an error.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import triton_ops
from .lora_tiles import FMT_4BIT
from .triton_common import INT32_MAX, TritonInputError, WeightArgs
from .weights import Quant4bitWeight


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def weight_args(weight: Quant4bitWeight) -> WeightArgs:
    """Check bitsandbytes' 4-bit storage and return the kernels' weight arguments (views only)."""
    if not isinstance(weight, Quant4bitWeight):
        raise TritonInputError(f"lora_4bit needs a Quant4bitWeight, got {type(weight).__name__}")
    N, K = (int(s) for s in weight.shape)
    numel = N * K
    if numel > INT32_MAX:
        raise TritonInputError(f"W [{N}, {K}] has {numel} elements; the 4-bit kernels index it with "
                               "int32 (< 2**31): use backend='torch'")
    absmax = weight.absmax
    if absmax.dim() != 1 or absmax.dtype not in (torch.float32, torch.uint8):
        raise TritonInputError(
            f"4-bit absmax is {absmax.dtype} {tuple(absmax.shape)}; bitsandbytes' GPU layout has a 1-D"
            " fp32 (or uint8 when double-quantized) absmax. A 2-D bf16 absmax is bitsandbytes' "
            "CPU-repacked layout (quant_state.packing_format_for_cpu, made when Linear4bit.forward "
            "ran on CPU in eval mode): reload the weight, or use backend='torch'")
    packed = weight.packed
    if packed.dtype != torch.uint8:
        if not packed.is_contiguous():
            raise TritonInputError(f"packed 4-bit storage ({packed.dtype}) must be contiguous")
        packed = packed.view(torch.uint8)  # bnb's quant_storage may be another dtype: same bytes
    if not packed.is_contiguous():
        raise TritonInputError(f"packed 4-bit weight must be contiguous (strides {packed.stride()})")
    packed = packed.reshape(-1)  # [(N*K + 1) // 2] bytes
    if packed.numel() != (numel + 1) // 2:
        raise TritonInputError(f"packed 4-bit weight has {packed.numel()} bytes, W [{N}, {K}] needs "
                               f"{(numel + 1) // 2}: the weight does not match its quant state")
    bs = int(weight.blocksize)
    if not _pow2(bs):
        raise TritonInputError(f"4-bit blocksize {bs} is not a power of two (bitsandbytes uses 64)")
    n_blocks = -(-numel // bs)
    if absmax.numel() != n_blocks:
        raise TritonInputError(f"absmax has {absmax.numel()} entries, W [{N}, {K}] with blocksize "
                               f"{bs} needs {n_blocks}")
    code = weight.code
    if code.dtype != torch.float32 or code.numel() != 16:
        raise TritonInputError(f"4-bit code table must be 16 fp32 values, got {code.dtype} "
                               f"{tuple(code.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonInputError(f"4-bit weight dtype {weight.dtype} is not fp16/bf16/fp32")
    dev = packed.device
    for name, t in (("absmax", absmax), ("code", code)):
        if t.device != dev:
            raise TritonInputError(f"4-bit {name} is on {t.device}, packed weight on {dev}")
    nest = weight.nested
    if nest is None:
        if absmax.dtype != torch.float32:
            raise TritonInputError("4-bit absmax is uint8 but no nested (double-quant) state is given")
        code2, s2, offset, bs2 = code, code, 0.0, 256
    else:
        if absmax.dtype != torch.uint8:
            raise TritonInputError(f"double-quantized absmax must be uint8 codes, got {absmax.dtype}")
        bs2 = int(nest.blocksize)
        if not _pow2(bs2):
            raise TritonInputError(f"nested absmax blocksize {bs2} is not a power of two")
        code2, s2 = nest.code, nest.absmax.reshape(-1)
        if code2.dtype != torch.float32 or code2.numel() != 256:
            raise TritonInputError(f"nested code must be 256 fp32 values, got {code2.dtype} "
                                   f"{tuple(code2.shape)}")
        if s2.dtype != torch.float32 or s2.numel() != -(-n_blocks // bs2):
            raise TritonInputError(f"nested absmax must be {-(-n_blocks // bs2)} fp32 values, got "
                                   f"{s2.dtype} {tuple(s2.shape)}")
        for name, t in (("nested code", code2), ("nested absmax", s2)):
            if t.device != dev:
                raise TritonInputError(f"4-bit {name} is on {t.device}, packed weight on {dev}")
        offset = float(nest.offset)
    return WeightArgs(N=N, K=K, w=packed, s1=absmax, code=code, code2=code2, s2=s2, offset=offset,
                      stride_wn=0, stride_wk=0, fmt=FMT_4BIT, nested=nest is not None, bs=bs,
                      bs2=bs2, k_even=K % 2 == 0, w_dtype=weight.dtype)


def dequantize(weight: Quant4bitWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W [N, K] in `dtype` (default weight.dtype), bit-exact with bnb's dequantize_4bit. For merges."""
    return triton_ops.dequantize_args(weight_args(weight), dtype or weight.dtype)


dropout_mask = triton_ops.dropout_mask


# reference.py's contract for this format: the shared launchers, reading the record via weight_args.
lora_forward, lora_backward, unsupported_reason = triton_ops.bind_format(weight_args)
