"""The "dequant-mm" strategy (large M: training, prefill): dequantize W once per pass, multiply with
cuBLAS, and run the LoRA terms as thin passes that each read their big operand once.

Forward, with u = dropout(x) @ A^T (the chain rule is kernels/autograd.py's):
    W = dequantize(weight)                           [N, K] x.dtype, the shared workspace (dequant.py)
    u = down_projection(x, A)                        [M, r] fp32, the dropout mask drawn once (forward.py)
    y = bias + scaling * u @ B^T                     `lora_up_kernel`: one write of y, fp32 math
    y += x @ W^T                                     cuBLAS addmm_ (beta = 1: y is read in its epilogue)
Backward, with v = g @ B, c = scaling / (1 - p), keep the mask redrawn from the seed:
    v, dB = g @ B, scaling * g^T @ u                 `lora_grad_out_kernel`: one pass over g
    dx = c * keep * (v @ A);  dA = c * v^T @ (keep * x)   `lora_grad_in_kernel`: one pass over x
    W = dequantize(weight);  dx += g @ W             cuBLAS addmm_ (the workspace was overwritten by
                                                     later layers' forwards: dequantized again)
Precision: the LoRA term is rounded to x.dtype once before cuBLAS adds it (two roundings of y in
all, where the fused kernels round once); u, v, dA, dB as in the fused kernels (tf32 products with
the fp32 u and v). cuBLAS accumulates x @ W^T in fp32.

Why this beats dequantizing inside the GEMM's K loop at large M: every weight tile is then
re-dequantized M / BLOCK_M times, and the compiled loop issues ~27 instructions per weight element
(NOTES.md), while here W is decoded once per pass at memory speed (~10 per element, 2.5 bytes of
traffic) and the GEMM is cuBLAS's. On CPU under Triton's interpreter the same code runs torch's
CPU matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs, interpreting
from .dequant import dequantize_into_workspace
from .forward import down_projection
from .tiles import bias_row, cvt, dropout_keep, mask_mul, mma, row_ptrs, up_projection


@triton.jit
def lora_up_kernel(
    # pointers
    y_ptr, u_ptr, b_ptr, bias_ptr,
    # sizes
    M, N, r,
    # strides
    stride_ym, stride_um, stride_bn, stride_br,
    scaling,
    # meta-parameters
    HAS_BIAS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y tile = bias + scaling * u @ B^T, rounded once to y's dtype."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // num_n, tl.program_id(0) % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, R)
    OUT = y_ptr.dtype.element_ty
    u = tl.load(row_ptrs(u_ptr, offs_m, stride_um) + offs_r[None, :],
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < r), other=0.0)  # [BM, R] fp32
    y = scaling * up_projection(u, b_ptr, offs_n, offs_r, N, r, stride_bn, stride_br)  # [BM, BN]
    if HAS_BIAS:
        y += bias_row(bias_ptr, offs_n, N, OUT)
    tl.store(row_ptrs(y_ptr, offs_m, stride_ym) + offs_n[None, :], cvt(y, OUT),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def lora_grad_out_kernel(
    # pointers
    g_ptr, u_ptr, b_ptr, v_ptr, db_ptr,
    # sizes
    M, N, r, N_PER_PROG,
    # strides
    stride_gm, stride_um, stride_bn, stride_br, stride_vm,
    scaling,
    # meta-parameters
    R: tl.constexpr, ATOMIC_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For one row block and one N range: v += g @ B (a store, or fp32 atomics when N is split over
    programs: ATOMIC_V) and dB[n] += scaling * g[m-block, n]^T @ u[m-block] (fp32 atomics)."""
    pid_m = tl.program_id(0)
    n_lo = tl.program_id(1) * N_PER_PROG
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_r = tl.arange(0, R)
    m_ok = offs_m < M
    ACT = g_ptr.dtype.element_ty
    g_rows = row_ptrs(g_ptr, offs_m, stride_gm)  # [BM, 1]
    u = tl.load(row_ptrs(u_ptr, offs_m, stride_um) + offs_r[None, :], mask=m_ok[:, None] & (offs_r[None, :] < r),
                other=0.0)  # [BM, R] fp32
    acc_v = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for n0 in range(n_lo, tl.minimum(n_lo + N_PER_PROG, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        gt = tl.load(g_rows + offs_n[None, :], mask=m_ok[:, None] & (offs_n[None, :] < N), other=0.0)  # [BM, BN]
        rn_mask = (offs_n[:, None] < N) & (offs_r[None, :] < r)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=rn_mask, other=0.0)
        acc_v = mma(gt, cvt(b, ACT), acc_v)  # [BM, R]
        db = tl.dot(tl.trans(gt).to(tl.float32), u, input_precision="tf32")  # [BN, R]
        tl.atomic_add(db_ptr + offs_n[:, None] * r + offs_r[None, :], db * scaling, mask=rn_mask)
    v_ptrs = row_ptrs(v_ptr, offs_m, stride_vm) + offs_r[None, :]
    if ATOMIC_V:
        tl.atomic_add(v_ptrs, acc_v, mask=m_ok[:, None] & (offs_r[None, :] < r))
    else:
        tl.store(v_ptrs, acc_v, mask=m_ok[:, None] & (offs_r[None, :] < r))


@triton.jit
def lora_grad_in_kernel(
    # pointers
    x_ptr, v_ptr, a_ptr, dx_ptr, da_ptr, seed_ptr,
    # sizes
    M, K, r,
    # strides
    stride_xm, stride_vm, stride_ar, stride_ak, stride_dxm,
    scale, p,
    # meta-parameters
    DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For one [BLOCK_M, BLOCK_K] tile: dx = scale * keep * (v @ A) (written: cuBLAS adds g @ W after)
    and dA[:, k-block] += scale * v^T @ (keep * x) (fp32 atomics); scale = scaling / (1 - p)."""
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = tl.program_id(0) // num_k, tl.program_id(0) % num_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    offs_r = tl.arange(0, R)
    mk_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    ACT = x_ptr.dtype.element_ty
    v = tl.load(row_ptrs(v_ptr, offs_m, stride_vm) + offs_r[None, :],
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < r), other=0.0)  # [BM, R] fp32
    x = tl.load(row_ptrs(x_ptr, offs_m, stride_xm) + offs_k[None, :], mask=mk_mask, other=0.0)  # [BM, BK]
    if DROPOUT:
        # 0 / 1 floats, not a bool mask: it is read in two layouts (backward.py says why)
        keep_f = tl.where(dropout_keep(tl.load(seed_ptr), offs_m, offs_k, K, p), 1.0, 0.0)  # [BM, BK]
        x = mask_mul(x, keep_f)
    da = tl.dot(tl.trans(v), x.to(tl.float32), input_precision="tf32")  # [R, BK]
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da * scale,
                  mask=(offs_r[:, None] < r) & (offs_k[None, :] < K))
    if COMPUTE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=(offs_r[:, None] < r) & (offs_k[None, :] < K), other=0.0)  # [R, BK]
        lora = tl.dot(v, a.to(tl.float32), input_precision="tf32") * scale  # [BM, BK]
        if DROPOUT:
            lora = lora * keep_f
        tl.store(row_ptrs(dx_ptr, offs_m, stride_dxm) + offs_k[None, :], cvt(lora, ACT), mask=mk_mask)


# (BLOCK_M, BLOCK_N or BLOCK_K, warps) of the three LoRA kernels, for R <= 64 and R = 128 (where
# grad_out's two [BLOCK_M, R] / [BLOCK_N, R] accumulators spill with 4 warps:
# benchmarks/aot_compile.py); the interpreter's are small
GPU_TILES = {"up": ((64, 128, 4), (64, 128, 4)), "grad_out": ((64, 64, 4), (64, 64, 8)),
             "grad_in": ((64, 64, 4), (64, 64, 4))}
INTERPRETER_TILES = {"up": (16, 32, 4), "grad_out": (16, 32, 4), "grad_in": (16, 32, 4)}


def tiles(kernel: str, R: int) -> tuple[int, int, int]:
    if interpreting():
        return INTERPRETER_TILES[kernel]
    return GPU_TILES[kernel][R >= 128]


def mm_forward(x: torch.Tensor, weight, bias: Optional[torch.Tensor], A: Optional[torch.Tensor],
               B: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
               out: Optional[torch.Tensor] = None, u_out: Optional[torch.Tensor] = None):
    """(y [M, N] x.dtype, u [M, r] fp32 or None); inputs checked by launch.py. out / u_out: buffers
    to write (tests pass NaN-filled ones)."""
    M, K = x.shape
    N = weight.kernel_args().N
    r = 0 if A is None else A.shape[0]
    W = dequantize_into_workspace(weight, x.dtype)  # [N, K]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    u = None
    if r:
        u = torch.empty((M, r), dtype=torch.float32, device=x.device) if u_out is None else u_out
        down_projection(x, A, dropout_p, seed, u)
        bm, bn, warps = tiles("up", configs.rank_block(r))
        lora_up_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
            y, u, B, y if bias is None else bias,
            M, N, r,
            y.stride(0), u.stride(0), B.stride(0), B.stride(1),
            float(scaling),
            HAS_BIAS=bias is not None, R=configs.rank_block(r), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        y.addmm_(x, W.t())  # y = x @ W^T + (bias + scaling * u @ B^T), cuBLAS reads y in its epilogue
    elif bias is not None:
        torch.addmm(bias.to(x.dtype), x, W.t(), out=y)
    else:
        torch.mm(x, W.t(), out=y)
    return y, u


def mm_backward(g: torch.Tensor, x: torch.Tensor, u: Optional[torch.Tensor], weight, A: Optional[torch.Tensor],
                B: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                needs_dx: bool = True, dx_out: Optional[torch.Tensor] = None, n_splits: Optional[int] = None):
    """(dx [M, K] x.dtype or None, dA [r, K] A.dtype, dB [N, r] B.dtype); g [M, N] contiguous in
    x.dtype. dx_out: a buffer to write (tests pass a NaN-filled one); n_splits: how many programs
    share each row block's pass over g (default: enough for two programs per SM)."""
    from .decode import sm_count

    M, K = x.shape
    N = g.shape[1]
    r = 0 if A is None else A.shape[0]
    dx = dA = dB = None
    if needs_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if dx_out is None else dx_out
    if r and M:
        R = configs.rank_block(r)
        bm, bn, warps = tiles("grad_out", R)
        S = n_splits or max(1, min(triton.cdiv(2 * sm_count(x.device), triton.cdiv(M, bm)), triton.cdiv(N, 4 * bn)))
        n_per = triton.cdiv(triton.cdiv(N, S), bn) * bn
        S = triton.cdiv(N, n_per)
        v = (torch.zeros if S > 1 else torch.empty)((M, r), dtype=torch.float32, device=x.device)
        dB = torch.zeros((N, r), dtype=torch.float32, device=x.device)
        lora_grad_out_kernel[(triton.cdiv(M, bm), S)](
            g, u, B, v, dB,
            M, N, r, n_per,
            g.stride(0), u.stride(0), B.stride(0), B.stride(1), v.stride(0),
            float(scaling),
            R=R, ATOMIC_V=S > 1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        dA = torch.zeros((r, K), dtype=torch.float32, device=x.device)
        bm, bk, warps = tiles("grad_in", R)
        lora_grad_in_kernel[(triton.cdiv(M, bm) * triton.cdiv(K, bk),)](
            x, v, A, x if dx is None else dx, dA, x if seed is None else seed,
            M, K, r,
            x.stride(0), v.stride(0), A.stride(0), A.stride(1), K if dx is None else dx.stride(0),
            float(scaling) / (1.0 - dropout_p), float(dropout_p),
            DROPOUT=dropout_p > 0, COMPUTE_DX=needs_dx, R=R, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps)
        dA, dB = dA.to(A.dtype), dB.to(B.dtype)
    elif r:
        dA = torch.zeros((r, K), dtype=A.dtype, device=x.device)
        dB = torch.zeros((N, r), dtype=B.dtype, device=x.device)
    if needs_dx:
        W = dequantize_into_workspace(weight, x.dtype)  # [N, K]
        if r and M:
            dx.addmm_(g, W)  # dx = g @ W + the LoRA term written above
        else:
            torch.mm(g, W, out=dx)
    return dx, dA, dB
