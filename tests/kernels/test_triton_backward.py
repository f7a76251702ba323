"""The Triton backward strategies against the float64 spec: dx, dA, dB from "fused"
(kernels/triton/backward.py) and "dequant-mm" (mm.py) on the same cases.

u (the forward's thin saved activation) is the float64 spec's, handed to both sides, so this file
tests the backward alone. Ground truth and tolerance: builders.py.
"""
import pytest
import torch

import kernels
from builders import (DEVICE, ODD, ON_GPU, SMALL, assert_close, make_lora, make_weight, poisoned, rand,
                      ref_backward, ref_forward, seed_tensor, triton_backward, triton_forward)
from kernels.triton import backward, launch

# (id, fmt, shape, x dtype, r, dropout_p, needs_dx, LoRA dtype, weight options)
CASES = [
    ("nf4-nested-bf16-r8-drop", "nf4", ODD, torch.bfloat16, 8, 0.1, True, torch.float32, {}),
    ("fp4-fp32absmax-fp16-r1", "fp4", SMALL, torch.float16, 1, 0.0, True, torch.float32,
     {"nested": False}),
    ("int8-bf16-r64-drop", "int8", SMALL, torch.bfloat16, 64, 0.25, True, torch.float32, {}),
    ("nf4-nested-bf16-r128-drop", "nf4", SMALL, torch.bfloat16, 128, 0.1, True, torch.float32, {}),  # largest rank
    ("dense-bf16-r8", "dense", ODD, torch.bfloat16, 8, 0.0, True, torch.float32, {}),
    ("dense-conv1d-view-fp16-drop", "dense", SMALL, torch.float16, 8, 0.1, True, torch.float32,
     {"dtype": torch.float16, "transposed": True}),
    ("nf4-no-dx-drop", "nf4", ODD, torch.bfloat16, 8, 0.1, False, torch.float32, {}),
    ("nf4-oddK-drop", "nf4", (21, 77, 35), torch.bfloat16, 8, 0.1, True, torch.float32, {}),
    ("int8-lora-bf16-autocast", "int8", SMALL, torch.bfloat16, 8, 0.0, True, torch.bfloat16, {}),
    ("nf4-small-M", "nf4", (5, 130, 70), torch.bfloat16, 8, 0.1, True, torch.float32, {}),
    ("nf4-blocksize32", "nf4", (21, 320, 70), torch.bfloat16, 8, 0.0, True, torch.float32,
     {"blocksize": 32}),
]


@pytest.mark.parametrize("strategy", ["fused", "dequant-mm"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(case, strategy):
    _, fmt, (M, K, N), dt, r, p, needs_dx, lora_dt, wopts = case
    weight, W64 = make_weight(fmt, N, K, **wopts)
    A, B = make_lora(N, K, r, dtype=lora_dt)
    x = rand((M, K), dt)
    g = rand((M, N), dt, seed=4)
    s, seed = 0.5, 99
    _, u64, _, _ = ref_forward(x, W64, None, A, B, s, p, seed)
    u = u64.float()  # what the fused forward hands over (fp32)
    dx_out = poisoned((M, K), dt) if needs_dx else None

    dx, dA, dB = triton_backward(g, x, u, weight, A, B, s, p, seed, needs_dx, dx_out=dx_out, strategy=strategy)

    (dx_r, dA_r, dB_r), (mdx, mdA, mdB) = ref_backward(g, x, u.double(), W64, A, B, s, p, seed,
                                                       needs_dx)
    assert dA.dtype == lora_dt and dB.dtype == lora_dt
    # a bf16 LoRA dtype rounds dA/dB once more: the same unit roundoff as x's when x is bf16
    assert_close("dA", dA, dA_r, mdA, dt)
    assert_close("dB", dB, dB_r, mdB, dt)
    if needs_dx:
        assert dx.dtype == dt and dx.data_ptr() == dx_out.data_ptr()
        assert_close("dx", dx, dx_r, mdx, dt)
    else:
        assert dx is None


@pytest.mark.parametrize("strategy", ["fused", "dequant-mm"])
def test_backward_base_only(strategy):
    """A = B = None: dx = g @ deq(W) only."""
    M, K, N = SMALL
    weight, W64 = make_weight("nf4", N, K)
    x, g = rand((M, K), torch.bfloat16), rand((M, N), torch.bfloat16, seed=4)
    dx, dA, dB = triton_backward(g, x, None, weight, None, None, 1.0, dx_out=poisoned((M, K), x.dtype),
                                 strategy=strategy)
    assert dA is None and dB is None
    ref = g.double() @ W64
    mag = g.double().abs() @ W64.abs()
    assert_close("dx", dx, ref, mag, x.dtype)


def test_forward_backward_roundtrip_uses_kernel_u():
    """The u the fused forward returns is the one backward needs: fwd -> bwd equals the spec."""
    M, K, N = SMALL
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 8)
    x, g = rand((M, K), torch.bfloat16), rand((M, N), torch.bfloat16, seed=4)
    _, u = triton_forward(x, weight, None, A, B, 2.0, 0.2, 7)
    dx, dA, dB = triton_backward(g, x, u, weight, A, B, 2.0, 0.2, 7)
    _, u64, _, mag_u = ref_forward(x, W64, None, A, B, 2.0, 0.2, 7)
    (dx_r, dA_r, dB_r), (mdx, mdA, mdB) = ref_backward(g, x, u64, W64, A, B, 2.0, 0.2, 7)
    # dB = s g^T u: u carries its own (bf16-sized) error from A's rounding; bound it through mag
    assert_close("dB", dB, dB_r, mdB, x.dtype)
    assert_close("dA", dA, dA_r, mdA, x.dtype)
    assert_close("dx", dx, dx_r, mdx, x.dtype)


def test_through_lora_linear_autograd():
    """kernels.lora_linear(backend="triton") -> autograd.py -> these ops: y and all grads (x, A, B)
    of a 3-D input against the float64 spec, with dropout from an explicit seed."""
    M, K, N = SMALL
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 8)
    x = rand((2, M, K), torch.bfloat16).requires_grad_()
    A.requires_grad_(), B.requires_grad_()
    y = kernels.lora_linear(x, weight, None, A, B, 2.0, 0.1, training=True, backend="triton", seed=5)
    g = rand((2, M, N), torch.bfloat16, seed=4)
    y.backward(g)

    x2, g2 = x.detach().reshape(-1, K), g.reshape(-1, N)
    y_r, u64, mag_y, _ = ref_forward(x2, W64, None, A.detach(), B.detach(), 2.0, 0.1, 5)
    assert_close("y", y.detach().reshape(-1, N), y_r, mag_y, x.dtype)
    (dx_r, dA_r, dB_r), (mdx, mdA, mdB) = ref_backward(g2, x2, u64, W64, A.detach(), B.detach(),
                                                       2.0, 0.1, 5)
    assert_close("dx", x.grad.reshape(-1, K), dx_r, mdx, x.dtype)
    assert_close("dA", A.grad, dA_r, mdA, x.dtype)
    assert_close("dB", B.grad, dB_r, mdB, x.dtype)


@pytest.mark.parametrize("needs_dx", [True, False])
def test_every_autotune_config(needs_dx):
    """Every backward config autotuning may pick is correct (CPU: the interpreter's one config)."""
    M, K, N = (300, 1000, 700) if ON_GPU else (40, 70, 50)
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 16)
    x, g = rand((M, K), torch.bfloat16), rand((M, N), torch.bfloat16, seed=4)
    _, u64, _, _ = ref_forward(x, W64, None, A, B, 0.5, 0.1, 3)
    (dx_r, dA_r, dB_r), (mdx, mdA, mdB) = ref_backward(g, x, u64, W64, A, B, 0.5, 0.1, 3, needs_dx)
    configs = backward.GPU_CONFIGS if ON_GPU else backward.lora_backward_kernel.configs
    for cfg in configs:
        dx, dA, dB = backward.fused_backward(g, x, u64.float(), weight.kernel_args(), A, B, 0.5, 0.1,
                                             seed_tensor(3), needs_dx,
                                             dx_out=poisoned((M, K), x.dtype) if needs_dx else None, config=cfg)
        assert_close(f"dA {cfg}", dA, dA_r, mdA, x.dtype)
        assert_close(f"dB {cfg}", dB, dB_r, mdB, x.dtype)
        if needs_dx:
            assert_close(f"dx {cfg}", dx, dx_r, mdx, x.dtype)


def test_base_only_through_lora_linear_uses_triton(monkeypatch):
    """An adapter disabled or merged calls lora_linear with A = B = None: the triton backend must run
    the fused ops for it too (not quietly the torch reference), forward and dx, against the spec."""
    calls = []
    real_fwd, real_bwd = launch.forward, launch.backward
    monkeypatch.setattr(launch, "forward", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    monkeypatch.setattr(launch, "backward", lambda *a, **k: calls.append("bwd") or real_bwd(*a, **k))
    M, K, N = SMALL
    weight, W64 = make_weight("nf4", N, K)
    bias = rand((N,), torch.bfloat16, seed=6)
    x = rand((M, K), torch.bfloat16).requires_grad_()
    y = kernels.lora_linear(x, weight, bias, None, None, 1.0, backend="triton")
    g = rand((M, N), torch.bfloat16, seed=4)
    y.backward(g)
    assert calls == ["fwd", "bwd"], calls

    A0, B0 = torch.zeros(1, K), torch.zeros(N, 1)  # the spec with a zero adapter = the base layer
    y_r, u64, mag_y, _ = ref_forward(x.detach(), W64, bias, A0, B0, 1.0, 0.0, None)
    assert_close("y", y.detach(), y_r, mag_y, x.dtype)
    (dx_r, _, _), (mdx, _, _) = ref_backward(g, x.detach(), u64, W64, A0, B0, 1.0, 0.0, None)
    assert_close("dx", x.grad, dx_r, mdx, x.dtype)


def test_seed_drawn_on_the_device_and_kept_for_backward():
    """seed=None on the triton backend: the Philox seed is drawn from torch's generator as a device
    tensor (no host sync; a CUDA-graph replay draws a new one), saved for backward, and the same
    torch.manual_seed gives the same mask; a strided 1-D bias is read correctly."""
    M, K, N = SMALL
    weight, W64 = make_weight("int8", N, K)
    A, B = make_lora(N, K, 8)
    x = rand((M, K), torch.bfloat16)
    bias = rand((2 * N,), torch.float32, seed=3)[::2]  # a strided [N] view
    runs = []
    for _ in range(2):
        torch.manual_seed(21)
        runs.append(kernels.lora_linear(x, weight, bias, A, B, 2.0, 0.3, training=True, backend="triton"))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(21)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=DEVICE).item())
    y_r, _, mag_y, _ = ref_forward(x, W64, bias.contiguous(), A, B, 2.0, 0.3, seed)
    assert_close("y", runs[0], y_r, mag_y, x.dtype)
