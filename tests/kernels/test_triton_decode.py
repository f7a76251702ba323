"""The "gemv" strategy (kernels/triton/decode.py) against the float64 spec: the byte -> pair table,
split-K with its last-arriver epilogue, the down-projection programs of the same launch, the
self-resetting counters, EVEN_N / EVEN_K and the generic loaders of the other formats.

Ground truth and tolerance: builders.py (W_ROUNDINGS["gemv"]: the pair table's x.dtype decode).
On GPU the shapes are Llama-7B's (K, N).
"""
import pytest
import torch

from builders import (ON_GPU, W_ROUNDINGS, assert_close, make_lora, make_weight, poisoned, rand, ref_forward,
                      seed_tensor)
from kernels.triton import decode

KN = (4096, 11008) if ON_GPU else (130, 333)  # (K, N): odd, no tile divides them
EVEN = (4096, 4096) if ON_GPU else (128, 64)  # every tile divides them (EVEN_N, EVEN_K)

# (id, fmt, M, (K, N), x dtype, r, bias, dropout_p, K splits, weight options)
CASES = [
    ("nf4-nested-bf16-M1-bias", "nf4", 1, KN, torch.bfloat16, 8, True, 0.0, 1, {}),
    ("nf4-even-split2-drop", "nf4", 5, EVEN, torch.bfloat16, 16, False, 0.1, 2, {}),
    ("fp4-fp32absmax-fp16-M3-drop", "fp4", 3, KN, torch.float16, 1, False, 0.1, 2, {"nested": False}),
    ("nf4-r128-M37-split3", "nf4", 37, KN, torch.bfloat16, 128, True, 0.0, 3, {}),
    ("nf4-M70-two-row-tiles", "nf4", 70, EVEN, torch.float16, 8, True, 0.25, 1, {"dtype": torch.float16}),
    ("nf4-blocksize128-wfp32", "nf4", 16, (256, 96), torch.bfloat16, 8, False, 0.0, 2,
     {"blocksize": 128, "dtype": torch.float32}),
    ("nf4-oddK-generic-loader", "nf4", 4, (77, 35), torch.bfloat16, 8, False, 0.1, 1, {}),
    ("int8-fp16-M16-r64-drop", "int8", 16, KN, torch.float16, 64, True, 0.1, 2, {}),
    ("dense-conv1d-bf16-M5", "dense", 5, KN, torch.bfloat16, 8, False, 0.0, 3, {"transposed": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gemv_matches_reference(case):
    _, fmt, M, (K, N), dt, r, has_bias, p, splits, wopts = case
    weight, W64 = make_weight(fmt, N, K, **wopts)
    A, B = make_lora(N, K, r)
    x = rand((M, K), dt)
    bias = rand((N,), torch.float32, seed=3) if has_bias else None
    y, u = decode.gemv_forward(x, weight, bias, A, B, 2.0, p, seed_tensor(5), splits=splits,
                               out=poisoned((M, N), dt), u_out=poisoned((M, r), torch.float32))
    y_ref, u_ref, mag_y, mag_u = ref_forward(x, W64, bias, A, B, 2.0, p, 5)
    assert_close("u", u, u_ref, mag_u, dt)
    w_roundings = W_ROUNDINGS["gemv"] if decode.uses_pair_table(weight.kernel_args()) else 0
    assert_close("y", y, y_ref, mag_y, dt, w_roundings=w_roundings)


def test_counters_are_left_zeroed_and_a_second_launch_agrees():
    """The launch resets its own ticket, done and per-tile counters (no memset launch, CUDA-graph
    replays), so back-to-back launches, with and without LoRA and split-K, give the same result."""
    K, N = EVEN
    weight, _ = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 8)
    x = rand((7, K), torch.bfloat16)
    for lora, splits in ((True, 2), (False, 2), (True, 1)):
        a, b = (A, B) if lora else (None, None)
        first = decode.gemv_forward(x, weight, None, a, b, 2.0, 0.0, None, splits=splits)[0]
        sync = decode.sync_buffer(x.device, 1)
        assert not sync.any(), sync[:8].tolist()
        second = decode.gemv_forward(x, weight, None, a, b, 2.0, 0.0, None, splits=splits)[0]
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_table_holds_both_codes_of_a_byte(dtype):
    """Entry b: dtype(code[b >> 4]) in the low 16 bits (element 2j), dtype(code[b & 15]) in the high."""
    weight, _ = make_weight("nf4", 8, 64)
    table = decode.pair_table(weight, dtype).cpu().to(torch.int64) & 0xFFFFFFFF
    code = weight.code.cpu().to(dtype)
    b = torch.arange(256)
    lo = (table & 0xFFFF).to(torch.int16).view(dtype)
    hi = ((table >> 16) & 0xFFFF).to(torch.int16).view(dtype)
    assert torch.equal(lo, code[b >> 4]) and torch.equal(hi, code[b & 15])
    assert decode.pair_table(weight, dtype) is decode.pair_table(weight, dtype)  # memoised on the record


def test_split_k_fills_the_gpu_without_empty_splits():
    cfg = decode.GPU_CONFIGS[16][0]
    assert decode.split_k(1, 4096, 4096, cfg, 132) > 1  # 32 column tiles on 132 SMs
    assert decode.split_k(1, 65536, 4096, cfg, 132) == 1  # enough tiles already
    assert decode.split_k(1, 4096, 256, cfg, 132) == 1  # each split keeps >= 2 K tiles
    assert [decode.block_m(m) for m in (1, 16, 17, 32, 33, 64, 65, 4096)] == [16, 16, 32, 32, 64, 64, 64, 64]
