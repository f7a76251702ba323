"""A dense base weight W [N, K] in any float dtype, at any strides."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import FLOAT_DTYPES, FMT_DENSE, INT32_MAX, KernelArgs, Unsupported


@dataclass(frozen=True)
class DenseWeight:
    """W [N, K]. May be a strided view (GPT-2's Conv1D stores [K, N] and hands over weight.T).

    Holds the layer's Parameter itself, so a dense base being trained gets its gradient.
    """

    weight: torch.Tensor  # [N, K]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def check(self) -> tuple[int, int]:
        """(N, K). Not memoised: a Parameter's `.data` may be swapped under the record."""
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"DenseWeight.weight must be a 2-D tensor [N, K], got {getattr(w, 'shape', type(w))}")
        if w.dtype not in FLOAT_DTYPES:
            raise ValueError(f"DenseWeight.weight has dtype {w.dtype}; supported: {FLOAT_DTYPES}")
        return tuple(w.shape)

    def kernel_args(self) -> KernelArgs:
        """W read through its strides (no copy); a W in another dtype than x is cast per tile.
        Memoised on the record (several launch steps ask for it)."""
        done = self.__dict__.get("_kernel_args")
        if done is not None:
            return done
        W = self.weight
        N, K = W.shape
        if W.dtype == torch.float64:
            raise Unsupported("the Triton kernels read fp16/bf16/fp32 weights, the dense W is float64")
        if min(W.stride()) < 0 or (N > 1 and K > 1 and 0 in W.stride()):
            raise Unsupported(f"dense W has broadcast or negative strides {W.stride()}: pass a real tensor "
                              "or its .T view")
        if W.stride(0) * (N - 1) + W.stride(1) * (K - 1) > INT32_MAX:
            raise Unsupported(f"dense W [{N}, {K}] spans more than 2**31 elements (int32 offsets)")
        done = KernelArgs(N=N, K=K, fmt=FMT_DENSE, w=W, scale=W, code=W, nested_code=W, nested_absmax=W,
                          stride_wn=W.stride(0), stride_wk=W.stride(1))
        object.__setattr__(self, "_kernel_args", done)
        return done
