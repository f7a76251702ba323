"""bitsandbytes LLM.int8() storage (`Int8Params`): W = CB * SCB[:, None] * (1/127).

The kernels dequantize W exactly (fp32, then the activation dtype) inside the K loop. Unlike
bitsandbytes' own int8 matmul, activations are NOT quantized and no outlier threshold applies, so
results are closer to the dense layer than bnb's (the int8 tolerance in tests/lora_core/test_equivalence.py
says by how much).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import FMT_INT8, INT32_MAX, KernelArgs, Unsupported

# bitsandbytes' int8 dequantization multiplies by this fp32 constant (1/127 as bnb writes it) instead
# of dividing by 127; the two differ in the last bit for some values, and bnb is the ground truth.
INT8_INV_127 = 7.874015718698502e-3


@dataclass(frozen=True)
class Int8Weight:
    """CB int8 [N, K] (row-major, as bitsandbytes stores it) and SCB fp32 [N], the row absmax."""

    CB: torch.Tensor  # int8 [N, K]
    SCB: torch.Tensor  # fp32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.CB.shape)

    @property
    def device(self) -> torch.device:
        return self.CB.device

    def check(self) -> tuple[int, int]:
        """(N, K), memoised on the record (its tensors' layout does not change)."""
        done = self.__dict__.get("_nk")
        if done is not None:
            return done
        cb, scb = self.CB, self.SCB
        if cb.dtype != torch.int8 or cb.dim() != 2:
            raise ValueError(f"Int8Weight.CB must be int8 [N, K], got {cb.dtype} {tuple(cb.shape)}")
        n, k = cb.shape
        if scb.numel() != n or scb.dtype != torch.float32:
            raise ValueError(f"Int8Weight.SCB must be a float32 [N={n}] row absmax, got {scb.dtype} "
                             f"{tuple(scb.shape)}")
        if not (cb.is_contiguous() and scb.is_contiguous()):
            raise ValueError("Int8Weight.CB / SCB must be contiguous (bitsandbytes' row-major layout)")
        if scb.device != cb.device:
            raise ValueError(f"Int8Weight.SCB is on {scb.device} but CB on {cb.device}: move both to one device")
        object.__setattr__(self, "_nk", (n, k))
        return n, k

    def kernel_args(self) -> KernelArgs:
        """CB read in place, SCB as the per-row scale; memoised on the record."""
        done = self.__dict__.get("_kernel_args")
        if done is not None:
            return done
        N, K = self.check()
        if N * K > INT32_MAX:
            raise Unsupported(f"int8 CB [{N}, {K}] has 2**31 elements or more (int32 offsets)")
        scb = self.SCB.reshape(-1)
        done = KernelArgs(N=N, K=K, fmt=FMT_INT8, w=self.CB, scale=scb, code=scb, nested_code=scb,
                          nested_absmax=scb, stride_wn=self.CB.stride(0), stride_wk=self.CB.stride(1))
        object.__setattr__(self, "_kernel_args", done)
        return done
