"""The "fused" strategy's forward (kept for study: kernels/triton/strategy.py), one launch per layer,
any base-weight format (tiles.py).

    y [M, N] = x @ deq(W)^T + bias + scaling * (dropout(x) @ A^T) @ B^T       (x.dtype)
    u [M, r] = dropout(x) @ A^T                                                (fp32, for backward)

Each program owns a [BLOCK_M, BLOCK_N] tile of y. Its K loop loads a tile of x, dequantizes the
matching tile of W in registers (the dense W never exists in memory), and feeds both a
[BLOCK_M, BLOCK_N] accumulator (the base GEMM) and a [BLOCK_M, R] accumulator (the LoRA
down-projection, R = r padded to a power of two >= 16); the epilogue adds the up-projection
u @ B^T, scaling and bias and rounds once. The programs of column pid_n == 0 write u.

With dropout (training, p > 0) the down-projection runs first as its own small kernel
(`down_projection`, split-K), and the fused kernel reads u in its epilogue (U_IN): the mask is one
Philox draw per element of x (10 rounds, ~40 integer ops), and drawing it inside the fused K loop
would repeat it in every one of the N / BLOCK_N columns of programs, costing more ALU time than
the GEMM itself. Drawn once, it costs one extra read of x.

Precision: the base GEMM and the down-projection run on tensor cores in x.dtype with fp32
accumulators (A is rounded to x.dtype; x already is); the up-projection runs in tf32 on the fp32
u. Without dropout, recomputing u in every column of programs costs R/BLOCK_N of the main GEMM's
MMA work (6-12%), about what a second pass over x would cost at large M, and saves a launch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs, interpreting
from .tiles import bias_row, cvt, down_partial, grouped_pid, load_w_tile, mma, row_ptrs, up_projection

# Every config autotuning may pick on a GPU (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): H100-sized
# tiles; configs.prune keeps those that fit the device's shared memory at the call's rank.
GPU_CONFIGS = configs.gemm_configs([
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 3),
])


@triton.autotune(configs=configs.active(GPU_CONFIGS),
                 key=["M_BUCKET", "N", "K", "FMT", "NESTED", "HAS_LORA", "U_IN", "R"],
                 prune_configs_by={"early_config_prune": configs.pruner("forward")})
@triton.jit
def lora_forward_kernel(
    # pointers
    x_ptr, y_ptr, u_ptr, bias_ptr, a_ptr, b_ptr,
    # the base weight (tiles.py)
    w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, stride_wn, stride_wk,
    # sizes
    M, N, K, r, M_BUCKET,
    # strides
    stride_xm, stride_ym, stride_um, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    # weight format
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, U_IN: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y tile = x @ deq(W)^T + bias + scaling * u @ B^T; u accumulated in the K loop and written by
    column 0 (U_IN=False), or read from u_ptr (U_IN=True: dropout, see the module doc)."""
    # program ids
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, R)  # [R]
    ACT = x_ptr.dtype.element_ty
    x_rows = row_ptrs(x_ptr, offs_m, stride_xm)  # [BM, 1]

    # K loop: the base GEMM and (without dropout) the down-projection
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x @ W^T
    acc_u = tl.zeros((BLOCK_M, R), dtype=tl.float32)  # x @ A^T
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)  # [BM, BK]
        w = load_w_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                        stride_wn, stride_wk, offs_n, k0, N, K, FMT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE,
                        K_EVEN, ALIGNED, W_DTYPE, ACT, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = mma(x, tl.trans(w), acc)
        if HAS_LORA and not U_IN:
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=(offs_r[None, :] < r) & (offs_k[:, None] < K), other=0.0)  # A^T [BK, R]
            acc_u = mma(x, cvt(a, ACT), acc_u)

    # epilogue: bias, LoRA up-projection, one rounding
    y = acc
    if HAS_BIAS:
        y += bias_row(bias_ptr, offs_n, N, ACT)
    if HAS_LORA:
        u_mask = (offs_m[:, None] < M) & (offs_r[None, :] < r)
        u_ptrs = row_ptrs(u_ptr, offs_m, stride_um) + offs_r[None, :]
        if U_IN:
            u = tl.load(u_ptrs, mask=u_mask, other=0.0)  # [BM, R] fp32
        else:
            u = acc_u
            if pid_n == 0:
                tl.store(u_ptrs, u, mask=u_mask)
        y += scaling * up_projection(u, b_ptr, offs_n, offs_r, N, r, stride_bn, stride_br)
    y_ptrs = row_ptrs(y_ptr, offs_m, stride_ym) + offs_n[None, :]  # M * N may reach 2**31
    tl.store(y_ptrs, cvt(y, ACT), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fused_forward(
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
    """Launch the tiled kernel (inputs checked by launch.py; `wa` = the weight's KernelArgs).
    Returns (y [M, N] x.dtype, u [M, r] fp32 or None).

    seed: int64 [1] device tensor (dropout only). `out` / `u_out` may be given (tests pass
    NaN-filled buffers so any element the kernel fails to write shows up); `config` bypasses
    autotuning (tests run every config of GPU_CONFIGS).
    """
    from .launch import dummy_if_none, format_constexprs

    M, K = x.shape
    N = wa.N
    r = 0 if A is None else A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    u = None
    if r:
        u = torch.empty((M, r), dtype=torch.float32, device=x.device) if u_out is None else u_out
    u_in = r > 0 and dropout_p > 0
    if u_in:  # the mask is Philox per element: draw it once, not once per column of tiles
        down_projection(x, A, dropout_p, seed, u)
    u_, bias_, a, b = dummy_if_none(x, u, bias, A, B)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel = lora_forward_kernel if config is None else lora_forward_kernel.fn
    kernel[grid](
        x, y, u_, bias_, a, b,
        *wa.pointers(),
        M, N, K, max(r, 1), min(configs.next_pow2(M), 8192),
        x.stride(0), y.stride(0), u_.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(scaling),
        **format_constexprs(wa),
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, U_IN=u_in, R=configs.rank_block(max(r, 1)),
        **({} if config is None else config.all_kwargs()),
    )
    return y, u


@triton.jit
def lora_down_kernel(
    # pointers
    x_ptr, a_ptr, u_ptr, seed_ptr,
    # sizes
    M, K, r, K_PER_PROG,
    # strides
    stride_xm, stride_ar, stride_ak, stride_um,
    keep_scale, p,
    # meta-parameters
    DROPOUT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """u[m-block] += dropout(x[m-block, k-range]) @ A[:, k-range]^T, split over K: fp32 atomics into u."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    k_lo = tl.program_id(1) * K_PER_PROG
    offs_r = tl.arange(0, R)  # [R]
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)  # int64: a device tensor, so CUDA-graph replays draw new masks
    acc = down_partial(x_ptr, a_ptr, seed, offs_m, k_lo, tl.minimum(k_lo + K_PER_PROG, K), M, K, r, stride_xm,
                       stride_ar, stride_ak, p, DROPOUT, R, BLOCK_M, BLOCK_K)  # [BM, R]
    u_ptrs = row_ptrs(u_ptr, offs_m, stride_um) + offs_r[None, :]
    tl.atomic_add(u_ptrs, acc * keep_scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < r))


def _down_grid(M: int, R: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, K per program, warps): 4 K tiles per program on a GPU, so small M fills it
    too; at R = 128 eight warps share the [BLOCK_M, R] accumulator and a 64-wide K tile (4 warps
    spill there: benchmarks/aot_compile.py)."""
    if interpreting():
        return (16 if M <= 16 else 32), 64, 64, 4
    bm = 16 if M <= 16 else 64
    bk, warps = (64, 8) if R >= 128 else (128, 4)
    return bm, bk, 4 * bk, warps


def down_projection(x: torch.Tensor, A: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor],
                    u: torch.Tensor) -> torch.Tensor:
    """u [M, r] fp32 = dropout(x) @ A^T with each dropout mask element drawn once; reads x, A once.
    Split over K, fp32 atomics into `u` (zeroed here)."""
    M, K = x.shape
    r = A.shape[0]
    R = configs.rank_block(r)
    bm, bk, k_per, warps = _down_grid(M, R)
    u.zero_()  # atomics target
    lora_down_kernel[(triton.cdiv(M, bm), triton.cdiv(K, k_per))](
        x, A, u, x if seed is None else seed,
        M, K, r, k_per,
        x.stride(0), A.stride(0), A.stride(1), u.stride(0),
        1.0 / (1.0 - dropout_p), float(dropout_p),
        DROPOUT=dropout_p > 0, R=R, BLOCK_M=bm, BLOCK_K=bk,
        num_warps=warps,
    )
    return u
