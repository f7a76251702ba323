"""pytest-benchmark suite: one LoRA layer, every provider (lora_providers.py), forward and fwd+bwd.

GPU rows (Llama-7B-like): (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)}, r = 16, bf16,
M in {1, 16, 512, 4096, 8192}. Per row:
  - check: the provider's outputs (y; with fwd+bwd also dx, dA, dB) against the fp32 spec on its
    own weights at this very shape (lora_providers.check), before any timing; a provider that is
    off fails the row (after the row is recorded, so the table shows it);
  - ms: triton.testing.do_bench (median; warm-up first; L2 flushed between runs; inputs rotated
    from a pool of 4);
  - ms_graph (M <= 16, both passes): the step inside one CUDA graph that runs it once on each of
    `copies` layers built on separate copies of the weights (together > 2x the L2), divided by
    copies, so the graph's replays never find a weight in L2. A provider (or pass) that cannot be
    captured says why, and its row is marked host-bound: at M <= 16 launch overhead dominates a
    10 us layer without a graph;
  - peak_mib: allocated bytes above the resident ones during one step, measured with every
    input's stale gradient freed first;
  - strategy: for ours-triton, what the triton backend ran (kernels.backend_report()).
On a CPU machine the GPU rows are skipped with the reason and tiny smoke rows run every provider
(ours-triton through Triton's interpreter), checked the same way.

Run: `make bench` (= pytest benchmarks --benchmark-only); on a GPU: benchmarks/run_gpu.sh.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import bench_table
from lora_providers import DECODE_ONLY, PROVIDERS, build, check, flops, outputs, reference, shared

ON_GPU = torch.cuda.is_available()
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 512, 4096, 8192]
MODES = ["fwd", "fwd+bwd"]
GPU_ROWS = [(K, N, M, mode, p) for (K, N), M, mode, p in itertools.product(SHAPES, MS, MODES, PROVIDERS)
            if p not in DECODE_ONLY or (mode == "fwd" and M <= 16)]
SMOKE = [(24, 128, 160, mode, p) for mode in MODES for p in PROVIDERS if p not in DECODE_ONLY]
SMOKE += [(4, 128, 160, "fwd", p) for p in DECODE_ONLY]  # (M, K, N, mode, provider); K % 64 == 0 (bnb's CPU kernel)
L2_BYTES = 64 * 2**20  # H100 / H200: 50 MB; a margin over it
GRAPH_M = 16  # rows up to which the graph time is taken

_cache: dict = {}  # (K, N) -> (Shared, {(provider, copies): [Layer]}); one shape resident at a time


def _layers(provider, K, N, device, copies):
    if _cache.get("shape") != (K, N):
        _cache.clear()
        torch.cuda.empty_cache() if ON_GPU else None
        _cache.update(shape=(K, N), shared=shared(K, N, device), built={})
    built = _cache["built"]
    have = built.setdefault(provider, [])
    while len(have) < copies:
        have.append(build(provider, _cache["shared"], device))
    return _cache["shared"], have[:copies]


def _inputs(M, K, N, device, train, n=4):
    gen = torch.Generator(device=device).manual_seed(M)
    xs = [torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(train)
          for _ in range(n)]
    return xs, torch.randn(M, N, device=device, dtype=torch.bfloat16, generator=gen)


def _step(layer, x, g, train):
    """One step: forward (no grad), or forward + backward with fresh gradients."""
    if not train:
        with torch.no_grad():
            return layer.fwd(x)
    for p in layer.params:
        p.grad = None
    x.grad = None
    layer.fwd(x).backward(g)


def _strategy(M, K, N) -> str:
    import kernels

    ran = sorted({(e["pass"], e["strategy"]) for e in kernels.backend_report()
                  if (e["M"], e["N"], e["K"]) == (M, N, K) and e["backend"] == "triton"})
    short = {"forward": "fwd", "backward": "bwd"}
    return ", ".join(f"{short[p]}: {s}" for p, s in sorted(ran, key=lambda t: t[0] != "forward")) or "-"


def _run_row(benchmark, provider, K, N, M, mode):
    import kernels.backends

    device = torch.device("cuda" if ON_GPU else "cpu")
    train = mode == "fwd+bwd"
    sh, (layer,) = _layers(provider, K, N, device, 1)
    xs, g = _inputs(M, K, N, device, train)
    row = dict(provider=provider, K=K, N=N, M=M, mode=mode)
    kernels.backends.reset_report()
    g_or_none = g if train else None
    row["check"] = check(outputs(layer, xs[0], g_or_none), reference(provider, sh, xs[0], g_or_none))
    it = itertools.cycle(xs)
    step = lambda: _step(layer, next(it), g, train)  # noqa: E731
    if ON_GPU:
        import triton.testing

        step()  # autotune + warm-up outside the timings
        torch.cuda.synchronize()
        row["ms"] = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
        if M <= GRAPH_M:
            copies = max(2, min(16, math.ceil(2 * L2_BYTES / layer.weight_bytes)))
            _, many = _layers(provider, K, N, device, copies)
            steps = [(lay, x) for lay, x in zip(many, itertools.cycle(xs))]
            try:
                ms = triton.testing.do_bench_cudagraph(lambda: [_step(lay, x, g, train) for lay, x in steps],
                                                       rep=100, return_mode="median")
                row["ms_graph"], row["graph_copies"] = ms / copies, copies
            except Exception as e:  # a provider that cannot be captured: say so in the row
                row["ms_graph_error"] = f"{type(e).__name__}: {e}"[:200]
                row["host_bound"] = True
        torch.cuda.synchronize()
        for x in xs:  # free every stale input gradient before the baseline
            x.grad = None
        for p in layer.params:
            p.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20

        def synced():
            step()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
        t = row.get("ms_graph", row["ms"]) * 1e-3  # throughput from the graph time when there is one
        row["tflops"] = flops(M, K, N, mode, lora=provider != "floor") / t / 1e12
        row["gbps"] = layer.weight_bytes / t / 1e9
        bw = bench_table.hbm_gbps(torch.cuda.get_device_name())
        row["hbm_pct"] = 100 * row["gbps"] / bw if bw else None
    else:
        # One warm-up round keeps one-time costs (lazy imports, weight-record caches) out of the
        # rows; the interpreter-run triton row (~0.2 s a call) gets a single timed round.
        rounds = 1 if provider == "ours-triton" else 5
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        row["ms"] = benchmark.stats.stats.median * 1e3
    if provider == "ours-triton":
        row["strategy"] = _strategy(M, K, N)
    benchmark.extra_info.update(row)
    bench_table.RESULTS.append(row)
    assert row["check"] == "ok", f"{provider} at M={M} K={K} N={N} {mode}: {row['check']}"


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: GPU figures pending (run benchmarks/run_gpu.sh "
                                      "on a GPU machine); the CPU smoke rows ran instead")
@pytest.mark.parametrize("K,N,M,mode,provider", GPU_ROWS,
                         ids=[f"K{K}-N{N}-M{M}-{mode}-{p}" for K, N, M, mode, p in GPU_ROWS])
def test_layer_gpu(benchmark, K, N, M, mode, provider):
    benchmark.group = f"K{K}-N{N}-M{M}-{mode}"
    _run_row(benchmark, provider, K, N, M, mode)


@pytest.mark.skipif(ON_GPU, reason="CPU smoke size; the GPU rows run on this machine")
@pytest.mark.parametrize("M,K,N,mode,provider", SMOKE, ids=[f"M{M}-{mode}-{p}" for M, K, N, mode, p in SMOKE])
def test_layer_cpu_smoke(benchmark, M, K, N, mode, provider):
    """Every provider builds, runs and is checked at a tiny size (proves the suite, times nothing real)."""
    benchmark.group = f"smoke-M{M}-{mode}"
    _run_row(benchmark, provider, K, N, M, mode)
