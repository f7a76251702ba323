"""The Triton kernels of the "triton" backend (kernels/backends.py), one op per file, and the
strategies that combine them (strategy.py picks one per pass from a static cost model):

    tiles.py     @triton.jit building blocks: one tile loader per weight format, the byte -> pair
                 table decode, the Philox mask, the down-projection, the epilogue helpers, the
                 interpreter workarounds
    decode.py    "gemv" strategy: one-launch small-M forward (split-K, down-projection folded in)
    dequant.py   4-bit W dequantized once into a shared workspace (the "dequant-mm" strategy)
    mm.py        "dequant-mm" strategy: cuBLAS GEMMs + the thin LoRA kernels, forward and backward
    forward.py   "fused" strategy forward: W decoded in the GEMM's K loop (kept for study); the
                 split-K down-projection every strategy uses with dropout
    backward.py  "fused" strategy backward (dx, dA, dB in one launch)
    strategy.py  the strategies, the cost model that picks one per pass, what it predicts
    utils.py     dequantization (merges, tests) and the dropout mask (tests), on the same tiles
    launch.py    the backend's side: what the kernels cannot take (`reason`), the strategy choice,
                 the device guard, and the forward / backward entry points
    aot.py       compile what a call would launch for a GPU target without a GPU (TTIR, cubin, SASS)

Importing this package does not import triton; its modules do.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1, read by triton at import:
    set it before triton is imported, as tests/kernels/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
