"""Which kernels the triton backend runs for a call: its strategies and the static cost model that picks one.

    choose(pass_, M, N, K, r, fmt, x_bytes, dropout) -> Choice(strategy, why, predicted_us)

Strategies, per pass:
    forward   "gemv"        decode.py: one launch, W streamed once per row tile of <= 64 rows,
                            4-bit decoded through a byte -> pair table
              "dequant-mm"  mm.py: W dequantized once into a shared bf16 workspace, cuBLAS GEMM,
                            the LoRA terms as thin passes
              "fused"       forward.py: W dequantized inside the GEMM's K loop, re-done for every
                            row tile (kept selectable for study, not picked by auto: see AUTO)
    backward  "dequant-mm"  mm.py
              "fused"       backward.py

The model predicts each candidate's GPU time on an H100 SXM from the call's shapes alone (a pure,
deterministic function: no device query, no sync; torch.compile can call it while tracing):
    memory   bytes moved / (HBM_BPS * STREAM_EFFICIENCY)
    issue    main-loop SASS instructions per weight element (SASS_PER_ELEMENT: the static report of
             benchmarks/aot_compile.py, which fails when a shipped kernel compiles to more than the
             figure here) * weight elements decoded / (ISSUE_RATE * ISSUE_EFFICIENCY)
    MMA      2*M*N*K / (CUBLAS_FLOPS for cuBLAS, TRITON_FLOPS for our Triton GEMMs)
    launches LAUNCH_US each (GPU-side gaps inside a CUDA graph; Python overhead is not modelled)
A Triton kernel that decodes W in its K loop is modelled as issue + MMA (its compiled loop waits
for each wgmma before decoding the next tile: no overlap), then max'ed with memory; cuBLAS and the
streaming kernels as max(memory, compute). `LORAFUSE_STRATEGY=<name>` forces one strategy for the
passes that have it (tests, benchmarks); `auto` (unset) takes the fastest prediction among AUTO.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

from .. import formats

FORWARD, BACKWARD = "forward", "backward"
STRATEGIES = {FORWARD: ("gemv", "dequant-mm", "fused"), BACKWARD: ("dequant-mm", "fused")}
# what `auto` picks from: only kernels that meet the static targets. "fused" is kept for study
# (NOTES.md: its compiled loops issue 25-41 / 31-93 instructions per weight element and its backward
# configs spill up to 7 KiB per thread, which this model does not charge; it predicts the fused
# backward ahead only at M <= ~128 (4096x4096, ~10 us) or <= ~16-32 (the 11008 shapes), passes
# that are host-bound without a graph anyway)
AUTO = {FORWARD: ("gemv", "dequant-mm"), BACKWARD: ("dequant-mm",)}

# H100 SXM (DESIGN.md's budgets)
HBM_BPS = 3.35e12  # bytes/s
STREAM_EFFICIENCY = 0.8  # what a streaming kernel reaches of it
ISSUE_RATE = 132 * 4 * 1.98e9 * 32  # thread-instructions/s: SMs x schedulers x clock x lanes ~ 3.3e13
ISSUE_EFFICIENCY = 0.7  # dependency stalls, partial warps
CUBLAS_FLOPS = 700e12  # bf16 dense, what cuBLAS reaches at large shapes
TRITON_FLOPS = 0.6 * 989e12  # our wgmma kernels: lower (no warp specialisation, epilogue not overlapped)
LAUNCH_US = 2.0

# Main-loop SASS instructions per weight element per thread, sm_90, as the JIT compiles the shipped
# configs (benchmarks/aot_compile.py --json; NOTES.md has the table): the most over the ranks and
# variants. Keys: (kernel, weight format), and the row tile for the gemv.
SASS_PER_ELEMENT = {
    ("gemv", formats.FMT_4BIT, 16): 5.6, ("gemv", formats.FMT_4BIT, 32): 6.4, ("gemv", formats.FMT_4BIT, 64): 6.9,
    ("gemv", formats.FMT_INT8, 16): 5.9, ("gemv", formats.FMT_INT8, 32): 6.5, ("gemv", formats.FMT_INT8, 64): 6.9,
    ("gemv", formats.FMT_DENSE, 16): 2.0, ("gemv", formats.FMT_DENSE, 32): 2.5, ("gemv", formats.FMT_DENSE, 64): 3.0,
    ("dequant", formats.FMT_4BIT): 9.7, ("dequant", formats.FMT_INT8): 7.5, ("dequant", formats.FMT_DENSE): 0.0,
    ("fused-forward", formats.FMT_4BIT): 27.5, ("fused-forward", formats.FMT_INT8): 6.0,
    ("fused-forward", formats.FMT_DENSE): 3.0,
    ("fused-backward", formats.FMT_4BIT): 47.0, ("fused-backward", formats.FMT_INT8): 8.0,
    ("fused-backward", formats.FMT_DENSE): 4.0,
}
FUSED_BLOCK_M = 128  # the fused kernels' row tile (their first configs)


@dataclass(frozen=True)
class Choice:
    """The strategy for one pass of one call shape, why, and every candidate's predicted time (us)."""

    strategy: str
    why: str
    predicted_us: tuple  # ((strategy, us), ...) in STRATEGIES order

    def line(self) -> str:
        others = ", ".join(f"{s} {us:.1f} us" for s, us in self.predicted_us)
        return f"{self.strategy} ({self.why}; predicted on an H100: {others})"


def forced() -> str:
    """LORAFUSE_STRATEGY, or "auto"."""
    return os.environ.get("LORAFUSE_STRATEGY", "auto") or "auto"


def choose(pass_: str, M: int, N: int, K: int, r: int, fmt: int, x_bytes: int, dropout: bool,
           needs_dx: bool = True) -> Choice:
    """The strategy for one pass (FORWARD / BACKWARD); see the module doc. x_bytes: 2 (fp16 / bf16)."""
    return _choose(pass_, M, N, K, r, fmt, x_bytes, dropout, needs_dx, forced())


@functools.lru_cache(maxsize=4096)
def _choose(pass_, M, N, K, r, fmt, x_bytes, dropout, needs_dx, force) -> Choice:
    times = tuple((s, predict(pass_, s, M, N, K, r, fmt, x_bytes, dropout, needs_dx)) for s in STRATEGIES[pass_])
    if force in STRATEGIES[pass_]:
        return Choice(force, "LORAFUSE_STRATEGY", times)
    best = min((t for t in times if t[0] in AUTO[pass_]), key=lambda t: t[1])[0]
    why = "LORAFUSE_STRATEGY names no " + pass_ + " strategy; fastest predicted" if force != "auto" else "fastest predicted"
    return Choice(best, why, times)


def predict(pass_: str, strategy: str, M: int, N: int, K: int, r: int, fmt: int, x_bytes: int = 2,
            dropout: bool = False, needs_dx: bool = True) -> float:
    """Predicted microseconds of one pass on an H100 (module doc); inf for an unknown strategy."""
    w_elems = N * K
    w_bytes = {formats.FMT_4BIT: w_elems / 2 + w_elems / 64, formats.FMT_INT8: w_elems + 4 * N,
               formats.FMT_DENSE: w_elems * x_bytes}[fmt]
    lora_bytes = 4 * r * (N + K) if r else 0  # A, B (fp32 in peft's default)
    if pass_ == FORWARD and strategy == "gemv":
        from .decode import block_m

        bm = block_m(M)
        row_tiles = math.ceil(M / bm)
        issue = (_issue(SASS_PER_ELEMENT[("gemv", fmt, bm)] * w_elems * row_tiles)
                 + _mma(2 * row_tiles * bm * N * K, TRITON_FLOPS))
        mem = _mem(w_bytes * row_tiles + x_bytes * M * (K + N) + lora_bytes)
        return max(mem, issue) + LAUNCH_US
    if strategy == "dequant-mm":
        deq = _dequant(fmt, w_elems, w_bytes, x_bytes)
        if pass_ == FORWARD:
            gemm = max(_mma(2 * M * N * K, CUBLAS_FLOPS), _mem(x_bytes * (N * K + M * K + 2 * M * N)))
            lora = _mem(x_bytes * (M * K + M * N) + lora_bytes) if r else 0.0  # down: x once; up: y once
            return deq + gemm + lora + LAUNCH_US * (5 if r else 2)
        t = 0.0
        if needs_dx:
            t += deq + max(_mma(2 * M * N * K, CUBLAS_FLOPS), _mem(x_bytes * (N * K + M * N + 2 * M * K)))
        if r:  # g once (v, dB), x once and dx once (dA, the dx term)
            t += _mem(x_bytes * (M * N + M * K + (M * K if needs_dx else 0)) + lora_bytes) + LAUNCH_US * 6
        return t + LAUNCH_US * (2 if needs_dx else 0)
    if strategy == "fused":
        row_tiles = math.ceil(M / FUSED_BLOCK_M)
        decodes_w = pass_ == FORWARD or needs_dx  # backward without dx never reads W
        issue = _issue(SASS_PER_ELEMENT[("fused-" + pass_, fmt)] * w_elems * row_tiles) if decodes_w else 0.0
        flops = (2 * M * N * K if decodes_w else 0) + 4 * M * r * (N + K)
        act = M * (K + N) + (M * K if pass_ == BACKWARD and needs_dx else 0)  # x, y | g, x, dx
        mem = _mem((w_bytes * row_tiles if decodes_w else 0) + x_bytes * act + lora_bytes)
        launches = 3 if pass_ == FORWARD and dropout else 1  # dropout: zero u, down-projection, GEMM
        return max(mem, issue + _mma(flops, TRITON_FLOPS)) + LAUNCH_US * launches
    return math.inf


def _mem(n_bytes: float) -> float:
    return n_bytes / (HBM_BPS * STREAM_EFFICIENCY) * 1e6


def _issue(instructions: float) -> float:
    return instructions / (ISSUE_RATE * ISSUE_EFFICIENCY) * 1e6


def _mma(flops: float, rate: float) -> float:
    return flops / rate * 1e6


def _dequant(fmt: int, w_elems: int, w_bytes: float, x_bytes: int) -> float:
    """Writing W [N, K] in x.dtype into the workspace (none for a dense W in x.dtype)."""
    if fmt == formats.FMT_DENSE:
        return 0.0
    return max(_mem(w_bytes + x_bytes * w_elems), _issue(SASS_PER_ELEMENT[("dequant", fmt)] * w_elems)) + LAUNCH_US


def format_name(fmt: int) -> str:
    """The report's name of a weight format (kernels.backends.record)."""
    return {formats.FMT_4BIT: "quant4bit", formats.FMT_INT8: "int8", formats.FMT_DENSE: "dense"}[fmt]
