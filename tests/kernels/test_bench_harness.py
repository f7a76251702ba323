"""The layer benchmark's harness (benchmarks/lora_providers.py, test_bench_lora.py): every provider's
outputs are checked against the fp32 spec on its own weights, and the check is tight enough to
tell a 4-bit W from the dense one; `make bench` (its CPU smoke rows) prints which strategy the
triton backend ran and every row's check."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
lora_providers = pytest.importorskip("lora_providers")
pytest.importorskip("bitsandbytes")

M, K, N = 6, 128, 96  # K % 64 == 0: bitsandbytes' CPU kernels


@pytest.fixture(scope="module")
def shape():
    sh = lora_providers.shared(K, N, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).bfloat16()
    g = torch.randn(M, N, generator=gen).bfloat16()
    return sh, x, g


@pytest.mark.parametrize("provider", ["ours-torch", "peft-fp32", "peft-bf16", "floor", "dense-lora-unfused"])
def test_each_provider_passes_its_check(shape, provider):
    sh, x, g = shape
    layer = lora_providers.build(provider, sh, torch.device("cpu"))
    got = lora_providers.outputs(layer, x, g)
    assert lora_providers.check(got, lora_providers.reference(provider, sh, x, g)) == "ok"


def test_the_check_fails_a_wrong_weight_and_a_missing_output(shape):
    sh, x, g = shape
    dense = lora_providers.outputs(lora_providers.build("dense-lora-unfused", sh, torch.device("cpu")), x, g)
    quantized_ref = lora_providers.reference("ours-torch", sh, x, g)  # the 4-bit W's spec
    verdict = lora_providers.check(dense, quantized_ref)
    assert verdict.startswith("y: ") and "dx: " in verdict  # the 4-bit error is far above rounding
    del dense["dB"]
    assert "dB missing" in lora_providers.check(dense, lora_providers.reference("dense-lora-unfused", sh, x, g))


@pytest.mark.slow
def test_make_bench_smoke_rows_print_the_strategy_and_the_checks():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAFUSE_STRATEGY")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                           str(BENCH / "test_bench_lora.py")], capture_output=True, text=True, env=env,
                          cwd=BENCH.parent, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 128 | 160 |")]
    assert len(rows) == 3 and all(line.endswith("| ok |") for line in rows), rows
    assert "triton strategy | checks |" in proc.stdout
    fwd, train = (next(r for r in rows if f"| 24 | {m} |" in r) for m in ("fwd", "fwd+bwd"))
    assert "fwd: gemv" in fwd and "fwd: gemv, bwd: dequant-mm" in train  # what the cost model picks at M = 24


def test_the_decode_provider_passes_its_check(shape):
    """bnb-gemm4bit (bitsandbytes' own small-M dispatcher): forward only, as the decode rows run it."""
    sh, x, _ = shape
    layer = lora_providers.build("bnb-gemm4bit", sh, torch.device("cpu"))
    with torch.no_grad():
        y = layer.fwd(x[:4])
    assert lora_providers.check({"y": y}, lora_providers.reference("bnb-gemm4bit", sh, x[:4], None)) == "ok"
