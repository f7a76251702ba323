"""The Triton forward strategies against the float64 spec: "fused" (kernels/triton/forward.py,
tiles.py), "dequant-mm" (mm.py, dequant.py) and "gemv" (decode.py) on the same cases.

Same file on GPU (full shapes) and CPU (Triton interpreter, small odd shapes): see builders.py for
the ground truth and the tolerance's reason. The case matrix covers every axis (format, nested
absmax, blocksize, activation dtype, r, bias, dropout, odd K, strided dense W, base-only) without
the full cross product, which the interpreter could not afford.
"""
import pytest
import torch

from builders import (DEVICE, ODD, ON_GPU, SMALL, W_ROUNDINGS, assert_close, make_lora, make_weight, poisoned,
                      rand, ref_forward, seed_tensor, triton_backward, triton_forward)
from kernels import reference
from kernels.formats import DenseWeight
from kernels.triton import forward, utils

# (id, fmt, shape, x dtype, r, bias, dropout_p, weight options)
CASES = [
    ("nf4-nested-bf16-r8-bias-drop", "nf4", ODD, torch.bfloat16, 8, True, 0.1, {}),
    ("nf4-fp32absmax-fp16-r1", "nf4", ODD, torch.float16, 1, False, 0.0, {"nested": False}),
    ("fp4-nested-bf16-r64-drop", "fp4", ODD, torch.bfloat16, 64, False, 0.25, {}),
    ("nf4-nested-bf16-r128-bias-drop", "nf4", SMALL, torch.bfloat16, 128, True, 0.1, {}),  # the largest rank
    ("fp4-fp32absmax-fp16-r8-bias", "fp4", SMALL, torch.float16, 8, True, 0.0,
     {"nested": False, "dtype": torch.float16}),
    ("nf4-blocksize128-wfp32-bf16", "nf4", SMALL, torch.bfloat16, 8, True, 0.0,
     {"blocksize": 128, "dtype": torch.float32}),
    ("nf4-oddK-partial-blocks", "nf4", (21, 77, 35), torch.bfloat16, 8, True, 0.1, {}),
    # blocksize 32 < BLOCK_K: several absmax blocks per tile row (the reshape-broadcast path)
    ("nf4-blocksize32-bf16", "nf4", (21, 320, 70), torch.bfloat16, 8, False, 0.0, {"blocksize": 32}),
    ("int8-bf16-r8-bias-drop", "int8", ODD, torch.bfloat16, 8, True, 0.1, {}),
    ("int8-fp16-r64", "int8", SMALL, torch.float16, 64, False, 0.0, {}),
    ("dense-bf16-r8-bias-drop", "dense", ODD, torch.bfloat16, 8, True, 0.1, {}),
    ("dense-conv1d-view-fp16-r1", "dense", SMALL, torch.float16, 1, False, 0.0,
     {"dtype": torch.float16, "transposed": True}),
    ("dense-wfp32-bf16-r64-drop", "dense", SMALL, torch.bfloat16, 64, True, 0.5,
     {"dtype": torch.float32}),
]


@pytest.mark.parametrize("strategy", ["fused", "dequant-mm", "gemv"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(case, strategy):
    _, fmt, (M, K, N), dt, r, has_bias, p, wopts = case
    weight, W64 = make_weight(fmt, N, K, **wopts)
    A, B = make_lora(N, K, r, dtype=torch.float32)  # peft's default: fp32 adapters
    x = rand((M, K), dt)
    bias = rand((N,), torch.float32, seed=3) if has_bias else None
    s, seed = 2.0, 1234
    y_out, u_out = poisoned((M, N), dt), poisoned((M, r), torch.float32)

    y, u = triton_forward(x, weight, bias, A, B, s, p, seed, out=y_out, u_out=u_out, strategy=strategy)

    assert y.dtype == dt and u.dtype == torch.float32
    assert y.data_ptr() == y_out.data_ptr()  # wrote into the poisoned buffers
    y_ref, u_ref, mag_y, mag_u = ref_forward(x, W64, bias, A, B, s, p, seed)
    assert_close("u", u, u_ref, mag_u, dt)
    assert_close("y", y, y_ref, mag_y, dt, w_roundings=W_ROUNDINGS[strategy] if fmt in ("nf4", "fp4") else 0)


@pytest.mark.parametrize("strategy", ["fused", "dequant-mm", "gemv"])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_forward_base_only(fmt, strategy):
    """A = B = None: the base layer alone (+ bias), u is None."""
    M, K, N = SMALL
    weight, W64 = make_weight(fmt, N, K)
    x = rand((M, K), torch.bfloat16)
    bias = rand((N,), torch.bfloat16, seed=3)
    y, u = triton_forward(x, weight, bias, None, None, 1.0, out=poisoned((M, N), x.dtype), strategy=strategy)
    assert u is None
    y_ref, _, mag, _ = ref_forward(x, W64, bias, None, None, 1.0, 0.0, None)
    assert_close("y", y, y_ref, mag, x.dtype, w_roundings=W_ROUNDINGS[strategy] if fmt == "nf4" else 0)


def test_forward_strided_rows_and_zero_scaling():
    """x may be a row-strided view (unit stride along K); scaling = 0 leaves exactly the base."""
    M, K, N = SMALL
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 8)
    big = rand((M, K + 6), torch.bfloat16)
    x = big[:, 3:K + 3]  # [M, K] view, stride (K + 6, 1)
    y, _ = triton_forward(x, weight, None, A, B, 0.0)
    y0, _ = triton_forward(x.contiguous(), weight, None, None, None, 1.0)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("fmt,nested,dt", [("nf4", True, torch.bfloat16), ("nf4", False, torch.float16),
                                           ("fp4", True, torch.float16), ("fp4", False, torch.float32),
                                           ("int8", None, torch.bfloat16), ("dense", None, torch.bfloat16)])
def test_dequantize_bit_exact(fmt, nested, dt):
    """The kernels' own tile loader (through the dequantize kernel) equals bitsandbytes' bit for bit.

    This is what the fused kernels multiply by, element by element: any nibble order, absmax block
    or nested-code error shows here exactly, at every (n, k), including odd K and partial blocks.
    """
    # 4-bit: odd K (rows start mid-byte, per-element path) and even K (paired-byte path)
    N, K = (35, 77 if nested else 130) if fmt in ("nf4", "fp4") else (70, 130)
    opts = {} if nested is None else {"nested": nested}
    if fmt == "fp4" and not nested:
        K, opts["blocksize"] = 320, 32  # K % blocksize == 0 with several blocks per tile row
    weight, W64 = make_weight(fmt, N, K, dtype=dt if fmt != "int8" else torch.bfloat16, **opts)
    W = utils.dequantize(weight, reference.dequantize(weight).dtype)
    truth = W64.to(W.dtype)  # bnb's result in its own dtype (W64 holds it exactly)
    assert W.dtype == (torch.float32 if fmt == "int8" else dt)
    assert torch.equal(W, truth)
    assert torch.equal(W, reference.dequantize(weight))
    if fmt != "dense":  # the cast to an activation dtype rounds exactly like torch's .to()
        assert torch.equal(utils.dequantize(weight, torch.bfloat16), truth.to(torch.bfloat16))


@pytest.mark.parametrize("seed,p", [(0, 0.1), (12345, 0.5), (2**40 + 7, 0.3)])
def test_dropout_mask_bit_exact(seed, p):
    """The in-kernel Philox mask (tiles.dropout_keep) equals reference.dropout_mask exactly,
    standalone and inside every strategy's forward (M=37 and M=5: the down-projection kernel, or
    the gemv's down-projection programs) and backward (the fused kernel, mm.lora_grad_in_kernel).

    Inside the kernels it is made visible exactly: with x = 1, A = I (r = K = 64) the forward's
    u = keep / (1 - p) (one nonzero term per sum); with W = 0, B = I (N = r), g = 1 the backward's
    dx = s / (1 - p) * keep. p = 0.5 and scale 1 keep every value exact in fp32 / bf16.
    """
    M, Kw = 37, 333
    assert torch.equal(utils.dropout_mask(seed, M, Kw, p, DEVICE).cpu(), reference.dropout_mask(seed, M, Kw, p))
    K = 64
    eye = torch.eye(K, device=DEVICE)
    zero_w = DenseWeight(torch.zeros(K, K, dtype=torch.bfloat16, device=DEVICE))
    for m, fwd, bwd in ((37, "fused", "fused"), (5, "gemv", "dequant-mm"), (37, "dequant-mm", "dequant-mm"),
                        (5, "fused", "fused")):
        x = torch.ones(m, K, dtype=torch.bfloat16, device=DEVICE)
        keep = reference.dropout_mask(seed, m, K, p, DEVICE)
        _, u = triton_forward(x, zero_w, None, eye, eye, 1.0, p, seed, strategy=fwd)
        assert torch.equal(u, keep.float() * (1.0 / (1.0 - p))), f"forward mask, M={m}, {fwd}"
        g = torch.ones(m, K, dtype=torch.bfloat16, device=DEVICE)
        dx, _, _ = triton_backward(g, x, u, zero_w, eye, eye, 1.0 - p, p, seed, strategy=bwd)
        assert torch.equal(dx.float(), keep.float()), f"backward mask, M={m}, {bwd}"


@pytest.mark.parametrize("p", [0.0, 0.1])  # u in the K loop / u from the down-projection kernel
def test_every_autotune_config(p):
    """Every config autotuning may pick is correct, not only the one it picked for the shapes above
    (on CPU: the interpreter's single config, proving the override path)."""
    M, K, N = (300, 1000, 700) if ON_GPU else (40, 70, 50)
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 16)
    x = rand((M, K), torch.bfloat16)
    bias = rand((N,), torch.bfloat16, seed=3)
    y_ref, u_ref, mag_y, mag_u = ref_forward(x, W64, bias, A, B, 2.0, p, 3)
    configs = forward.GPU_CONFIGS if ON_GPU else forward.lora_forward_kernel.configs
    for cfg in configs:
        y, u = forward.fused_forward(x, weight.kernel_args(), bias, A, B, 2.0, p, seed_tensor(3),
                                     out=poisoned((M, N), x.dtype), u_out=poisoned((M, 16), torch.float32),
                                     config=cfg)
        assert_close(f"u {cfg}", u, u_ref, mag_u, x.dtype)
        assert_close(f"y {cfg}", y, y_ref, mag_y, x.dtype)
