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


# ---------------------------------------------------------------------------------------------
# Validation: a clear error naming the problem, instead of a wrong answer or a crash in a kernel
# ---------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_weight(weight: "BaseWeight") -> tuple[int, int]:
    """Check that a base weight record is self-consistent; returns (N, K).

    Raises TypeError for an unknown record and ValueError naming the inconsistent field otherwise
    (wrong dtype, size, device, or a non-contiguous quantized buffer, which would be read in the
    wrong order).
    """
    if isinstance(weight, DenseWeight):
        w = weight.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            _fail(f"DenseWeight.weight must be a 2-D tensor [N, K], got {getattr(w, 'shape', type(w))}")
        if w.dtype not in FLOAT_DTYPES:
            _fail(f"DenseWeight.weight has dtype {w.dtype}; supported: {FLOAT_DTYPES}")
        return weight.shape
    if isinstance(weight, Int8Weight):
        cb, scb = weight.CB, weight.SCB
        if cb.dtype != torch.int8 or cb.dim() != 2:
            _fail(f"Int8Weight.CB must be int8 [N, K], got {cb.dtype} {tuple(cb.shape)}")
        n, k = cb.shape
        if scb.numel() != n or not scb.is_floating_point():
            _fail(f"Int8Weight.SCB must be a float [N={n}] row absmax, got {scb.dtype} {tuple(scb.shape)}")
        if not (cb.is_contiguous() and scb.is_contiguous()):
            _fail("Int8Weight.CB / SCB must be contiguous (bitsandbytes' row-major layout)")
        if scb.device != cb.device:
            _fail(f"Int8Weight.SCB is on {scb.device} but CB on {cb.device}: move both to one device")
        return n, k
    if isinstance(weight, Quant4bitWeight):
        return _check_4bit(weight)
    raise TypeError(f"unknown base weight type {type(weight).__name__}: expected DenseWeight, "
                    "Quant4bitWeight or Int8Weight (kernels.weights)")


def _check_4bit(w: "Quant4bitWeight") -> tuple[int, int]:
    if len(w.shape) != 2:
        _fail(f"Quant4bitWeight.shape must be (N, K), got {w.shape}")
    n, k = (int(s) for s in w.shape)
    numel = n * k
    if w.quant_type not in ("nf4", "fp4"):
        _fail(f"Quant4bitWeight.quant_type={w.quant_type!r}: supported layouts are 'nf4' and 'fp4'")
    if w.blocksize <= 0:
        _fail(f"Quant4bitWeight.blocksize={w.blocksize}: must be positive")
    if w.dtype not in FLOAT_DTYPES:
        _fail(f"Quant4bitWeight.dtype={w.dtype}: must be a float dtype")
    if not w.packed.is_contiguous():
        _fail("Quant4bitWeight.packed must be contiguous (it is read as a flat byte buffer)")
    if w.packed.numel() * w.packed.element_size() != (numel + 1) // 2:
        _fail(f"Quant4bitWeight.packed holds {w.packed.numel() * w.packed.element_size()} bytes; "
              f"shape {w.shape} packed two per byte needs {(numel + 1) // 2}")
    n_blocks = -(-numel // w.blocksize)
    if w.absmax.dim() != 1 and w.nested is None and w.absmax.dtype != torch.float32:
        _fail("Quant4bitWeight.absmax is 2-D and not fp32: that is bitsandbytes' CPU-repacked layout "
              "(quant_state.packing_format_for_cpu, made when Linear4bit.forward ran on CPU in eval mode "
              "without grad); reload the weight or never let bitsandbytes' forward run first")
    if w.absmax.numel() != n_blocks or not w.absmax.is_contiguous():
        _fail(f"Quant4bitWeight.absmax must be contiguous with {n_blocks} entries (one per "
              f"{w.blocksize} elements), got {tuple(w.absmax.shape)}")
    if w.code.numel() != 16:
        _fail(f"Quant4bitWeight.code must be the 16-entry {w.quant_type} table, got {w.code.numel()}")
    if w.nested is None:
        if w.absmax.dtype != torch.float32:
            _fail(f"Quant4bitWeight.absmax is {w.absmax.dtype} without `nested`: plain absmax must be fp32 "
                  "(uint8 absmax means double quantization: pass nested=NestedAbsmax(...); a bf16 absmax "
                  "is bitsandbytes' CPU-repacked layout, quant_state.packing_format_for_cpu: reload the weight)")
    else:
        nest = w.nested
        if w.absmax.dtype != torch.uint8:
            _fail(f"Quant4bitWeight.absmax must be uint8 codes with nested absmax, got {w.absmax.dtype}")
        if nest.code.numel() != 256 or nest.blocksize <= 0 or nest.absmax.numel() != -(-n_blocks // nest.blocksize):
            _fail(f"NestedAbsmax does not fit {n_blocks} absmax codes: code has {nest.code.numel()} entries "
                  f"(need 256), absmax {nest.absmax.numel()} (need ceil({n_blocks}/{nest.blocksize}))")
    devices = {t.device for t in (w.packed, w.absmax, w.code)}
    if w.nested is not None:
        devices |= {w.nested.code.device, w.nested.absmax.device}
    if len(devices) > 1:
        _fail(f"Quant4bitWeight buffers are on several devices {sorted(map(str, devices))}: move them to one")
    return n, k
