"""The fused Triton kernels of the "triton" backend (kernels/backends.py), one op per file:

    tiles.py     @triton.jit building blocks: one tile loader per weight format, the Philox mask,
                 the epilogue helpers (bias, up-projection), the interpreter workarounds
    forward.py   fused forward, M > 16 (one launch; with dropout a split-K down-projection first)
    decode.py    forward for M <= 16: a GEMV reading the packed weight once
    backward.py  fused backward (dx, dA, dB in one launch)
    utils.py     dequantization (merges, tests) and the dropout mask (tests), on the same tiles
    launch.py    the backend's side: what the kernels cannot take (`reason`), configs that fit in
                 shared memory, the device guard, and the forward / backward entry points
    aot.py       compile what a call would launch for a GPU target without a GPU (TTIR, cubin)

Importing this package does not import triton; its modules do.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1, read by triton at import:
    set it before triton is imported, as tests/kernels/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
