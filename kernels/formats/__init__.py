"""Base-weight formats: the plain records the LoRA ops read, their checks and their kernel arguments.

`kernels` imports nothing of ours, so it cannot know about `LoraLinear` or bitsandbytes modules:
`lora_core.quant` turns a base layer into one of these records (`Quant4bitWeight.from_bnb` for
bitsandbytes' 4-bit storage), and every backend reads only them. Records hold views of the
layer's own storage, never copies, and are frozen.

One module per format, each with the record, `check()` (shape, dtype, size, device, layout: the
one validation every backend relies on, returning (N, K)) and `kernel_args()` (the generic
arguments the Triton kernels take, or `Unsupported` naming what they cannot read):
    dense.py      DenseWeight      W [N, K] in a float dtype, any strides (GPT-2's Conv1D: weight.T)
    int8.py       Int8Weight       bitsandbytes LLM.int8(): CB int8 [N, K], SCB fp32 [N]
    quant4bit.py  Quant4bitWeight  bitsandbytes NF4 / FP4, fp32 or double-quantized absmax
The matching Triton tile loaders are in kernels/triton/tiles.py; the dequantization math is
specified in kernels/reference.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The `FMT` constexpr of the Triton kernels: which tile loader reads W.
FMT_DENSE, FMT_INT8, FMT_4BIT = 0, 1, 2
# Most elements a kernel indexes with int32 offsets inside one weight (flat 4-bit / strided W).
INT32_MAX = 2**31 - 1


class Unsupported(ValueError):
    """A valid record (or call) the Triton kernels cannot take; the message says why."""


@dataclass(frozen=True)
class KernelArgs:
    """The format-generic weight arguments of every Triton kernel (see triton/tiles.load_w_tile).

    Tensors a format does not use are dummies (never read; a constexpr disables the code).
    """

    N: int
    K: int
    fmt: int  # FMT_*
    w: torch.Tensor  # dense W | int8 CB | flat uint8 bytes of the packed 4-bit codes
    scale: torch.Tensor  # int8 SCB [N] | 4-bit absmax (fp32, or uint8 codes when nested)
    code: torch.Tensor  # 4-bit code table, fp32 [16]
    nested_code: torch.Tensor  # double quantization: fp32 [256] table of the absmax codes
    nested_absmax: torch.Tensor  # double quantization: fp32 absmax of the absmax codes
    nested_offset: float = 0.0
    stride_wn: int = 0  # dense / int8 strides of W [N, K] (4-bit: flat, unused)
    stride_wk: int = 0
    nested: bool = False
    blocksize: int = 64  # 4-bit: consecutive flat elements sharing one absmax
    nested_blocksize: int = 256
    w_dtype: torch.dtype = torch.float32  # 4-bit: what bitsandbytes' dequantization rounds to

    def pointers(self) -> tuple:
        """The weight's positional kernel arguments, in load_w_tile's order."""
        return (self.w, self.scale, self.code, self.nested_code, self.nested_absmax, self.nested_offset,
                self.stride_wn, self.stride_wk)


from .dense import DenseWeight  # noqa: E402  (the records use the names above)
from .int8 import Int8Weight  # noqa: E402
from .quant4bit import NestedAbsmax, Quant4bitWeight  # noqa: E402

BaseWeight = Union[DenseWeight, Quant4bitWeight, Int8Weight]
RECORDS = (DenseWeight, Int8Weight, Quant4bitWeight)

__all__ = ["BaseWeight", "DenseWeight", "Int8Weight", "Quant4bitWeight", "NestedAbsmax", "KernelArgs",
           "Unsupported", "FLOAT_DTYPES", "FMT_DENSE", "FMT_INT8", "FMT_4BIT", "check_weight"]


def check_weight(weight) -> tuple[int, int]:
    """(N, K) of a valid record; TypeError for anything else, ValueError naming a bad field."""
    if not isinstance(weight, RECORDS):
        raise TypeError(f"unknown base weight type {type(weight).__name__}: expected DenseWeight, "
                        "Quant4bitWeight or Int8Weight (kernels.formats)")
    return weight.check()
