"""What every weight format shares: the float dtypes, the format codes of the Triton kernels' FMT
constexpr, the format-generic kernel arguments, and the "the kernels cannot read this" error."""
from __future__ import annotations

from dataclasses import dataclass

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
