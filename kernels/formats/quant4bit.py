"""bitsandbytes NF4 / FP4 storage (`Params4bit` + `QuantState`), in bitsandbytes' GPU layout.

W [N, K] is flattened row-major (flat index n*K + k) and packed two codes per byte: flat element 2j
is the HIGH nibble of byte j, 2j+1 the low one; w = code[q] * absmax[flat // blocksize]. With
double quantization (bnb's `compress_statistics`) absmax itself is uint8 codes:
    absmax_f32[i] = nested.code[absmax[i]] * nested.absmax[i // nested.blocksize] + nested.offset
bitsandbytes' CPU-repacked layout (`quant_state.packing_format_for_cpu`, made in place when
`Linear4bit.forward` runs on CPU in eval mode without grad) is a different layout: refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .common import FLOAT_DTYPES, FMT_4BIT, INT32_MAX, KernelArgs, Unsupported

_CPU_REPACKED = ("that is bitsandbytes' CPU-repacked layout (quant_state.packing_format_for_cpu, made when "
                 "Linear4bit.forward ran on CPU in eval mode without grad): reload the weight, or never let "
                 "bitsandbytes' forward run first")


@dataclass(frozen=True)
class NestedAbsmax:
    """bitsandbytes' double quantization of the 4-bit absmax (QuantState.state2 + offset)."""

    code: torch.Tensor  # fp32 [256]
    absmax: torch.Tensor  # fp32 [ceil(n_blocks / blocksize)]
    blocksize: int  # 256 in bitsandbytes
    offset: float


@dataclass(frozen=True)
class Quant4bitWeight:
    """The packed codes and quantization state of W [N, K] (views of bitsandbytes' tensors)."""

    packed: torch.Tensor  # uint8 (or bnb's quant_storage dtype), (N*K + 1)//2 bytes, any shape; read flat
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] codes when `nested` is set
    code: torch.Tensor  # fp32 [16]: the NF4 or FP4 table
    blocksize: int  # consecutive flat elements sharing one absmax (64 by default)
    shape: tuple[int, int]  # (N, K)
    quant_type: str  # "nf4" | "fp4"
    dtype: torch.dtype  # dtype W was quantized from; what dequantization produces by default
    nested: Optional[NestedAbsmax] = None

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "Quant4bitWeight":
        """The record of bitsandbytes' 4-bit storage, made of views (no copies).

        packed: `Params4bit.data` (a Linear4bit's `weight.data`) or `quantize_4bit`'s first output;
        quant_state: its `QuantState`. Raises ValueError for the CPU-repacked layout.
        """
        qs = quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(f"this 4-bit weight is no longer in bitsandbytes' standard layout: {_CPU_REPACKED}")
        nested = None
        if qs.nested:
            s2 = qs.state2
            nested = NestedAbsmax(code=s2.code, absmax=s2.absmax, blocksize=int(s2.blocksize),
                                  offset=float(qs.offset))
        return cls(packed=packed, absmax=qs.absmax, code=qs.code, blocksize=int(qs.blocksize),
                   shape=tuple(int(s) for s in qs.shape), quant_type=qs.quant_type, dtype=qs.dtype,
                   nested=nested)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def packed_bytes(self) -> torch.Tensor:
        """The packed codes as a flat uint8 tensor [(N*K + 1) // 2] (a view)."""
        p = self.packed.reshape(-1)
        return p if p.dtype == torch.uint8 else p.view(torch.uint8)  # bnb's quant_storage: same bytes

    def check(self) -> tuple[int, int]:
        """(N, K), memoised on the record (its tensors' layout does not change)."""
        done = self.__dict__.get("_nk")
        if done is not None:
            return done
        if len(self.shape) != 2:
            raise ValueError(f"Quant4bitWeight.shape must be (N, K), got {self.shape}")
        n, k = (int(s) for s in self.shape)
        numel = n * k
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"Quant4bitWeight.quant_type={self.quant_type!r}: supported layouts are 'nf4' and 'fp4'")
        if self.blocksize <= 0:
            raise ValueError(f"Quant4bitWeight.blocksize={self.blocksize}: must be positive")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"Quant4bitWeight.dtype={self.dtype}: must be a float dtype")
        if not self.packed.is_contiguous():
            raise ValueError("Quant4bitWeight.packed must be contiguous (it is read as a flat byte buffer)")
        n_bytes = self.packed.numel() * self.packed.element_size()
        if n_bytes != (numel + 1) // 2:
            raise ValueError(f"Quant4bitWeight.packed holds {n_bytes} bytes; shape {self.shape} packed two "
                             f"per byte needs {(numel + 1) // 2}: the weight does not match its quant state")
        absmax, nest = self.absmax, self.nested
        if absmax.dim() != 1 and (nest is None or absmax.dtype != torch.uint8):
            raise ValueError(f"Quant4bitWeight.absmax is {absmax.dtype} {tuple(absmax.shape)}, not 1-D: {_CPU_REPACKED}")
        n_blocks = -(-numel // self.blocksize)
        if absmax.numel() != n_blocks or not absmax.is_contiguous():
            raise ValueError(f"Quant4bitWeight.absmax must be contiguous with {n_blocks} entries (one per "
                             f"{self.blocksize} elements), got {tuple(absmax.shape)}")
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"Quant4bitWeight.code must be the 16-entry fp32 {self.quant_type} table, got "
                             f"{self.code.dtype} {tuple(self.code.shape)}")
        if nest is None and absmax.dtype != torch.float32:
            raise ValueError(f"Quant4bitWeight.absmax is {absmax.dtype} without `nested`: plain absmax must be "
                             "fp32 (uint8 absmax means double quantization: pass nested=NestedAbsmax(...); a "
                             f"bf16 absmax is bitsandbytes' CPU-repacked layout)")
        devices = {self.packed.device, absmax.device, self.code.device}
        if nest is not None:
            if absmax.dtype != torch.uint8:
                raise ValueError(f"Quant4bitWeight.absmax must be uint8 codes with nested absmax, got {absmax.dtype}")
            n_outer = -(-n_blocks // nest.blocksize) if nest.blocksize > 0 else -1
            if (nest.code.numel() != 256 or nest.code.dtype != torch.float32 or nest.absmax.numel() != n_outer
                    or nest.absmax.dtype != torch.float32):
                raise ValueError(f"NestedAbsmax does not fit {n_blocks} absmax codes: code is {nest.code.dtype} "
                                 f"with {nest.code.numel()} entries (need fp32, 256), absmax {nest.absmax.dtype} "
                                 f"with {nest.absmax.numel()} (need fp32, ceil({n_blocks}/{nest.blocksize}))")
            devices |= {nest.code.device, nest.absmax.device}
        if len(devices) > 1:
            raise ValueError(f"Quant4bitWeight buffers are on several devices {sorted(map(str, devices))}: "
                             "move them to one")
        object.__setattr__(self, "_nk", (n, k))
        return n, k

    def kernel_args(self) -> KernelArgs:
        """The Triton kernels' arguments (views), memoised on the record."""
        done = self.__dict__.get("_kernel_args")
        if done is not None:
            return done
        N, K = self.check()
        if N * K > INT32_MAX:
            raise Unsupported(f"W [{N}, {K}] has 2**31 elements or more; the 4-bit tile loader indexes the flat "
                              "codes with int32")
        if self.dtype == torch.float64:
            raise Unsupported("a 4-bit weight quantized from float64: the triton kernels round to fp16 / bf16 / fp32")
        if self.blocksize & (self.blocksize - 1):
            raise Unsupported(f"4-bit blocksize {self.blocksize} is not a power of two (bitsandbytes uses 64)")
        nest = self.nested
        if nest is None:
            extra = dict(nested_code=self.code, nested_absmax=self.code)
        else:
            if nest.blocksize & (nest.blocksize - 1):
                raise Unsupported(f"nested absmax blocksize {nest.blocksize} is not a power of two")
            extra = dict(nested_code=nest.code, nested_absmax=nest.absmax.reshape(-1), nested_offset=nest.offset,
                         nested=True, nested_blocksize=nest.blocksize)
        args = KernelArgs(N=N, K=K, fmt=FMT_4BIT, w=self.packed_bytes, scale=self.absmax, code=self.code,
                          blocksize=self.blocksize, w_dtype=self.dtype, **extra)
        object.__setattr__(self, "_kernel_args", args)
        return args
