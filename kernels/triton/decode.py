"""Small-M (decode, M <= 16) LoRA forward: memory-bound, reads the packed weight exactly once.

At M <= 16 the layer is a GEMV: the time is the time to stream W's bytes (N*K/2 for 4-bit plus
absmax) from HBM, and a tiled GEMM's [128, 128] output tiles would leave most SMs idle. Two
launches instead of one, because every output column needs the whole u = dropout(x) @ A^T:
  1. `forward.down_projection(partial=True)`: S = K/512 programs each store their K range's share
     of u as an [M, r] fp32 slice: reads x and A once (tiny: (M + r) * K elements).
  2. `lora_gemv_kernel`: one program per BLOCK_N output columns, all M <= 16 rows at once (one
     16-row tl.dot tile), walks the full K: each packed byte is read by exactly one program. The
     epilogue sums the S slices of u (program 0 writes u for backward), adds bias +
     scaling * u @ B^T and rounds once.
Many narrow programs (N / BLOCK_N = 128-700 at Llama-7B shapes) keep enough bytes in flight per SM;
BLOCK_K is large (256-1024) so each program issues long coalesced row segments.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .forward import down_projection, n_splits
from .tiles import bias_row, cvt, load_w_tile, mma, row_ptrs, up_projection

MAX_M = 16  # M <= 16 takes this path; tl.dot's smallest tile height, rows >= M are masked

# every config autotuning may pick (tests sweep them all on a GPU)
GPU_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in [(32, 256, 4, 4), (16, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 3),
                                    (16, 512, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (32, 1024, 8, 3)]]
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1)


@triton.autotune(configs=configs.active(GPU_CONFIGS, INTERPRETER_CONFIG),
                 key=["N", "K", "FMT", "NESTED", "HAS_LORA", "R"],
                 prune_configs_by={"early_config_prune": configs.pruner("decode")})
@triton.jit
def lora_gemv_kernel(
    # pointers
    x_ptr, y_ptr, u_ptr, u_parts_ptr, bias_ptr, b_ptr,
    # the base weight (tiles.py)
    w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, stride_wn, stride_wk,
    # sizes
    M, N, K, r, n_split,
    # strides
    stride_xm, stride_ym, stride_um, stride_bn, stride_br,
    scaling,
    # weight format
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[:, n-block] = x @ deq(W[n-block])^T + bias + scaling * u @ B[n-block]^T, all M rows.

    u = the sum of the down-projection's n_split partial [M, r] slices at u_parts_ptr; program 0
    also writes it to u_ptr (saved for backward)."""
    # program ids
    offs_m = tl.arange(0, BLOCK_M)  # [BM] (M <= BM)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, R)
    ACT = x_ptr.dtype.element_ty
    x_rows = row_ptrs(x_ptr, offs_m, stride_xm)  # [BM, 1]

    # K loop
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)  # [BM, BK]
        w = load_w_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                        stride_wn, stride_wk, offs_n, k0, N, K, FMT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE,
                        K_EVEN, ALIGNED, W_DTYPE, ACT, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = mma(x, tl.trans(w), acc)

    # epilogue
    y = acc
    if HAS_BIAS:
        y += bias_row(bias_ptr, offs_n, N, ACT)
    if HAS_LORA:
        u_mask = (offs_m[:, None] < M) & (offs_r[None, :] < r)
        u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for s in range(0, n_split):  # fixed order: deterministic
            u += tl.load(u_parts_ptr + s * M * r + offs_m[:, None] * r + offs_r[None, :], mask=u_mask,
                         other=0.0)  # [BM, R] fp32
        if tl.program_id(0) == 0:
            tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :], u, mask=u_mask)
        y += scaling * up_projection(u, b_ptr, offs_n, offs_r, N, r, stride_bn, stride_br)
    tl.store(row_ptrs(y_ptr, offs_m, stride_ym) + offs_n[None, :], cvt(y, ACT),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def decode_forward(
    x: torch.Tensor,
    wa,
    bias: Optional[torch.Tensor],
    A: Optional[torch.Tensor],
    B: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    out: Optional[torch.Tensor] = None,
    u_out: Optional[torch.Tensor] = None,
    config: Optional[triton.Config] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y [M, N] x.dtype, u [M, r] fp32) for M <= 16 (inputs checked by launch.py); `config`
    bypasses autotuning of the GEMV kernel (tests run every config of GPU_CONFIGS)."""
    from .launch import dummy_if_none, format_constexprs

    M, K = x.shape
    assert M <= MAX_M, "decode_forward is the M <= 16 path"
    N = wa.N
    r = 0 if A is None else A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    u = u_parts = None
    n_split = 1
    if r:
        u = torch.empty((M, r), dtype=torch.float32, device=x.device) if u_out is None else u_out
        n_split = n_splits(M, K)
        u_parts = torch.empty((n_split, M, r), dtype=torch.float32, device=x.device)
        down_projection(x, A, dropout_p, seed, u_parts, partial=True)  # [S, M, r] fp32
    u_, u_parts_, bias_, b = dummy_if_none(x, u, u_parts, bias, B)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    kernel = lora_gemv_kernel if config is None else lora_gemv_kernel.fn
    kernel[grid](
        x, y, u_, u_parts_, bias_, b,
        *wa.pointers(),
        M, N, K, max(r, 1), n_split,
        x.stride(0), y.stride(0), u_.stride(0), b.stride(0), b.stride(1),
        float(scaling),
        **format_constexprs(wa),
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, R=configs.rank_block(max(r, 1)), BLOCK_M=MAX_M,
        **({} if config is None else config.all_kwargs()),
    )
    return y, u
