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

from typing import Union

from .common import FLOAT_DTYPES, FMT_4BIT, FMT_DENSE, FMT_INT8, INT32_MAX, KernelArgs, Unsupported
from .dense import DenseWeight
from .int8 import Int8Weight
from .quant4bit import NestedAbsmax, Quant4bitWeight

BaseWeight = Union[DenseWeight, Quant4bitWeight, Int8Weight]
RECORDS = (DenseWeight, Int8Weight, Quant4bitWeight)

__all__ = ["BaseWeight", "DenseWeight", "Int8Weight", "Quant4bitWeight", "NestedAbsmax", "KernelArgs",
           "Unsupported", "FLOAT_DTYPES", "FMT_DENSE", "FMT_INT8", "FMT_4BIT", "INT32_MAX", "check_weight"]


def check_weight(weight) -> tuple[int, int]:
    """(N, K) of a valid record; TypeError for anything else, ValueError naming a bad field."""
    if not isinstance(weight, RECORDS):
        raise TypeError(f"unknown base weight type {type(weight).__name__}: expected DenseWeight, "
                        "Quant4bitWeight or Int8Weight (kernels.formats)")
    return weight.check()
