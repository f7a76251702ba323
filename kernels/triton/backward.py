"""The "fused" strategy's backward (kept for study: kernels/triton/strategy.py), one launch per layer,
any base-weight format (tiles.py).

With g = dL/dy [M, N], u = dropout(x) @ A^T [M, r] (saved by forward), keep = the dropout mask
regenerated from the seed, c = scaling / (1 - p) (the chain rule: kernels/autograd.py):
    v  = g @ B                                   [M, r]   (fp32 accumulator, never stored)
    dx = g @ deq(W) + c * keep * (v @ A)          [M, K]   x.dtype
    dA = c * v^T @ (keep * x)                     [r, K]
    dB = scaling * g^T @ u                        [N, r]

Each program owns a [BLOCK_M, BLOCK_K] tile of dx. Its loop runs over N: it loads a tile of g and
the matching tile of W, dequantized in registers (read along N), and accumulates both g @ W and
v = g @ B (the thin [BLOCK_M, R] accumulator). It also adds its share of dB = s * g^T @ u from the
g tile it already holds: the N blocks are dealt round-robin to the programs of the same row block,
so every (m-block, n-block) pair is counted exactly once and no program does all of it. The
epilogue adds the LoRA term to dx and the program's piece of dA = c * v^T @ (keep * x) from one x
tile. dA and dB are summed across programs with fp32 atomics into [r, K] / [N, r] buffers (so
their summation order, and last bits, vary run to run), then cast to the LoRA dtype.

Without dx (the layer's input needs no grad) the grid has one program per row block, which
computes v over all of N and then walks all K blocks for dA: W is never read.

Precision: g @ W and g @ B on tensor cores in x.dtype (B rounded to it), fp32 accumulators; the
products with the fp32 v and u (dx's LoRA term, dA, dB) run in tf32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .tiles import cvt, dropout_keep, grouped_pid, load_w_tile, mask_mul, mma, row_ptrs

# dx tiles [BLOCK_M, BLOCK_K], reduced over BLOCK_N. Every config autotuning may pick on a GPU
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); configs.prune keeps those that fit at the call's rank.
# The last one is the only one that fits an H100's shared memory at r = 128 (160 KiB; NOTES.md).
GPU_CONFIGS = configs.gemm_configs([
    (128, 64, 128, 8, 3), (128, 64, 256, 8, 3), (256, 64, 128, 8, 3), (128, 128, 128, 8, 3),
    (128, 64, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
])


@triton.autotune(configs=configs.active(GPU_CONFIGS),
                 key=["M_BUCKET", "N", "K", "FMT", "NESTED", "HAS_LORA", "COMPUTE_DX", "R"],
                 reset_to_zero=["da_ptr", "db_ptr"],  # atomics: each tuning run starts from zero
                 prune_configs_by={"early_config_prune": configs.pruner("backward")})
@triton.jit
def lora_backward_kernel(
    # pointers
    g_ptr, x_ptr, u_ptr, dx_ptr, da_ptr, db_ptr, a_ptr, b_ptr, seed_ptr,
    # the base weight (tiles.py)
    w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, stride_wn, stride_wk,
    # sizes
    M, N, K, r, M_BUCKET,
    # strides
    stride_gm, stride_xm, stride_um, stride_dxm, stride_ar, stride_ak, stride_bn, stride_br,
    scaling, keep_scale, p,
    # weight format
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
    # meta-parameters
    HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # program ids: one per (row block, dx column block), or per row block without dx
    num_pid_m = tl.cdiv(M, BLOCK_M)
    if COMPUTE_DX:
        num_pid_k = tl.cdiv(K, BLOCK_K)
        pid_m, pid_k = grouped_pid(tl.program_id(0), num_pid_m, num_pid_k, GROUP_M)
        kb_lo = pid_k
        kb_hi = pid_k + 1
    else:
        num_pid_k = 1
        pid_m = tl.program_id(0)
        pid_k = 0
        kb_lo = 0
        kb_hi = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_r = tl.arange(0, R)  # [R]
    m_mask = offs_m < M
    ACT = x_ptr.dtype.element_ty
    g_rows = row_ptrs(g_ptr, offs_m, stride_gm)  # [BM, 1]; M * N may reach 2**31
    if DROPOUT:
        seed = tl.load(seed_ptr)  # int64, the forward's seed

    # N loop: g @ W, v = g @ B, and this program's share of dB = s * g^T @ u
    if COMPUTE_DX:
        acc_dx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # g @ W
    if HAS_LORA:
        acc_v = tl.zeros((BLOCK_M, R), dtype=tl.float32)  # v = g @ B
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        gt = tl.load(g_rows + offs_n[None, :], mask=m_mask[:, None] & (offs_n[None, :] < N),
                     other=0.0)  # [BM, BN]
        if COMPUTE_DX:
            w = load_w_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                            stride_wn, stride_wk, offs_n, pid_k * BLOCK_K, N, K, FMT, NESTED, BLOCKSIZE,
                            NESTED_BLOCKSIZE, K_EVEN, ALIGNED, W_DTYPE, ACT, BLOCK_N, BLOCK_K)  # [BN, BK]
            acc_dx = mma(gt, w, acc_dx)
        if HAS_LORA:
            rn_mask = (offs_n[:, None] < N) & (offs_r[None, :] < r)  # [BN, R]
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=rn_mask, other=0.0)  # [BN, R]
            acc_v = mma(gt, cvt(b, ACT), acc_v)
            if (n0 // BLOCK_N) % num_pid_k == pid_k:  # this program's share of dB
                u = tl.load(row_ptrs(u_ptr, offs_m, stride_um) + offs_r[None, :],
                            mask=m_mask[:, None] & (offs_r[None, :] < r), other=0.0)  # [BM, R]
                db = tl.dot(tl.trans(gt).to(tl.float32), u.to(tl.float32), input_precision="tf32")  # [BN, R]
                tl.atomic_add(db_ptr + offs_n[:, None] * r + offs_r[None, :], db * scaling, mask=rn_mask)

    # epilogue, per dx column block: dA's piece, dx = g @ W + the LoRA term
    x_rows = row_ptrs(x_ptr, offs_m, stride_xm)
    dx_rows = row_ptrs(dx_ptr, offs_m, stride_dxm)
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        mk_mask = m_mask[:, None] & (offs_k[None, :] < K)  # [BM, BK]
        if HAS_LORA:
            x = tl.load(x_rows + offs_k[None, :], mask=mk_mask, other=0.0)  # [BM, BK]
            if DROPOUT:
                # the mask as 0 / 1 floats, applied by multiplication (the same values as the spec's
                # where() for finite inputs): dx's LoRA term reads it in the MMA layout, and a bool
                # mask cannot be relaid out through shared memory (sm_90 compile error otherwise)
                keep_f = tl.where(dropout_keep(seed, offs_m, offs_k, K, p), 1.0, 0.0)  # fp32 [BM, BK]
                x = mask_mul(x, keep_f)
            da = tl.dot(tl.trans(acc_v), x.to(tl.float32), input_precision="tf32")  # [R, BK]
            tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da * (scaling * keep_scale),
                          mask=(offs_r[:, None] < r) & (offs_k[None, :] < K))
        if COMPUTE_DX:
            dx = acc_dx
            if HAS_LORA:
                a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=(offs_r[:, None] < r) & (offs_k[None, :] < K), other=0.0)  # [R, BK]
                lora = tl.dot(acc_v, a.to(tl.float32), input_precision="tf32")  # [BM, BK]
                lora = lora * (scaling * keep_scale)
                if DROPOUT:
                    lora = lora * keep_f
                dx += lora
            tl.store(dx_rows + offs_k[None, :], cvt(dx, ACT), mask=mk_mask)


def fused_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    u: Optional[torch.Tensor],
    wa,
    A: Optional[torch.Tensor],
    B: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    needs_dx: bool = True,
    dx_out: Optional[torch.Tensor] = None,
    config: Optional[triton.Config] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the kernel (inputs checked by launch.py; g contiguous in x.dtype). Returns (dx, dA, dB).

    seed: the forward's int64 [1] device tensor (dropout only). `dx_out` [M, K] x.dtype may be
    given (tests pass a NaN-filled buffer); `config` bypasses autotuning (tests run every config).
    """
    from .launch import dummy_if_none, format_constexprs

    M, K = x.shape
    N = wa.N
    r = 0 if A is None else A.shape[0]
    dx = None
    if needs_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if dx_out is None else dx_out
    da = torch.zeros((r, K), dtype=torch.float32, device=x.device) if r else None  # atomics targets
    db = torch.zeros((N, r), dtype=torch.float32, device=x.device) if r else None
    if M > 0 and (r or needs_dx):
        u_, dx_, da_, db_, a, b, seed_ = dummy_if_none(x, u if r else None, dx, da, db, A, B, seed)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * (triton.cdiv(K, meta["BLOCK_K"]) if needs_dx else 1),)
        kernel = lora_backward_kernel if config is None else lora_backward_kernel.fn
        kernel[grid](
            g, x, u_, dx_, da_, db_, a, b, seed_,
            *wa.pointers(),
            M, N, K, max(r, 1), min(configs.next_pow2(M), 8192),
            g.stride(0), x.stride(0), u_.stride(0), dx_.stride(0), a.stride(0), a.stride(1), b.stride(0),
            b.stride(1),
            float(scaling), 1.0 / (1.0 - dropout_p), float(dropout_p),
            **format_constexprs(wa),
            HAS_LORA=r > 0, DROPOUT=r > 0 and dropout_p > 0, COMPUTE_DX=needs_dx, R=configs.rank_block(max(r, 1)),
            **({} if config is None else config.all_kwargs()),
        )
    elif needs_dx:
        dx.zero_()  # M == 0
    if not r:
        return dx, None, None
    return dx, da.to(A.dtype), db.to(B.dtype)
