"""`@triton.jit` building blocks shared by the fused kernels: per-format tile loaders, dropout, epilogue.

Why one set of kernels with a format switch instead of one copy per format: the forward, backward
and decode kernels differ between NF4/FP4, int8 and dense ONLY in how a tile of W is produced.
Each format has a small loader here (`_dense_tile`, `_int8_tile`, `_nf4_tile`) and `load_w_tile`
picks one with the `FMT` constexpr, so the compiler specialises each kernel per format (no runtime
branch) and the GEMM, LoRA and dropout code exists once. (The host side of each format, its record
and kernel arguments, is kernels/formats/.)

Every loader returns the tile W[offs_n, k0:k0+BLOCK_K] as [BLOCK_N, BLOCK_K] in `OUT` (the
activation dtype), zero outside [N, K]; the forward uses it transposed (x @ W^T), the backward as
is (g @ W). Values are bit for bit `kernels.reference.dequantize(weight, x.dtype)`.

The weight arguments, in this order everywhere (kernels.formats.KernelArgs.pointers()):
    w_ptr              dense W | int8 CB | packed 4-bit bytes (flat)
    scale_ptr          int8 SCB [N] | 4-bit absmax (fp32, or uint8 codes when NESTED)
    code_ptr           4-bit code table, fp32 [16]
    nested_code_ptr    double quantization: fp32 [256] table of the absmax codes
    nested_absmax_ptr  double quantization: fp32 absmax of the absmax codes
    nested_offset      double quantization: added to every dequantized absmax
    stride_wn, stride_wk   dense / int8 strides of W
and the format constexprs FMT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, K_EVEN, ALIGNED, W_DTYPE.
Unused pointers are dummies, never read.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .. import formats
from ..formats.int8 import INT8_INV_127 as _INT8_INV_127
from . import interpreting

FMT_DENSE: tl.constexpr = tl.constexpr(formats.FMT_DENSE)
FMT_INT8: tl.constexpr = tl.constexpr(formats.FMT_INT8)
INT8_INV_127: tl.constexpr = tl.constexpr(_INT8_INV_127)

# Triton 3.9's CPU interpreter stores bf16 as raw uint16 and (a) multiplies those raw integers in
# tl.dot, (b) truncates fp32 -> bf16 instead of rounding to nearest even. `mma` and `cvt` below
# work around both under the interpreter only (fp32 operands hold bf16/fp16 values exactly, so the
# products and fp32 sums are those of the tensor-core MMA); on a GPU they are plain tl.dot / .to().
INTERPRET: tl.constexpr = tl.constexpr(interpreting())
# 4-bit code lookup: tl.gather from a register copy of the table (True, warp shuffles) or a load
# from the L1-resident table (False; LORAFUSE_LUT=load). To be compared on a GPU (NOTES.md).
LUT_GATHER: tl.constexpr = tl.constexpr(os.environ.get("LORAFUSE_LUT", "gather") == "gather")


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with an fp32 accumulator; operands in their own (16-bit) dtype on the GPU."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def cvt(x, DT: tl.constexpr):
    """x.to(DT) rounding to nearest even (what the GPU does; the interpreter truncates bf16)."""
    if INTERPRET and DT == tl.bfloat16 and x.dtype != tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DT)
    return y


@triton.jit
def mask_mul(x, keep_f):
    """x * keep_f for a 0 / 1 float mask, in x's dtype (in fp32 under the interpreter, whose bf16
    elementwise arithmetic is wrong as its dot is)."""
    if INTERPRET:
        y = (x.to(tl.float32) * keep_f).to(x.dtype)
    else:
        y = x * keep_f.to(x.dtype)
    return y


@triton.jit
def row_ptrs(base_ptr, offs_m, stride_m):
    """base + m * stride for the rows offs_m, as a [BM, 1] pointer block. The row term is int64:
    M * stride reaches 2**31 at training shapes (16k tokens into a 128k-vocab head)."""
    return base_ptr + offs_m.to(tl.int64)[:, None] * stride_m


@triton.jit
def _dense_tile(w_ptr, stride_wn, stride_wk, offs_n, offs_k, mask, OUT: tl.constexpr):
    """W [N, K] at any strides (GPT-2's Conv1D hands us weight.T): a plain masked load + cast."""
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    return cvt(w, OUT)


@triton.jit
def _int8_tile(cb_ptr, scb_ptr, stride_wn, stride_wk, offs_n, offs_k, N, mask, OUT: tl.constexpr):
    """W = CB * SCB[n] * (1/127) in fp32 (bnb's expression and order), then one rounding to OUT."""
    cb = tl.load(cb_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0)
    scb = tl.load(scb_ptr + offs_n, mask=offs_n < N, other=0.0)  # fp32 [BLOCK_N]
    w = cb.to(tl.float32) * scb[:, None] * INT8_INV_127
    return cvt(w, OUT)


@triton.jit
def _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, blk, mask,
               NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of blocks `blk` (any shape); nested: code[q] * absmax2[blk // NESTED_BLOCKSIZE] + offset."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)  # uint8 codes
        am = (tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask,
                                                      other=0.0) + nested_offset)
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return am


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
              offs_n, k0, N, K, mask,
              NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
              K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, OUT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """bnb 4-bit: flat f = n*K + k; q = high nibble of byte f//2 when f is even, else the low one;
    w = code[q] * absmax[f // BLOCKSIZE]. (The host guarantees N*K < 2**31: int32 flat offsets.)

    Bytes: with K even (every real layer) a row starts on a byte boundary, so the tile is read as
    [BLOCK_N, BLOCK_K/2] contiguous bytes (coalesced, each byte once) and split into two nibbles
    that `tl.join` interleaves back into k order. With K odd rows start mid-byte and each element
    reads its own byte (correct, slower; no real model has an odd in_features).
    Scales: with K % BLOCKSIZE == 0 (ALIGNED) absmax is read once per tile row and absmax block, not
    per element; only layouts whose blocks straddle rows pay a lookup per element (per-element
    lookups made the pipeliner buffer each gathered tile: over the H100's shared memory; NOTES.md).
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    flat = offs_n[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    if K_EVEN:
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte column inside the row
        bmask = (offs_n[:, None] < N) & (offs_j[None, :] * 2 < K)
        b = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_j[None, :], mask=bmask, other=0)
        b = b.to(tl.int32)  # [BLOCK_N, BLOCK_K // 2]
        q = tl.join(b >> 4, b & 0xF).reshape(BLOCK_N, BLOCK_K)  # (2j, 2j+1) = (high, low)
    else:
        b = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        q = (b >> ((1 - (flat & 1)) * 4)) & 0xF
    if LUT_GATHER:  # the 16-entry table in registers; a warp-shuffle gather, no memory traffic
        lut = tl.load(code_ptr + tl.arange(0, 16))  # fp32 [16]
        vals = tl.gather(tl.broadcast_to(lut[None, :], (BLOCK_N, 16)), q, axis=1)
    else:
        vals = tl.load(code_ptr + q)  # fp32 [BLOCK_N, BLOCK_K]: L1-resident table
    n_mask = offs_n < N
    if ALIGNED and BLOCKSIZE % BLOCK_K == 0:
        # the tile lies inside one absmax block per row: one scale per row
        blk = (offs_n * K + k0) // BLOCKSIZE  # [BLOCK_N]
        am = _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, blk, n_mask,
                        NESTED, NESTED_BLOCKSIZE)
        w = vals * am[:, None]
    elif ALIGNED and BLOCK_K % BLOCKSIZE == 0:
        # BLOCK_K // BLOCKSIZE whole blocks per row: [BLOCK_N, BLOCK_K // BLOCKSIZE] scales, broadcast
        offs_b = tl.arange(0, BLOCK_K // BLOCKSIZE)
        blk = (offs_n[:, None] * K + k0) // BLOCKSIZE + offs_b[None, :]  # [BLOCK_N, BLOCK_K // BLOCKSIZE]
        bl_mask = n_mask[:, None] & (k0 + offs_b[None, :] * BLOCKSIZE < K)
        am = _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, blk, bl_mask,
                        NESTED, NESTED_BLOCKSIZE)
        w = (vals.reshape(BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE) * am[:, :, None]).reshape(BLOCK_N, BLOCK_K)
    else:
        # general: blocks straddle rows (K % BLOCKSIZE != 0); one absmax lookup per element
        w = vals * _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, flat // BLOCKSIZE,
                              mask, NESTED, NESTED_BLOCKSIZE)
    w = tl.where(mask, w, 0.0)  # fp32; masked lanes could hold code[0] * offset otherwise
    return cvt(cvt(w, W_DTYPE), OUT)  # bnb rounds to the quantization dtype first (reference.dequantize)


@triton.jit
def load_w_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                stride_wn, stride_wk, offs_n, k0, N, K,
                FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                NESTED_BLOCKSIZE: tl.constexpr, K_EVEN: tl.constexpr, ALIGNED: tl.constexpr,
                W_DTYPE: tl.constexpr, OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] -> [BLOCK_N, BLOCK_K] in OUT, zero outside [N, K] (module doc)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if FMT == FMT_DENSE:
        w = _dense_tile(w_ptr, stride_wn, stride_wk, offs_n, offs_k, mask, OUT)
    elif FMT == FMT_INT8:
        w = _int8_tile(w_ptr, scale_ptr, stride_wn, stride_wk, offs_n, offs_k, N, mask, OUT)
    else:  # FMT_4BIT: NF4 and FP4 differ only in their code table
        w = _nf4_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                      offs_n, k0, N, K, mask, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, K_EVEN, ALIGNED,
                      W_DTYPE, OUT, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def pair_tile(packed_ptr, absmax_ptr, lut, nested_code_ptr, nested_absmax_ptr, nested_offset, offs_n, k0, N, K,
              NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, EVEN_N: tl.constexpr,
              EVEN_K: tl.constexpr, OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """bnb 4-bit W[offs_n, k0:k0+BLOCK_K] -> [BLOCK_N, BLOCK_K] in OUT through a byte -> pair table.

    `lut` int32 [256] (`pair_table`): entry b holds OUT(code[b >> 4]) in its low 16 bits and
    OUT(code[b & 15]) in its high ones, i.e. the two elements 2j, 2j+1 a packed byte encodes, so a
    byte costs one shared-memory lookup (tl.gather on a 1-D table lowers to one) instead of two
    16-way ones. Each pair is scaled by its absmax rounded to OUT, multiplied in OUT: what
    bitsandbytes' own gemv_4bit computes (its values may differ from `reference.dequantize` by an
    OUT rounding of the code and of the scale). Needs K even and K % BLOCKSIZE == 0 (rows start
    on byte and block boundaries; the launcher checks), BLOCK_K and BLOCKSIZE powers of two.
    """
    offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte column inside the row
    ptrs = packed_ptr + offs_n[:, None] * (K // 2) + offs_j[None, :]
    if EVEN_N and EVEN_K:
        b = tl.load(ptrs)  # [BLOCK_N, BLOCK_K // 2] uint8
    else:
        b = tl.load(ptrs, mask=(offs_n[:, None] < N) & (offs_j[None, :] * 2 < K), other=0)
    pair = tl.gather(lut, b.to(tl.int32).reshape(BLOCK_N * (BLOCK_K // 2)), axis=0)
    pair = pair.reshape(BLOCK_N, BLOCK_K // 2)
    lo = (pair & 0xFFFF).to(tl.uint16).to(OUT, bitcast=True)  # element 2j
    hi = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(OUT, bitcast=True)  # element 2j + 1
    v = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K] in k order
    n_ok = offs_n < N
    if BLOCKSIZE >= BLOCK_K:  # one absmax block per tile row
        blk = (offs_n * K + k0) // BLOCKSIZE  # [BLOCK_N]
        am = _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, blk, n_ok,
                        NESTED, NESTED_BLOCKSIZE)
        w = mul_rounded(v, am[:, None], OUT)
    else:  # BLOCK_K // BLOCKSIZE whole blocks per tile row
        offs_b = tl.arange(0, BLOCK_K // BLOCKSIZE)
        blk = (offs_n[:, None] * K + k0) // BLOCKSIZE + offs_b[None, :]  # [BLOCK_N, BLOCK_K // BLOCKSIZE]
        am = _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, blk,
                        n_ok[:, None] & (k0 + offs_b[None, :] * BLOCKSIZE < K), NESTED, NESTED_BLOCKSIZE)
        w = mul_rounded(v.reshape(BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE), am[:, :, None], OUT)
        w = w.reshape(BLOCK_N, BLOCK_K)
    return w


@triton.jit
def mul_rounded(v, scale, OUT: tl.constexpr):
    """v * OUT(scale), multiplied in OUT and rounded to nearest (v already in OUT; scale fp32). Under
    the interpreter, whose bf16 arithmetic is wrong, the exact fp32 product of the two OUT values
    is rounded once instead: the same result."""
    s = cvt(scale, OUT)
    if INTERPRET:
        w = cvt(v.to(tl.float32) * s.to(tl.float32), OUT)
    else:
        w = v * s
    return w


@triton.jit
def down_partial(x_ptr, a_ptr, seed, offs_m, k_lo, k_hi, M, K, r, stride_xm, stride_ar, stride_ak, p,
                 DROPOUT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dropout(x)[offs_m, k_lo:k_hi] @ A[:, k_lo:k_hi]^T -> [BM, R] fp32, without the 1 / (1 - p)
    (the caller scales once); k_hi <= K. The mask is drawn here, once per element of x (tl.rand,
    the contract of reference.dropout_mask); A is rounded to x.dtype for the tensor cores."""
    offs_r = tl.arange(0, R)
    ACT = x_ptr.dtype.element_ty
    x_rows = row_ptrs(x_ptr, offs_m, stride_xm)  # [BM, 1]
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < k_hi
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)  # [BM, BK]
        if DROPOUT:
            x = tl.where(dropout_keep(seed, offs_m, offs_k, K, p), x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=(offs_r[None, :] < r) & k_ok[:, None], other=0.0)  # A^T [BK, R]
        acc = mma(x, cvt(a, ACT), acc)
    return acc


@triton.jit
def bias_row(bias_ptr, offs_n, N, ACT: tl.constexpr):
    """bias [1, BN] in fp32 (a contiguous [N] bias), rounded to the activation dtype first, as
    nn.Linear adds it."""
    bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)  # [BN]
    return cvt(bias, ACT).to(tl.float32)[None, :]


@triton.jit
def up_projection(u, b_ptr, offs_n, offs_r, N, r, stride_bn, stride_br):
    """u @ B^T [BM, BN] fp32 for u [BM, R] fp32 (the LoRA epilogue), in tf32 on the fp32 u."""
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=(offs_r[:, None] < r) & (offs_n[None, :] < N), other=0.0)  # B^T [R, BN]
    return tl.dot(u, bt.to(tl.float32), input_precision="tf32")


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p):
    """keep [BM, BK] bool = tl.rand(seed, m*K + k) >= p: the contract of reference.dropout_mask.

    seed: the int64 scalar loaded from the launcher's seed tensor. The counter m*K + k is int64,
    as the spec's (c0, c1) pair is: an int32 counter would repeat masks beyond 2**31 elements.
    """
    off = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    return tl.rand(seed, off) >= p


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in GROUP_M-tall column-major groups so neighbouring programs share tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
