"""Two small kernels on the fused kernels' own building blocks, so tests can see those exactly:
`dequantize` (W through the tile loader: what the fused kernels multiply by; also for merges) and
`dropout_mask` (the in-kernel Philox mask, to compare bit for bit with reference.dropout_mask)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .tiles import dropout_keep, load_w_tile, row_ptrs


@triton.jit
def dequantize_kernel(
    # pointers
    out_ptr,
    # the base weight (tiles.py)
    w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, stride_wn, stride_wk,
    # sizes
    N, K,
    # weight format
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
    # meta-parameters
    OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = load_w_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                    stride_wn, stride_wk, offs_n, k0, N, K, FMT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE,
                    K_EVEN, ALIGNED, W_DTYPE, OUT, BLOCK_N, BLOCK_K)
    tl.store(row_ptrs(out_ptr, offs_n, K) + offs_k[None, :], w, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize(weight, dtype: torch.dtype, out: torch.Tensor = None) -> torch.Tensor:
    """W [N, K] in `dtype` (fp16 / bf16 / fp32) through the kernels' tile loader, into `out` [N, K]
    (contiguous) when given."""
    from .launch import device_of, format_constexprs, tl_dtype

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dequantize to fp16/bf16/fp32, got {dtype}")
    wa = weight.kernel_args()
    out = torch.empty((wa.N, wa.K), dtype=dtype, device=wa.w.device) if out is None else out
    bn, bk = (32, 64) if interpreting() else (64, 128)
    with device_of(out):
        dequantize_kernel[(triton.cdiv(wa.N, bn), triton.cdiv(wa.K, bk))](
            out, *wa.pointers(), wa.N, wa.K, **format_constexprs(wa), OUT=tl_dtype(dtype),
            BLOCK_N=bn, BLOCK_K=bk)
    return out


@triton.jit
def dropout_mask_kernel(out_ptr, seed_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), offs_m, offs_k, K, p)
    tl.store(row_ptrs(out_ptr, offs_m, K) + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """keep [M, K] bool, drawn by the same `dropout_keep` the fused kernels call."""
    from .launch import device_of

    out = torch.empty((M, K), dtype=torch.int8, device=device)
    seed_t = torch.full((1,), int(seed), dtype=torch.int64, device=device)
    with device_of(out):
        dropout_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 64))](out, seed_t, M, K, float(p),
                                                                       BLOCK_M=32, BLOCK_K=64)
    return out.bool()
