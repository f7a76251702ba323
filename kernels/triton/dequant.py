"""Dequantize a base weight once per pass into a shared workspace: what the "dequant-mm" strategy
multiplies with cuBLAS (kernels/triton/mm.py).

    W [N, K] (x.dtype) = dequantize(weight)      bit for bit `kernels.reference.dequantize(weight, x.dtype)`

bitsandbytes' 4-bit layout is a flat stream: flat element f = n*K + k is a nibble of byte f // 2
(high first) scaled by absmax[f // blocksize], and the row-major W [N, K] is the same flat order. So
the kernel is elementwise over bytes, whatever K: each program walks tiles of [ROWS, COLS] bytes
(COLS divides blocksize / 2, so a tile row lies inside one absmax block and needs one absmax), in
a grid-stride loop over a few programs per SM. Codes are read from the 16-entry fp32 table (64
bytes, L1-resident: a warp's 32 lookups hit one cache line), products in fp32, rounded to the
quantization dtype then to x.dtype, as bitsandbytes does. int8 and dense weights go through the
fused kernels' tile loader (utils.dequantize) and a cast.

The workspace is one buffer per (device, dtype, stream), grown to the largest layer and reused by
every layer: the forward of the next layer overwrites it, so backward dequantizes again (keeping a
bf16 copy per layer would cost 2 bytes per weight element of every layer, four times the 4-bit
storage QLoRA exists to save). It is never saved for backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats
from ..formats.common import host_float  # the double-quant offset may be bnb's 0-d tensor
from . import interpreting
from .tiles import _absmax_at, cvt


@triton.jit
def dequant_4bit_kernel(
    # pointers
    out_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
    # sizes
    n_elems, n_tiles,
    # weight format
    NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr,
    # meta-parameters
    OUT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, EVEN: tl.constexpr,
):
    """out[f] for every flat f < n_elems; a tile = ROWS x COLS bytes = ROWS x 2*COLS elements.
    EVEN: n_elems fills whole tiles (every real layer), no bounds masks."""
    n_bytes = (n_elems + 1) // 2
    rows = tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, COLS)  # [COLS]
    lanes = tl.arange(0, 2 * COLS)  # [2 * COLS] output elements of a tile row
    # grid-stride loop: a few programs per SM, each many tiles
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        row_byte = (t * ROWS + rows.to(tl.int64)) * COLS  # [ROWS] first byte of each tile row (int64)
        row_ok = row_byte < n_bytes
        b_ptrs = packed_ptr + row_byte[:, None] + cols[None, :]  # [ROWS, COLS]
        if EVEN:
            b = tl.load(b_ptrs).to(tl.int32)
        else:
            b = tl.load(b_ptrs, mask=row_byte[:, None] + cols[None, :] < n_bytes, other=0).to(tl.int32)
        am = _absmax_at(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                        (row_byte * 2 // BLOCKSIZE).to(tl.int32), row_ok, NESTED, NESTED_BLOCKSIZE)  # [ROWS]
        hi = tl.load(code_ptr + (b >> 4)) * am[:, None]  # [ROWS, COLS] element 2j
        lo = tl.load(code_ptr + (b & 0xF)) * am[:, None]  # element 2j + 1
        w = cvt(cvt(tl.join(hi, lo).reshape(ROWS, 2 * COLS), W_DTYPE), OUT)  # bnb rounds to W_DTYPE first
        f = row_byte[:, None] * 2 + lanes[None, :]  # [ROWS, 2 * COLS] flat element index
        if EVEN:
            tl.store(out_ptr + f, w)
        else:
            tl.store(out_ptr + f, w, mask=f < n_elems)


# (ROWS, COLS, warps, programs per SM); COLS is capped by blocksize / 2 at launch
GPU_CONFIG = (32, 32, 4, 8)
INTERPRETER_CONFIG = (4, 32, 4, 1)

_workspaces: dict = {}  # (device, dtype, stream) -> 1-D buffer


def workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A 1-D buffer of at least `numel` elements, shared by every layer on this device, dtype and
    stream (kernels on one stream run in order; another stream gets its own)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, dtype, stream)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)  # free the smaller one first
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf


def dequantize_into_workspace(weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` (fp16 / bf16), in the shared workspace for 4-bit and int8 weights; a dense
    W in `dtype` comes back as is (any strides: cuBLAS reads them), else cast into the workspace."""
    from .decode import sm_count
    from .launch import device_of, tl_dtype
    from .utils import dequantize

    wa = weight.kernel_args()
    N, K = wa.N, wa.K
    if wa.fmt == formats.FMT_DENSE:
        W = wa.w
        if W.dtype == dtype:
            return W
        out = workspace(W.device, dtype, N * K)[: N * K].view(N, K)
        return out.copy_(W)
    out = workspace(wa.w.device, dtype, N * K)[: N * K].view(N, K)
    if wa.fmt == formats.FMT_INT8:
        return dequantize(weight, dtype, out=out)
    rows, cols, warps, per_sm = INTERPRETER_CONFIG if interpreting() else GPU_CONFIG
    cols = min(cols, wa.blocksize // 2)  # a tile row inside one absmax block
    n_tiles = triton.cdiv(triton.cdiv(N * K, 2), rows * cols)
    with device_of(out):
        dequant_4bit_kernel[(min(n_tiles, per_sm * sm_count(out.device)),)](
            out, wa.w, wa.scale, wa.code, wa.nested_code, wa.nested_absmax, host_float(wa.nested_offset),
            N * K, n_tiles,
            NESTED=wa.nested, BLOCKSIZE=wa.blocksize, NESTED_BLOCKSIZE=wa.nested_blocksize,
            W_DTYPE=tl_dtype(wa.w_dtype), OUT=tl_dtype(dtype), ROWS=rows, COLS=cols,
            EVEN=N * K % (2 * rows * cols) == 0, num_warps=warps)
    return out
