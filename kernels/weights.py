"""Descriptions of a base weight W [N=out, K=in] that the LoRA ops read.

`kernels` imports nothing of ours, so it cannot know about `LoraLinear` or bitsandbytes modules:
`lora_core.quant` turns a base layer into one of these plain records, and every op (the PyTorch
reference and the Triton kernels) reads only them. They hold views of the layer's own storage,
never copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class DenseWeight:
    """A dense W [N, K] in any float dtype. May be a strided view (GPT-2 Conv1D gives weight.T)."""

    weight: torch.Tensor  # [N, K]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def device(self) -> torch.device:
        return self.weight.device


@dataclass(frozen=True)
class NestedAbsmax:
    """bitsandbytes' double quantization of the 4-bit absmax (QuantState.state2 + offset).

    absmax_f32[i] = code[qabsmax[i]] * absmax[i // blocksize] + offset
    """

    code: torch.Tensor  # fp32 [256]
    absmax: torch.Tensor  # fp32 [ceil(n_blocks / blocksize)]
    blocksize: int  # 256 in bitsandbytes
    offset: float


@dataclass(frozen=True)
class Quant4bitWeight:
    """bitsandbytes NF4/FP4 storage (Params4bit + QuantState), bitsandbytes' GPU layout.

    W is flattened row-major (flat index n*K + k), packed two per byte: flat element 2j is the HIGH
    nibble of byte j, 2j+1 the low one. w = code[q] * absmax[flat // blocksize].
    """

    packed: torch.Tensor  # uint8, (N*K + 1)//2 bytes, any shape (bnb stores [bytes, 1]); read flat
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] codes when `nested` is set
    code: torch.Tensor  # fp32 [16]: the NF4 or FP4 table
    blocksize: int  # consecutive flat elements sharing one absmax (64 by default)
    shape: tuple[int, int]  # (N, K)
    quant_type: str  # "nf4" | "fp4"
    dtype: torch.dtype  # dtype W was quantized from; what dequantization produces by default
    nested: Optional[NestedAbsmax] = None

    @property
    def device(self) -> torch.device:
        return self.packed.device


@dataclass(frozen=True)
class Int8Weight:
    """bitsandbytes LLM.int8() storage (Int8Params): W = CB * SCB[:, None] / 127."""

    CB: torch.Tensor  # int8 [N, K]
    SCB: torch.Tensor  # fp32 [N]: per-row absmax

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.CB.shape)

    @property
    def device(self) -> torch.device:
        return self.CB.device


BaseWeight = Union[DenseWeight, Quant4bitWeight, Int8Weight]
