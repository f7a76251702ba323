"""Predicted time per benchmark row on an H100 SXM, from the static cost model, BEFORE any GPU run.

    .venv/bin/python benchmarks/predict.py [--r 16]      # a markdown table

Ours is `kernels.triton.strategy.predict` for the strategy `auto` picks (its constants: the
compiled SASS figures of benchmarks/aot_compile.py and DESIGN.md's H100 budgets); the other
providers get the same memory / MMA / launch terms applied to what they run:
    floor        the bare cuBLAS GEMM(s): max(2MNK / CUBLAS_FLOPS, bytes / bandwidth) per GEMM
    peft-fp32    bitsandbytes' dequantize (N*K/2 + absmax read, 2*N*K written) + the cuBLAS GEMM per
                 pass (forward without grad at M <= 16: bitsandbytes' small-M kernel, as bnb-gemm4bit),
                 and peft's LoRA branch in fp32 (peft's default), as its graph runs it:
                 forward  clone of y, x cast to fp32, A, B, the scale, the cast back, the add:
                          ~28 bytes per y element + 10 per x element, 8 launches
                 backward the same passes' gradients (casts, scale, two thin GEMMs each way,
                          the dx accumulation): ~22 bytes per y element + 20 per x element, 10 launches
    peft-bf16    the same with 2-byte LoRA intermediates (~16 / ~12 and 6 / 10 bytes)
    bnb-gemm4bit decode only: bitsandbytes' small-M kernel reading the packed W at half the bandwidth
                 (its own dispatcher notes, bitsandbytes/backends/cuda/ops.py), + 3 unfused LoRA launches
These are predictions to be confirmed or refuted by benchmarks/test_bench_lora.py on a GPU
(benchmarks/RESULTS.md); the table goes into benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
import os
import sys

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 512, 4096, 8192]


def _gemm(s, M, N, K) -> float:
    return max(s._mma(2 * M * N * K, s.CUBLAS_FLOPS), s._mem(2 * (M * K + N * K + M * N)))


def floor_us(s, M, N, K, train: bool) -> float:
    return (_gemm(s, M, N, K) + s.LAUNCH_US) * (2 if train else 1)


def peft_us(s, M, N, K, r, train: bool, lora_bytes: int) -> float:
    """peft + bitsandbytes (module doc); lora_bytes: 4 (fp32 adapters) or 2."""
    deq = s._mem(N * K / 2 + N * K / 64 + 2 * N * K) + s.LAUNCH_US * 2  # bnb: absmax, then the weight
    fwd_extra = {4: 28 * M * N + 10 * M * K, 2: 16 * M * N + 6 * M * K}[lora_bytes]
    base = _small_m(s, N, K) if M <= 16 and not train else deq + _gemm(s, M, N, K)
    t = base + s._mem(fwd_extra + lora_bytes * r * (N + K)) + s.LAUNCH_US * 9
    if train:
        bwd_extra = {4: 22 * M * N + 20 * M * K, 2: 12 * M * N + 10 * M * K}[lora_bytes]
        t += deq + _gemm(s, M, N, K) + s._mem(bwd_extra) + s.LAUNCH_US * 11
    return t


def _small_m(s, N, K) -> float:
    """bitsandbytes' small-M 4-bit kernel: the packed W at half the HBM bandwidth, one launch."""
    return s._mem(N * K / 2 + N * K / 64) * s.STREAM_EFFICIENCY / 0.5 + s.LAUNCH_US


def bnb_gemv_us(s, M, N, K, r) -> float:
    return _small_m(s, N, K) + s.LAUNCH_US * 3  # + the LoRA term: two thin GEMMs and an add


def rows(r: int = 16) -> list[dict]:
    from kernels import formats
    from kernels.triton import strategy as s

    out = []
    for K, N in SHAPES:
        for M in MS:
            for train in (False, True):
                f = s.choose("forward", M, N, K, r, formats.FMT_4BIT, 2, False)
                ours = dict(f.predicted_us)[f.strategy]
                used = f"fwd {f.strategy}"
                if train:
                    b = s.choose("backward", M, N, K, r, formats.FMT_4BIT, 2, False)
                    ours += dict(b.predicted_us)[b.strategy]
                    used += f", bwd {b.strategy}"
                row = dict(K=K, N=N, M=M, mode="fwd+bwd" if train else "fwd", strategy=used, ours=ours,
                           floor=floor_us(s, M, N, K, train), peft_fp32=peft_us(s, M, N, K, r, train, 4),
                           peft_bf16=peft_us(s, M, N, K, r, train, 2),
                           bnb=bnb_gemv_us(s, M, N, K, r) if M <= 16 and not train else None)
                out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| K | N | M | pass | ours us (strategy) | floor us | peft-fp32 us | peft-bf16 us | bnb-gemm4bit us | "
             "ours/floor | peft-fp32/ours | peft-bf16/ours |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['K']} | {t['N']} | {t['M']} | {t['mode']} | {f(t['ours'])} ({t['strategy']}) | "
                     f"{f(t['floor'])} | {f(t['peft_fp32'])} | {f(t['peft_bf16'])} | {f(t['bnb'])} | "
                     f"{t['ours'] / t['floor']:.2f}x | {t['peft_fp32'] / t['ours']:.2f}x | "
                     f"{t['peft_bf16'] / t['ours']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16, the benchmark's)")
    args = p.parse_args(argv)
    if not 1 <= args.r <= 128:
        p.error(f"--r {args.r}: the triton kernels take ranks 1..128")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(markdown(rows(args.r)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
