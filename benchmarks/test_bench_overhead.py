"""Per-call host overhead of `kernels.lora_linear` on CPU (pytest-benchmark).

At M = 1, K = N = 64, r = 4 the arithmetic is a few hundred nanoseconds, so a call's time is what
the entry point costs around it: validation, the backend choice, the autograd wiring and the
torch calls of the backend's own path. Each case runs one layer call the way a training or
inference step makes it: `nograd` = forward under torch.no_grad(); `train` = forward + backward of
x, A and B. Backends: "torch", and "auto" (what LoraLinear uses by default; on CPU it asks the
Triton backend why not, then runs the torch one).

Run: .venv/bin/python -m pytest benchmarks/test_bench_overhead.py --benchmark-only
(compare the medians before and after a change; benchmarks/NOTES.md keeps the last figures).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import kernels

M, K, N, R = 1, 64, 64, 4


def _weight(fmt: str):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=gen) * 0.1
    if fmt == "dense":
        return kernels.DenseWeight(W)
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return kernels.Quant4bitWeight.from_bnb(packed, state)


CASES = [(fmt, mode, backend, p) for fmt in ("dense", "nf4") for mode in ("nograd", "train")
         for backend in ("torch", "auto") for p in (0.0, 0.05) if not (mode == "nograd" and p)]


@pytest.mark.parametrize("fmt,mode,backend,p", CASES,
                         ids=[f"{f}-{m}-{b}-p{p}" for f, m, b, p in CASES])
def test_lora_linear_call_overhead(benchmark, fmt, mode, backend, p):
    weight = _weight(fmt)
    train = mode == "train"
    x = torch.randn(M, K).requires_grad_(train)
    A = (torch.randn(R, K) * 0.1).requires_grad_(train)
    B = (torch.randn(N, R) * 0.1).requires_grad_(train)
    g = torch.ones(M, N)

    def call():
        return kernels.lora_linear(x, weight, None, A, B, 2.0, p, training=train, backend=backend)

    def step():
        if not train:
            with torch.no_grad():
                return call()
        x.grad = A.grad = B.grad = None
        call().backward(g)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto's one-time "falls back to torch" warning
        for _ in range(20):  # warm-up: lazy imports, cached records, bitsandbytes' first call
            step()
        benchmark(step)
