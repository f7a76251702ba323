"""Autotune configs of the "fused" strategy's kernels, and which of them fit: shared memory for the
actual rank. (The gemv and dequant-mm kernels are not autotuned: their configs are picked per shape
by kernels/triton/decode.py / mm.py and measured by benchmarks/aot_compile.py.)

Each kernel file lists its GPU configs (tile sizes, warps, stages). What autotuning may pick from
them for a call (`prune`, the autotuner's early_config_prune):
  - under Triton's interpreter one small config (tuning is pure cost there);
  - on a GPU, the configs whose shared memory at this rank (`smem_bytes`: the compiler's figures,
    measured by benchmarks/aot_compile.py) fits the device, without row tiles far taller than M;
  - LORAFUSE_AUTOTUNE=0: only the first of those (GPU test runs: one compile per kernel).
When none fits, the backend refuses the call (`launch.reason`), so backend="auto" falls back to
torch with that reason instead of failing inside a launch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
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


def config_id(cfg: triton.Config) -> str:
    """"BMxBNxBK-wW-sS": the key of a config in SMEM_TABLE."""
    kw = cfg.kwargs
    return f"{kw.get('BLOCK_M', 16)}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


# Bytes of shared memory each GPU config of each kernel uses on sm_90, per padded rank R: the
# compiler's own figure (kernel.metadata.shared) for a call specialised as the JIT does, the
# maximum over the weight formats and kernel variants, measured without a GPU by
# `benchmarks/aot_compile.py --write-table`. Shared memory does not follow a simple formula of the
# tile sizes (Triton pads, reuses and double-buffers per layout), so the pruner reads the measured
# figures; the tool fails whenever the compiler disagrees, i.e. when a kernel changed and the table
# must be rewritten. Other GPU generations compile differently: the figures are sm_90's.
SMEM_TABLE = Path(__file__).with_name("smem_sm90.json")
_table: Optional[dict] = None


def smem_bytes(kernel: str, cfg: triton.Config, R: int) -> int:
    """Shared memory (bytes) of `kernel` ("forward", "backward") at `cfg` and padded rank R:
    the table's figure for the smallest measured rank >= R (it grows with R: an upper bound)."""
    global _table
    if _table is None:
        _table = json.loads(SMEM_TABLE.read_text())
    per_r = _table.get(kernel, {}).get(config_id(cfg), {})
    measured = sorted(int(k) for k in per_r if int(k) >= R)
    if not measured:
        raise KeyError(f"{SMEM_TABLE.name} has no {kernel} figure for config {config_id(cfg)} at R >= {R}: "
                       "measure it with `python benchmarks/aot_compile.py --path fused --write-table --r 16 64 128`")
    return per_r[str(measured[0])]


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
