"""Autotune configs of the fused kernels, and which of them fit: shared memory for the actual rank.

Each kernel file lists its GPU configs (tile sizes, warps, stages). What autotuning may pick from
them for a call (`prune`, the autotuner's early_config_prune):
  - under Triton's interpreter one small config (tuning is pure cost there);
  - on a GPU, the configs whose shared memory (`smem_bytes`, an upper bound checked against the
    compiler's own figure by benchmarks/aot_compile.py for every config at r in {8, 16, 64, 128})
    fits the device for this rank, without row tiles far taller than M;
  - LORAFUSE_AUTOTUNE=0: only the first of those (GPU test runs: one compile per kernel).
When none fits, the backend refuses the call (`launch.reason`), so backend="auto" falls back to
torch with that reason instead of failing inside a launch.
"""
from __future__ import annotations

import os
from typing import Optional

import triton

from . import interpreting

H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def autotune_enabled() -> bool:
    """LORAFUSE_AUTOTUNE=0 keeps only each kernel's first fitting config."""
    return os.environ.get("LORAFUSE_AUTOTUNE", "1") != "0"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rank_block(r: int) -> int:
    """R: the rank padded to a power of two >= 16 (tl.dot's smallest dimension)."""
    return max(16, next_pow2(r))


def gemm_configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """One triton.Config per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), grouped by 8 rows."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=warps, num_stages=stages) for bm, bn, bk, warps, stages in tiles]


# the interpreter's one config per GEMM kernel (decode.py has its own)
INTERPRETER_GEMM = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4,
                                 num_stages=1)


def active(gpu_configs: list, interpreter_config: triton.Config = INTERPRETER_GEMM) -> list:
    """The configs handed to triton.autotune: every GPU config (pruned per call), or the interpreter's."""
    return [interpreter_config] if interpreting() else list(gpu_configs)


def smem_bytes(kernel: str, cfg: triton.Config, R: int) -> int:
    """An upper bound on the shared memory (bytes) of `kernel` ("forward", "backward", "decode") at
    config `cfg` and padded rank R, for 16-bit activations and any weight format.

    Operand tiles of the pipelined loop, in 16-bit, `num_stages` deep (Triton buffers each
    tl.load feeding a tl.dot once per stage, and the dequantized W tile once per stage at most):
    forward x [BM, BK], W [BN, BK], A^T [BK, R]; backward g [BM, BN], W [BN, BK], B [BN, R] plus the
    epilogue's fp32 x / A tiles; decode x [16, BK], W [BN, BK]. Plus the fp32 epilogue tiles that
    go through shared memory for a layout change. The compiler reuses buffers whose lifetimes do not
    overlap, so the true figure is lower; benchmarks/aot_compile.py checks it never is higher.
    """
    kw, S = cfg.kwargs, max(1, cfg.num_stages)
    BN, BK = kw["BLOCK_N"], kw["BLOCK_K"]
    BM = kw.get("BLOCK_M", 16)
    if kernel == "forward":
        loop = (BM * BK + BN * BK + BK * R) * 2
        epilogue = (BM * R + R * BN) * 4
    elif kernel == "backward":
        loop = (BM * BN + BN * BK + BN * R) * 2
        epilogue = (BM * BK + R * BK + BM * R + BN * R) * 4
    elif kernel == "decode":
        loop = (16 * BK + BN * BK) * 2
        epilogue = (16 * R + R * BN) * 4
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return S * loop + epilogue


def fitting(kernel: str, configs: list, R: int, limit: Optional[int]) -> list:
    """The configs whose `smem_bytes` bound fits `limit` bytes (None: no limit, the interpreter)."""
    if limit is None:
        return list(configs)
    return [c for c in configs if smem_bytes(kernel, c, R) <= limit]


def pruner(kernel: str):
    """An autotune early_config_prune for `kernel` (launch-time arguments named as in the kernel)."""

    def prune(configs, named_args, **kwargs):
        from .launch import smem_limit  # the device of the launch (the launcher entered it)

        R = kwargs["R"]
        kept = fitting(kernel, configs, R, smem_limit())
        if not kept:
            raise RuntimeError(f"no {kernel} config fits in shared memory at R={R} (the triton backend's "
                               "reason() refuses such calls before they get here)")
        if "BLOCK_M" in kept[0].kwargs:  # no row tiles far taller than M (wasted MMA work)
            cap = max(64, next_pow2(named_args["M"]))
            kept = ([c for c in kept if c.kwargs["BLOCK_M"] <= cap]
                    or [min(kept, key=lambda c: c.kwargs["BLOCK_M"])])
        return kept if autotune_enabled() else kept[:1]

    return prune
