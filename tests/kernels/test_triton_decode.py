"""Small-M (decode, M <= 16) path: kernels/triton/decode.py against the float64 spec.

Ground truth and tolerance: builders.py. On GPU the shapes are Llama-7B's (K, N).
"""
import pytest
import torch

from builders import ON_GPU, assert_close, make_lora, make_weight, poisoned, rand, ref_forward, seed_tensor
from kernels.call import make_call
from kernels.triton import decode, launch
KN = (4096, 11008) if ON_GPU else (130, 333)  # (K, N)

# (id, fmt, M, x dtype, r, bias, dropout_p, weight options)
CASES = [
    ("nf4-nested-bf16-M1-bias", "nf4", 1, torch.bfloat16, 8, True, 0.0, {}),
    ("fp4-fp32absmax-fp16-M3-drop", "fp4", 3, torch.float16, 1, False, 0.1, {"nested": False}),
    ("int8-fp16-M16-r64-drop", "int8", 16, torch.float16, 64, True, 0.1, {}),
    ("dense-conv1d-bf16-M5", "dense", 5, torch.bfloat16, 8, False, 0.0, {"transposed": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference(case):
    _, fmt, M, dt, r, has_bias, p, wopts = case
    K, N = KN
    weight, W64 = make_weight(fmt, N, K, **wopts)
    A, B = make_lora(N, K, r)
    x = rand((M, K), dt)
    bias = rand((N,), torch.float32, seed=3) if has_bias else None
    y, u = decode.decode_forward(x, weight.kernel_args(), bias, A, B, 2.0, p, seed_tensor(5),
                                 out=poisoned((M, N), dt), u_out=poisoned((M, r), torch.float32))
    y_ref, u_ref, mag_y, mag_u = ref_forward(x, W64, bias, A, B, 2.0, p, 5)
    assert_close("u", u, u_ref, mag_u, dt)
    assert_close("y", y, y_ref, mag_y, dt)


def test_decode_boundary_and_base_only(monkeypatch):
    """launch.forward: M <= 16 takes the decode path, M = 17 the tiled kernel; M = 16 without LoRA
    (no u) works on the decode path."""
    K, N = KN
    weight, W64 = make_weight("nf4", N, K)
    seen = []
    for mod, name in ((launch, "fused_forward"), (decode, "decode_forward")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _r=real, **k: seen.append(_n) or _r(*a, **k))
    x = rand((17, K), torch.bfloat16)
    launch.forward(make_call(x, weight, None, None, None, 1.0, 0.0, False, None, None), None)
    x16 = x[:16]
    y, u = launch.forward(make_call(x16, weight, None, None, None, 1.0, 0.0, False, None, None), None)
    assert seen == ["fused_forward", "decode_forward"] and u is None
    y_ref, _, mag, _ = ref_forward(x16, W64, None, None, None, 1.0, 0.0, None)
    assert_close("y", y, y_ref, mag, x.dtype)


def test_every_autotune_config():
    """Every GEMV config autotuning may pick is correct (CPU: the interpreter's one config)."""
    K, N = KN
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 16)
    x = rand((7, K), torch.bfloat16)
    y_ref, u_ref, mag_y, mag_u = ref_forward(x, W64, None, A, B, 2.0, 0.1, 3)
    configs = decode.GPU_CONFIGS if ON_GPU else decode.lora_gemv_kernel.configs
    for cfg in configs:
        y, u = decode.decode_forward(x, weight.kernel_args(), None, A, B, 2.0, 0.1, seed_tensor(3),
                                     out=poisoned((7, N), x.dtype), config=cfg)
        assert_close(f"u {cfg}", u, u_ref, mag_u, x.dtype)
        assert_close(f"y {cfg}", y, y_ref, mag_y, x.dtype)
