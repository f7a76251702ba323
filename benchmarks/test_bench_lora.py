"""pytest-benchmark suite: one LoRA layer, four providers (lora_providers.py), forward and fwd+bwd.

GPU rows (Llama-7B-like): (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)}, r = 16, bf16,
M in {1, 16, 512, 4096, 8192}. Each row is timed by triton.testing.do_bench (median of many runs,
L2 flushed between runs, warm-up first, inputs rotated from a pool of 4); the M <= 16 forward rows
are also timed inside a CUDA graph (`ms_graph`), which removes Python launch overhead that would
otherwise dominate a 10-microsecond layer for every provider. pytest-benchmark's own wall-clock
stats (with a device synchronize) are kept alongside. Peak memory: the extra allocated over the
resident tensors during one step. On a CPU machine the GPU rows are skipped with the reason and
a tiny smoke size runs every provider once (ours-triton through Triton's interpreter).

Run: `make bench` (= pytest benchmarks --benchmark-only); on a GPU: benchmarks/run_gpu.sh.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import bench_table
from lora_providers import PROVIDERS, build, flops

ON_GPU = torch.cuda.is_available()
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 512, 4096, 8192]
MODES = ["fwd", "fwd+bwd"]
GPU_ROWS = [(K, N, M, mode, p) for (K, N), M, mode, p in itertools.product(SHAPES, MS, MODES, PROVIDERS)]
SMOKE = (24, 96, 160)  # (M, K, N) on CPU

_layers: dict = {}  # (provider, K, N) -> Layer; one shape resident at a time (memory)


def _layer(provider, K, N, device):
    key = (provider, K, N)
    if key not in _layers:
        for k in [k for k in _layers if k[1:] != (K, N)]:
            del _layers[k]
        torch.cuda.empty_cache() if ON_GPU else None
        _layers[key] = build(provider, K, N, device)
    return _layers[key]


def _step_fn(layer, M, K, N, mode, device):
    """A closure running one step on rotating inputs: forward (no grad) or forward + backward."""
    gen = torch.Generator(device=device).manual_seed(M)
    train = mode == "fwd+bwd"
    xs = [torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(train)
          for _ in range(4)]
    g = torch.randn(M, N, device=device, dtype=torch.bfloat16, generator=gen)
    it = itertools.cycle(xs)

    def step():
        x = next(it)
        if not train:
            with torch.no_grad():
                return layer.fwd(x)
        for p in layer.params:
            p.grad = None
        x.grad = None
        layer.fwd(x).backward(g)

    return step


def _run_row(benchmark, provider, K, N, M, mode):
    device = torch.device("cuda" if ON_GPU else "cpu")
    layer = _layer(provider, K, N, device)
    step = _step_fn(layer, M, K, N, mode, device)
    row = dict(provider=provider, K=K, N=N, M=M, mode=mode)
    if ON_GPU:
        import triton.testing

        step()  # autotune + warm-up outside the timings
        torch.cuda.synchronize()
        row["ms"] = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
        if M <= 16 and mode == "fwd":
            try:
                row["ms_graph"] = triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median")
            except Exception as e:  # a provider that cannot be captured: say so in the row
                row["ms_graph_error"] = f"{type(e).__name__}: {e}"[:200]
        torch.cuda.synchronize()
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
        row["tflops"] = flops(M, K, N, mode) / t / 1e12
        row["gbps"] = layer.weight_bytes / t / 1e9
        bw = bench_table.hbm_gbps(torch.cuda.get_device_name())
        row["hbm_pct"] = 100 * row["gbps"] / bw if bw else None
    else:
        # One warm-up round keeps one-time costs (lazy imports, weight-record caches) out of the
        # rows; the interpreter-run triton row (~0.2 s a call) gets a single timed round.
        rounds = 1 if provider == "ours-triton" else 5
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        row["ms"] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(row)
    bench_table.RESULTS.append(row)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: GPU figures pending (run benchmarks/run_gpu.sh "
                                      "on a GPU machine); the CPU smoke rows ran instead")
@pytest.mark.parametrize("K,N,M,mode,provider", GPU_ROWS,
                         ids=[f"K{K}-N{N}-M{M}-{mode}-{p}" for K, N, M, mode, p in GPU_ROWS])
def test_layer_gpu(benchmark, K, N, M, mode, provider):
    benchmark.group = f"K{K}-N{N}-M{M}-{mode}"
    _run_row(benchmark, provider, K, N, M, mode)


@pytest.mark.skipif(ON_GPU, reason="CPU smoke size; the GPU rows run on this machine")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer_cpu_smoke(benchmark, provider, mode):
    """Every provider builds and runs one step at a tiny size (proves the suite, times nothing real)."""
    M, K, N = SMOKE
    benchmark.group = f"smoke-{mode}"
    _run_row(benchmark, provider, K, N, M, mode)
