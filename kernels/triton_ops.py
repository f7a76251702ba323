"""The Triton side of reference.py's contract, for any base-weight format.

The format files (lora_4bit.py, lora_int8.py, lora_dense.py) turn their weight into `WeightArgs`
and call `forward` / `backward` here, which check every input (triton_common) and launch the
fused kernels: lora_fwd.py (tiled, M > 16), lora_decode.py (M <= 16), lora_bwd.py. This module
also holds two small utility kernels that share the same tile code: `dequantize_args` (W for
merges, bit-exact with bitsandbytes) and `dropout_mask` (the in-kernel mask, made visible so tests
can compare it bit-for-bit with reference.dropout_mask).

`bind_format` at the bottom gives each format file its `lora_forward` / `lora_backward` /
`unsupported_reason` from its `weight_args`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .lora_tiles import dropout_keep, load_w_tile
from .triton_common import (TritonInputError, WeightArgs, check_activation, check_bias, check_device,
                            check_dropout, check_grad, check_lora, check_out, interpreting,
                            tl_dtype)


def _check_weight_device(wa: WeightArgs, device: torch.device) -> None:
    check_device("the base weight", wa.w, device)


def forward(x, wa: WeightArgs, bias, A, B, scaling, dropout_p=0.0, seed=None, *, out=None,
            u_out=None):
    """Checked fused forward: (y [M, N] x.dtype, u [M, r] fp32 or None when A is None)."""
    from .lora_fwd import run_forward

    check_activation(x, wa.K)
    _check_weight_device(wa, x.device)
    check_lora(A, B, wa.N, wa.K, x.device)
    check_bias(bias, wa.N, x.device)
    check_dropout(float(dropout_p), seed)
    check_out("out", out, (x.shape[0], wa.N), x.dtype, x.device)
    if A is not None:
        check_out("u_out", u_out, (x.shape[0], A.shape[0]), torch.float32, x.device)
    if x.shape[0] == 0:
        y = torch.empty((0, wa.N), dtype=x.dtype, device=x.device)
        return y, None if A is None else torch.empty((0, A.shape[0]), device=x.device)
    return run_forward(x, wa, bias, A, B, float(scaling), float(dropout_p), seed, out=out,
                       u_out=u_out)


def backward(g, x, u, wa: WeightArgs, A, B, scaling, dropout_p=0.0, seed=None, needs_dx=True, *,
             dx_out=None):
    """Checked fused backward: (dx [M, K] in x.dtype | None, dA [r, K] A.dtype, dB [N, r] B.dtype)."""
    from .lora_bwd import fused_backward

    check_activation(x, wa.K)
    _check_weight_device(wa, x.device)
    r = check_lora(A, B, wa.N, wa.K, x.device)
    check_dropout(float(dropout_p), seed)
    M = x.shape[0]
    check_grad(g, M, wa.N, x.device)
    check_out("dx_out", dx_out, (M, wa.K), x.dtype, x.device)
    if r:
        check_device("u", u, x.device)
        if tuple(u.shape) != (M, r) or not torch.is_floating_point(u):
            raise TritonInputError(f"u must be the float [M={M}, r={r}] tensor forward returned, got "
                                   f"{u.dtype} {tuple(u.shape)}")
    g = g.to(x.dtype).contiguous()  # [M, N]: the kernel reads g rows contiguously in x.dtype
    u = None if u is None else u.contiguous()  # [M, r]
    return fused_backward(g, x, None if not r else u, wa, A, B, float(scaling), float(dropout_p),
                          seed, needs_dx, dx_out=dx_out)


def check_reason(make_args: Callable, x, weight, bias, A, B, dropout_p) -> Optional[str]:
    """Run every launcher check without launching; the first failure's message, or None."""
    try:
        wa = make_args(weight)
        check_activation(x, wa.K)
        _check_weight_device(wa, x.device)
        check_lora(A, B, wa.N, wa.K, x.device)
        check_bias(bias, wa.N, x.device)
        check_dropout(float(dropout_p), 0)
    except (TritonInputError, TypeError) as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------
# Utility kernels sharing the tile code: dequantization (merges) and the dropout mask (tests).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dequant_kernel(out_ptr, w_ptr, s1_ptr, code_ptr, code2_ptr, s2_ptr, w_offset, stride_wn,
                    stride_wk, N, K,
                    FMT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                    K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, OUT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = load_w_tile(w_ptr, s1_ptr, code_ptr, code2_ptr, s2_ptr, w_offset, stride_wn, stride_wk,
                    offs_n, k0, N, K, FMT, NESTED, BS, BS2, K_EVEN, ALIGNED, W_DTYPE, OUT, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize_args(wa: WeightArgs, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` through the kernels' own tile loader (what the fused kernels multiply)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dequantize to fp16/bf16/fp32, got {dtype}")
    out = torch.empty((wa.N, wa.K), dtype=dtype, device=wa.w.device)
    bn, bk = (32, 64) if interpreting() else (64, 128)
    grid = (triton.cdiv(wa.N, bn), triton.cdiv(wa.K, bk))
    _dequant_kernel[grid](out, *wa.kernel_args(), wa.N, wa.K, **wa.constexprs(), OUT=tl_dtype(dtype),
                          BLOCK_N=bn, BLOCK_K=bk)
    return out


@triton.jit
def _mask_kernel(out_ptr, M, K, p, seed, OFFS_64: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, offs_m, offs_k, K, p, OFFS_64)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_mask(seed: int, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """keep [M, K] bool, generated by the same `dropout_keep` the fused kernels call."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_dropout(float(p), seed)
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    bm, bk = 32, 64
    _mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](out, M, K, float(p), int(seed),
                                                          OFFS_64=M * K > 2**31 - 1,
                                                          BLOCK_M=bm, BLOCK_K=bk)
    return out.bool()


# ----------------------------------------------------------------------------------------------
# One format's entry points
# ----------------------------------------------------------------------------------------------

def bind_format(weight_args: Callable) -> tuple[Callable, Callable, Callable]:
    """reference.py's contract (lora_forward, lora_backward, unsupported_reason) for one format file,
    given its `weight_args(weight) -> WeightArgs`, the only thing that differs between formats.
    (`kernels.dispatch` picks the format file from the weight record's type.)"""

    def lora_forward(x, weight, bias, A, B, scaling, dropout_p=0.0, seed=None, *, out=None, u_out=None):
        """(y [M, N] in x.dtype, u [M, r] fp32): reference.lora_forward, fused (lora_fwd.py)."""
        return forward(x, weight_args(weight), bias, A, B, scaling, dropout_p, seed, out=out,
                       u_out=u_out)

    def lora_backward(g, x, u, weight, A, B, scaling, dropout_p=0.0, seed=None, needs_dx=True, *,
                      dx_out=None):
        """(dx [M, K] | None, dA [r, K], dB [N, r]): reference.lora_backward, fused (lora_bwd.py)."""
        return backward(g, x, u, weight_args(weight), A, B, scaling, dropout_p, seed, needs_dx,
                        dx_out=dx_out)

    def unsupported_reason(x, weight, bias, A, B, dropout_p) -> Optional[str]:
        """None when lora_forward / lora_backward accept these inputs, else why not (backend='auto')."""
        return check_reason(weight_args, x, weight, bias, A, B, dropout_p)

    return lora_forward, lora_backward, unsupported_reason
