"""Small-M LoRA forward (decode; the "gemv" strategy): one launch reading each packed byte once per row tile.

    y [M, N] = x @ deq(W)^T + bias + scaling * (dropout(x) @ A^T) @ B^T       (x.dtype)
    u [M, r] = dropout(x) @ A^T                                                (fp32, for backward)

At small M the layer streams W from HBM (N*K/2 bytes for 4-bit), so the kernel is built around
that stream: many narrow programs, each [BLOCK_N, BLOCK_K] tile of W decoded as it arrives and fed
to a thin tensor-core product with the (at most BLOCK_M-row) x tile. The roles of the programs of
one launch, handed out by ticket (an atomic counter: a program gets its role when it starts, so a
program never waits for one that has not started):
  - tickets [0, U_PROGS): the LoRA down-projection, one (row tile, K range) each: its share of u
    into u_part [U_RANGES, M, r] fp32 (`tiles.down_partial`, the dropout mask drawn there);
  - every other ticket: one (row tile, column tile, K split) of the base product. With SPLIT_K > 1
    each split stores its fp32 [BLOCK_M, BLOCK_N] share into part [SPLIT_K, M, N] and counts itself
    at the tile's counter; the last to arrive owns the tile's epilogue (no one waits for the other
    splits). Split-K gives small-N layers enough programs to keep HBM busy.
  - the owner of a tile's epilogue sums the splits in split order (deterministic), waits until the
    down-projection programs are done, sums u in range order, adds bias + scaling * u @ B^T and
    rounds once; the owner of column tile 0 also writes u.
The counters live in a small per-device, per-stream int32 buffer that the launch leaves zeroed
(the last program to finish resets it): no memset launch, and CUDA-graph replays work.

4-bit W is decoded through a 256-entry table byte -> (w[2j], w[2j+1]) in x.dtype (`tiles.pair_tile`;
bitsandbytes' gemv_4bit precision); other formats, and 4-bit layouts whose rows do not start on a
byte and absmax-block boundary, through the generic tile loaders (`tiles.load_w_tile`). EVEN_N /
EVEN_K drop the bounds masks when the tiles divide the layer. The base product runs as W @ x^T
(W's tile is the MMA's M side, so BLOCK_N >= 64 maps to Hopper's wgmma; x^T is its narrow N side).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary
import triton
import triton.language as tl

from .. import formats
from . import configs, interpreting
from .tiles import bias_row, cvt, down_partial, load_w_tile, mma, pair_tile, row_ptrs

# The sync buffer: [TICKET, U_DONE, DONE, one counter per output tile...] int32.
TICKET, U_DONE, DONE, TILE_COUNTS = (tl.constexpr(i) for i in range(4))
U_RANGE = 512  # K elements per down-projection program (interpreter: 64)


@dataclass(frozen=True)
class GemvConfig:
    """One shipped configuration of the kernel (the strategy model picks one per shape: no autotuning)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    @property
    def id(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}-w{self.num_warps}-s{self.num_stages}"


# Per BLOCK_M (M padded to 16, 32 or 64 rows; more rows take several row tiles): the shipped GPU
# configs, for R <= 32 and for R >= 64 (where 32 x 128 tiles spill; benchmarks/aot_compile.py
# measures each; NOTES.md has the figures).
GPU_CONFIGS = {16: (GemvConfig(16, 128, 128, 4, 3), GemvConfig(16, 128, 128, 4, 3)),
               32: (GemvConfig(32, 128, 128, 4, 3), GemvConfig(32, 64, 128, 4, 3)),
               64: (GemvConfig(64, 64, 128, 4, 3), GemvConfig(64, 64, 128, 4, 3))}
# compiled by the static report for comparison, never picked (NOTES.md says why)
STUDY_CONFIGS = [GemvConfig(16, 64, 128, 4, 4), GemvConfig(16, 256, 128, 8, 3), GemvConfig(64, 128, 128, 4, 3)]
INTERPRETER_CONFIG = GemvConfig(0, 32, 64, 4, 1)  # BLOCK_M from M
MAX_BLOCK_M = 64


@triton.jit
def lora_gemv_kernel(
    # pointers
    x_ptr, y_ptr, u_ptr, u_part_ptr, part_ptr, sync_ptr, bias_ptr, a_ptr, b_ptr, seed_ptr, lut_ptr,
    # the base weight (tiles.py)
    w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, stride_wn, stride_wk,
    # sizes
    M, N, K, r, K_PER_SPLIT, N_RANGES,
    # strides
    stride_xm, stride_ym, stride_um, stride_ar, stride_ak, stride_bn, stride_br, stride_part,
    scaling, keep_scale, p,
    # weight format
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_EVEN: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, PAIR: tl.constexpr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, R: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, U_RANGE_K: tl.constexpr,
    U_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program role: a ticket when programs wait for the down-projection, else the program id
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    u_progs = num_m * N_RANGES if HAS_LORA else 0
    if HAS_LORA:
        ticket = tl.atomic_add(sync_ptr + TICKET, 1)  # acq_rel, gpu scope
    else:
        ticket = tl.program_id(0)
    ACT = x_ptr.dtype.element_ty
    offs_r = tl.arange(0, R)  # [R]
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)  # int64, a device tensor: CUDA-graph replays draw new masks

    is_u = False
    if HAS_LORA:
        is_u = ticket < u_progs
    if is_u:
        # down-projection share: u_part[range] rows of this row tile
        pid_m = ticket // N_RANGES
        k_lo = (ticket % N_RANGES) * U_RANGE_K
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        u = down_partial(x_ptr, a_ptr, seed, offs_m, k_lo, tl.minimum(k_lo + U_RANGE_K, K), M, K, r, stride_xm,
                         stride_ar, stride_ak, p, DROPOUT, R, BLOCK_M, U_BLOCK_K)  # [BM, R]
        u_ptrs = u_part_ptr + (ticket % N_RANGES) * M * r + row_ptrs(0, offs_m, r) + offs_r[None, :]
        tl.store(u_ptrs, u * keep_scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < r))
        tl.debug_barrier()  # every thread's stores, then one release: visible to whoever acquires
        tl.atomic_add(sync_ptr + U_DONE, 1, sem="release")
    else:
        # program ids: one (row tile, column tile, K split)
        t = ticket - u_progs
        split = t % SPLIT_K
        tile = t // SPLIT_K
        pid_n = tile % num_n
        pid_m = tile // num_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        x_rows = row_ptrs(x_ptr, offs_m, stride_xm)  # [BM, 1]
        if PAIR:
            lut = tl.load(lut_ptr + tl.arange(0, 256))  # int32 [256]: byte -> two ACT values

        # K loop over this split's range: acc^T [BN, BM] = W tile @ x^T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_lo = split * K_PER_SPLIT
        for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            if EVEN_K:
                x = tl.load(x_rows + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)  # [BM, BK]
            else:
                x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            if PAIR:
                w = pair_tile(w_ptr, scale_ptr, lut, nested_code_ptr, nested_absmax_ptr, nested_offset, offs_n, k0,
                              N, K, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, EVEN_N, EVEN_K, ACT, BLOCK_N, BLOCK_K)
            else:
                w = load_w_tile(w_ptr, scale_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                                stride_wn, stride_wk, offs_n, k0, N, K, FMT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE,
                                K_EVEN, ALIGNED, W_DTYPE, ACT, BLOCK_N, BLOCK_K)  # [BN, BK]
            acc = mma(w, tl.trans(x), acc)

        # split-K: store this share; the last split to arrive owns the epilogue
        mn_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)  # [BN, BM]
        owner = True
        if SPLIT_K > 1:
            part_ptrs = part_ptr + row_ptrs(0, offs_n, 1) + offs_m.to(tl.int64)[None, :] * N  # part[s, m, n]
            tl.store(part_ptrs + split.to(tl.int64) * stride_part, acc, mask=mn_mask)
            tl.debug_barrier()
            owner = tl.atomic_add(sync_ptr + TILE_COUNTS + tile, 1) == SPLIT_K - 1  # acq_rel
        if owner:
            # epilogue: the splits in order, bias, LoRA up-projection, one rounding
            if SPLIT_K > 1:
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for _ in range(0, SPLIT_K):  # split order: deterministic
                    acc += tl.load(part_ptrs, mask=mn_mask, other=0.0, cache_modifier=".cg")
                    part_ptrs += stride_part  # 64-bit pointer steps: S * M * N may pass 2**31
                tl.atomic_xchg(sync_ptr + TILE_COUNTS + tile, 0)  # reset for the next launch
            y = acc
            if HAS_BIAS:
                y += tl.trans(bias_row(bias_ptr, offs_n, N, ACT))  # [BN, 1]
            if HAS_LORA:
                while tl.atomic_add(sync_ptr + U_DONE, 0, sem="acquire") < u_progs:
                    pass  # the down-projection programs hold smaller tickets: they are running
                tl.debug_barrier()
                u_mask = (offs_m[:, None] < M) & (offs_r[None, :] < r)
                u_rows = row_ptrs(0, offs_m, r) + offs_r[None, :]
                u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
                for s in range(0, N_RANGES):  # fixed order: deterministic
                    u += tl.load(u_part_ptr + s * M * r + u_rows, mask=u_mask, other=0.0, cache_modifier=".cg")
                if pid_n == 0:
                    tl.store(row_ptrs(u_ptr, offs_m, stride_um) + offs_r[None, :], u, mask=u_mask)
                b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                            mask=(offs_n[:, None] < N) & (offs_r[None, :] < r), other=0.0)  # B [BN, R]
                y += scaling * tl.dot(b.to(tl.float32), tl.trans(u), input_precision="tf32")  # [BN, BM]
            y_ptrs = y_ptr + row_ptrs(0, offs_n, 1) + offs_m.to(tl.int64)[None, :] * stride_ym  # y^T [BN, BM]
            tl.store(y_ptrs, cvt(y, ACT), mask=mn_mask)

    if HAS_LORA:  # the last program to finish leaves the ticket counters at zero
        if tl.atomic_add(sync_ptr + DONE, 1) == u_progs + num_m * num_n * SPLIT_K - 1:
            tl.atomic_xchg(sync_ptr + TICKET, 0)
            tl.atomic_xchg(sync_ptr + U_DONE, 0)
            tl.atomic_xchg(sync_ptr + DONE, 0)


# ---- the launcher ------------------------------------------------------------------------------

_sync: dict = {}  # (device, stream) -> zeroed int32 counters, grown as needed
_sm_count: dict = {}


def sync_buffer(device: torch.device, n_tiles: int) -> torch.Tensor:
    """The launch's counters: TILE_COUNTS + n_tiles int32 zeros, one buffer per device and stream
    (launches on one stream run in order, so they can share it; two streams cannot)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _sync.get(key)
    if buf is None or buf.numel() < TILE_COUNTS.value + n_tiles:
        buf = torch.zeros(TILE_COUNTS.value + max(n_tiles, 1024), dtype=torch.int32, device=device)
        _sync[key] = buf
    return buf


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on an H100 SXM; 4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


def u_block_k(R: int) -> int:
    """K tile of the down-projection programs: A^T [U_BLOCK_K, R] fp32 per pipeline stage stays small."""
    return 16 if interpreting() else (64 if R <= 32 else 32)


def gemv_config(M: int, r: int) -> GemvConfig:
    """The config the strategy runs for M rows at rank r (a pure function of the shapes)."""
    bm = block_m(M)
    if interpreting():
        return dataclasses.replace(INTERPRETER_CONFIG, BLOCK_M=bm)
    return GPU_CONFIGS[bm][configs.rank_block(max(r, 1)) >= 64]


def block_m(M: int) -> int:
    """Rows per tile: M padded to 16, 32 or 64 (tl.dot's narrow side); more rows take several tiles."""
    return min(MAX_BLOCK_M, max(16, configs.next_pow2(M)))


def split_k(M: int, N: int, K: int, cfg: GemvConfig, sms: int) -> int:
    """K splits so that the base product has about two programs per SM (each split >= 2 K tiles)."""
    tiles = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, K // (2 * cfg.BLOCK_K), 16))


def uses_pair_table(wa: formats.KernelArgs) -> bool:
    """4-bit rows starting on byte and absmax-block boundaries (every real layer): the pair-table path."""
    return wa.fmt == formats.FMT_4BIT and wa.K % 2 == 0 and wa.K % wa.blocksize == 0


# code tensor [16] -> {dtype: pair table}: keyed by the layer's own code tensor, not by the record,
# because the custom operators (kernels/ops.py) rebuild the record from its tensors on every call
_PAIR_TABLES: "WeakIdKeyDictionary[torch.Tensor, dict]" = WeakIdKeyDictionary()


def pair_table(weight, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256]: entry b = dtype(code[b >> 4]) in the low 16 bits, dtype(code[b & 15]) in the high
    ones (tiles.pair_tile). Memoised per code tensor and dtype."""
    tables = _PAIR_TABLES.setdefault(weight.code, {})
    if dtype not in tables:
        bits = weight.code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [16]
        b = torch.arange(256, device=bits.device)
        word = bits[b >> 4] | (bits[b & 15] << 16)  # [256] in [0, 2**32)
        tables[dtype] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return tables[dtype]


def gemv_forward(
    x: torch.Tensor,
    weight,
    bias: Optional[torch.Tensor],
    A: Optional[torch.Tensor],
    B: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    config: Optional[GemvConfig] = None,
    splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    u_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y [M, N] x.dtype, u [M, r] fp32 or None); inputs checked by launch.py. `weight` is the record
    (the 4-bit pair table is memoised on it). config / splits: the strategy's choice (default: its
    first config for this M and `split_k`); out / u_out: buffers to write (tests pass NaN-filled ones).
    """
    from .launch import dummy_if_none, format_constexprs

    wa = weight.kernel_args()
    M, K = x.shape
    N = wa.N
    r = 0 if A is None else A.shape[0]
    cfg = config or gemv_config(M, r)
    S = splits or split_k(M, N, K, cfg, sm_count(x.device))
    k_per_split = triton.cdiv(triton.cdiv(K, S), cfg.BLOCK_K) * cfg.BLOCK_K
    S = triton.cdiv(K, k_per_split)  # no empty split
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    num_m, num_n = triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N)
    u = u_part = part = None
    u_range = 64 if interpreting() else U_RANGE
    n_ranges = triton.cdiv(K, u_range) if r else 0
    if r:
        u = torch.empty((M, r), dtype=torch.float32, device=x.device) if u_out is None else u_out
        u_part = torch.empty((n_ranges, M, r), dtype=torch.float32, device=x.device)
    if S > 1:
        part = torch.empty((S, M, N), dtype=torch.float32, device=x.device)
    sync = sync_buffer(x.device, num_m * num_n) if (r or S > 1) else x
    pair = uses_pair_table(wa)
    lut = pair_table(weight, x.dtype) if pair else None
    u_, u_part_, part_, bias_, a, b, seed_, lut_ = dummy_if_none(x, u, u_part, part, bias, A, B, seed, lut)
    grid = (num_m * n_ranges + num_m * num_n * S,)
    lora_gemv_kernel[grid](
        x, y, u_, u_part_, part_, sync, bias_, a, b, seed_, lut_,
        *wa.pointers(),
        M, N, K, max(r, 1), k_per_split, max(n_ranges, 1),
        x.stride(0), y.stride(0), u_.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), M * N,
        float(scaling), 1.0 / (1.0 - dropout_p), float(dropout_p),
        **format_constexprs(wa), PAIR=pair,
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, DROPOUT=r > 0 and dropout_p > 0, R=configs.rank_block(max(r, 1)),
        SPLIT_K=S, EVEN_N=N % cfg.BLOCK_N == 0, EVEN_K=K % cfg.BLOCK_K == 0, U_RANGE_K=u_range,
        U_BLOCK_K=u_block_k(configs.rank_block(max(r, 1))),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, u
