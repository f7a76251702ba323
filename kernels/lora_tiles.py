"""Shared `@triton.jit` building blocks of the fused LoRA kernels: per-format tile loaders.

Why one set of kernels with a format switch instead of one copy per format: the fused forward,
backward and decode kernels differ between NF4/FP4, int8 and dense ONLY in how a tile of W is
produced. Each format gets its own small `@triton.jit` loader here (`_dense_tile`, `_int8_tile`,
`_nf4_tile`), and `load_w_tile` picks one with the `FMT` constexpr, so the compiler specializes
each kernel per format (no runtime branch) and the GEMM / LoRA / dropout code exists once.

Every loader returns the tile W[offs_n, k0:k0+BLOCK_K] as [BLOCK_N, BLOCK_K] in `OUT` (the
activation dtype), zero outside [N, K]; the forward uses it transposed (x @ W^T), the backward
as is (g @ W). Values are bit-for-bit what `kernels.reference.dequantize(weight, x.dtype)` gives.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .triton_common import interpreting

# Format codes of the `FMT` constexpr (the launchers in lora_4bit/int8/dense.py pass them).
FMT_DENSE = 0
FMT_INT8 = 1
FMT_4BIT = 2  # NF4 and FP4 differ only in their 16-entry code table

# bitsandbytes multiplies by this fp32 constant instead of dividing by 127 (see reference.py).
INT8_INV_127 = 7.874015718698502e-3

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
def _dense_tile(w_ptr, stride_wn, stride_wk, offs_n, offs_k, mask, OUT: tl.constexpr):
    """W [N, K] at any strides (GPT-2's Conv1D hands us weight.T): a plain masked load + cast."""
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    return cvt(w, OUT)


@triton.jit
def _int8_tile(cb_ptr, scb_ptr, stride_wn, stride_wk, offs_n, offs_k, N, mask, OUT: tl.constexpr):
    """W = CB * SCB[n] * (1/127) in fp32 (bnb's expression and order), then one rounding to OUT."""
    cb = tl.load(cb_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0)
    scb = tl.load(scb_ptr + offs_n, mask=offs_n < N, other=0.0)  # fp32 [BLOCK_N]
    w = cb.to(tl.float32) * scb[:, None] * 7.874015718698502e-3
    return cvt(w, OUT)


@triton.jit
def _absmax_at(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mask, NESTED: tl.constexpr,
               BS2: tl.constexpr):
    """fp32 absmax of blocks `blk` (any shape); double-quantized: code2[q] * absmax2[blk // BS2] + offset."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)  # uint8 codes
        am = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0) + offset
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return am


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset,
              offs_n, k0, N, K, mask,
              NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, K_EVEN: tl.constexpr,
              ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, OUT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """bnb 4-bit: flat f = n*K + k; q = high nibble of byte f//2 when f is even, else the low one;
    w = code[q] * absmax[f // BS].

    Bytes: with K even (every real layer) a row starts on a byte boundary, so the tile is read as
    [BLOCK_N, BLOCK_K/2] contiguous bytes (coalesced, each byte once) and split into two nibbles
    that `tl.join` interleaves back into k order. With K odd rows start mid-byte and each element
    reads its own byte (correct, slower; no real model has an odd in_features).
    Scales: with K % BS == 0 (ALIGNED) absmax is read once per tile row and absmax block, not per
    element; only layouts whose blocks straddle rows pay a lookup per element. A first draft that
    looked everything up per element needed 232 KiB of shared memory per program on sm_90 (the
    pipeliner buffers each gathered tile), over the H100's 227 KiB; this one needs 42 KiB.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    flat = offs_n[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K] int32 (launcher: N*K < 2**31)
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
    if ALIGNED and BS % BLOCK_K == 0:
        # K % BS == 0 and the tile lies inside one absmax block per row: one scale per row
        blk = (offs_n * K + k0) // BS  # [BLOCK_N]
        am = _absmax_at(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, n_mask, NESTED, BS2)
        w = vals * am[:, None]
    elif ALIGNED and BLOCK_K % BS == 0:
        # BLOCK_K // BS whole blocks per row: [BLOCK_N, BLOCK_K // BS] scales, broadcast per block
        offs_b = tl.arange(0, BLOCK_K // BS)
        blk = (offs_n[:, None] * K + k0) // BS + offs_b[None, :]  # [BLOCK_N, BLOCK_K // BS]
        bl_mask = n_mask[:, None] & (k0 + offs_b[None, :] * BS < K)
        am = _absmax_at(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, bl_mask, NESTED, BS2)
        w = (vals.reshape(BLOCK_N, BLOCK_K // BS, BS) * am[:, :, None]).reshape(BLOCK_N, BLOCK_K)
    else:
        # general: blocks straddle rows (K % BS != 0); one absmax lookup per element
        w = vals * _absmax_at(absmax_ptr, code2_ptr, absmax2_ptr, offset, flat // BS, mask, NESTED, BS2)
    w = tl.where(mask, w, 0.0)  # fp32; masked lanes could hold code[0] * offset otherwise
    return cvt(cvt(w, W_DTYPE), OUT)  # bnb rounds to the quantization dtype first (reference.dequantize)


@triton.jit
def load_w_tile(w_ptr, s1_ptr, code_ptr, code2_ptr, s2_ptr, offset, stride_wn, stride_wk,
                offs_n, k0, N, K,
                FMT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, OUT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] -> [BLOCK_N, BLOCK_K] in OUT, zero outside [N, K].

    The generic weight arguments: w_ptr = dense W | CB | packed bytes; s1_ptr = SCB | absmax
    (fp32, or uint8 codes when NESTED); code_ptr = 4-bit table; code2_ptr / s2_ptr / offset =
    the nested absmax's code, absmax and offset. Unused ones are dummies.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if FMT == 0:
        w = _dense_tile(w_ptr, stride_wn, stride_wk, offs_n, offs_k, mask, OUT)
    elif FMT == 1:
        w = _int8_tile(w_ptr, s1_ptr, stride_wn, stride_wk, offs_n, offs_k, N, mask, OUT)
    else:
        w = _nf4_tile(w_ptr, s1_ptr, code_ptr, code2_ptr, s2_ptr, offset, offs_n, k0, N, K, mask,
                      NESTED, BS, BS2, K_EVEN, ALIGNED, W_DTYPE, OUT, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def bias_row(bias_ptr, offs_n, N, ACT: tl.constexpr):
    """bias [1, BN] in fp32, rounded to the activation dtype first, as nn.Linear adds it."""
    bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)  # [BN]
    return cvt(bias, ACT).to(tl.float32)[None, :]


@triton.jit
def up_projection(u, b_ptr, offs_n, offs_r, N, r, stride_bn, stride_br):
    """u @ B^T [BM, BN] fp32 for u [BM, R] fp32 (the LoRA epilogue), in tf32 on the fp32 u."""
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=(offs_r[:, None] < r) & (offs_n[None, :] < N), other=0.0)  # B^T [R, BN]
    return tl.dot(u, bt.to(tl.float32), input_precision="tf32")


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p, OFFS_64: tl.constexpr):
    """keep [BM, BK] bool = tl.rand(seed, m*K + k) >= p: the contract of reference.dropout_mask.

    Offsets are int64 when M*K >= 2**31 (OFFS_64), as the reference's counter (c0, c1) expects.
    """
    if OFFS_64:
        off = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    else:
        off = offs_m[:, None] * K + offs_k[None, :]
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
