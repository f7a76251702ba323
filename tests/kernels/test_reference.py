"""kernels.reference: the spec every backend is checked against.

- dequantize equals bitsandbytes' own dequantization bit for bit (the ground truth for storage);
- the Philox dropout mask equals Triton's tl.rand bit for bit (run here through the interpreter);
- lora_forward / lora_backward equal float64 autograd of the same math.
"""
from __future__ import annotations

import math

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F

from builders import quantize_4bit, quantize_int8
from kernels import reference
from kernels.formats import DenseWeight


# ---------------------------------------------------------------------------------------------
# Dequantization: exact equality with bitsandbytes
# ---------------------------------------------------------------------------------------------

# (37, 320) and (333, 320): N not a multiple of anything; (7, 9): odd K, the last absmax block
# partial and the last byte half used.
SHAPES = [(64, 128), (37, 320), (333, 320), (7, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax_fp32", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_4bit_equals_bitsandbytes(shape, quant_type, nested, dtype):
    W = torch.randn(*shape, dtype=dtype)
    weight, (packed, st) = quantize_4bit(W, quant_type, nested)
    expected = bnbF.dequantize_4bit(packed, st)  # [N, K] in st.dtype
    got = reference.dequantize(weight)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)  # exact: same fp32 products, same rounding to st.dtype
    # A requested dtype goes through the quantized-from dtype first, as bnb's `.to(x.dtype)` does.
    assert torch.equal(reference.dequantize(weight, torch.float64), expected.double())


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_int8_equals_bitsandbytes(shape):
    weight = quantize_int8(torch.randn(*shape))
    expected = bnbF.int8_vectorwise_dequant(weight.CB, weight.SCB)  # fp32 [N, K]
    got = reference.dequantize(weight)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_int8_dequant_uses_bnb_reciprocal_not_division():
    """bnb multiplies by 7.874015718698502e-3; dividing by 127 differs in the last bit somewhere.
    This is why reference.dequantize spells bnb's expression (the test fails if someone 'simplifies')."""
    weight = quantize_int8(torch.randn(256, 256))
    divided = weight.CB.float() * (weight.SCB.float()[:, None] / 127.0)
    assert not torch.equal(divided, reference.dequantize(weight))


def test_dequantize_dense_is_a_view_when_no_cast():
    W = torch.randn(8, 4).T  # strided view [4, 8], as GPT-2's Conv1D weight.T
    assert reference.dequantize(DenseWeight(W)).data_ptr() == W.data_ptr()
    assert reference.dequantize(DenseWeight(W), torch.float64).dtype == torch.float64


def test_dequantize_rejects_unknown_record():
    with pytest.raises(TypeError, match="unknown base weight type"):
        reference.dequantize(torch.randn(2, 2))


# ---------------------------------------------------------------------------------------------
# Philox dropout: bit-exact with Triton's tl.rand (interpreter on CPU, the real thing on CUDA)
# ---------------------------------------------------------------------------------------------

def _triton_kernels():
    """Two tiny @triton.jit kernels that write tl.rand to memory (defined lazily: nothing at import)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def rand_flat(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        # offsets base + i, int64 (base may exceed 2**32: exercises the counter's high word)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = base + i.to(tl.int64)
        tl.store(out_ptr + i, tl.rand(seed, offs), mask=i < n)

    @triton.jit
    def keep_2d(out_ptr, seed, M, K, p, BM: tl.constexpr, BK: tl.constexpr):
        # the contract as a kernel writes it: element (m, k) uses offset m*K + k, keep = rand >= p
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
        offs = offs_m[:, None] * K + offs_k[None, :]
        keep = tl.rand(seed, offs) >= p
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        tl.store(out_ptr + offs, keep.to(tl.int8), mask=mask)

    return triton, rand_flat, keep_2d


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31 + 5, 2**40 + 7])
@pytest.mark.parametrize("base", [0, 2**32 - 100], ids=["offs_low", "offs_high_word"])
def test_philox_equals_tl_rand_bitwise(seed, base):
    triton, rand_flat, _ = _triton_kernels()
    n = 300  # with base 2**32 - 100 the offsets cross 2**32: both counter words vary
    out = torch.full((n,), float("nan"), device=_device())  # poisoned: unwritten elements fail
    rand_flat[(triton.cdiv(n, 128),)](out, seed, base, n, BLOCK=128)
    offsets = base + torch.arange(n, dtype=torch.int64, device=out.device)
    ours = reference.uniform_from_uint32(reference.philox_randint(seed, offsets))
    assert torch.equal(out, ours)  # bit-exact: same integer algorithm, same fp32 conversion


@pytest.mark.parametrize("seed,M,K,p", [(7, 37, 45, 0.1), (2**33 + 1, 5, 320, 0.5), (3, 16, 16, 0.05)])
def test_dropout_mask_equals_kernel_mask(seed, M, K, p):
    triton, _, keep_2d = _triton_kernels()
    out = torch.full((M, K), -1, dtype=torch.int8, device=_device())
    keep_2d[(triton.cdiv(M, 16), triton.cdiv(K, 32))](out, seed, M, K, p, BM=16, BK=32)
    expected = reference.dropout_mask(seed, M, K, p, out.device)
    assert (out >= 0).all(), "kernel left elements unwritten"
    assert torch.equal(out.bool(), expected)


def test_dropout_mask_statistics():
    M, K = 64, 500
    for p in (0.05, 0.3, 0.9):
        keep = reference.dropout_mask(11, M, K, p)
        n = M * K
        # keep ~ Binomial(n, 1-p): 6 standard deviations is a false-alarm rate of ~1e-9
        assert abs(keep.sum().item() - n * (1 - p)) < 6 * math.sqrt(n * p * (1 - p))
        # no structure by row or column: every row keeps roughly its share
        per_row = keep.float().mean(1)
        assert (per_row - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / K)
    assert reference.dropout_mask(11, M, K, 0.0).all()  # p = 0 keeps everything (u >= 0)
    a, b = reference.dropout_mask(1, M, K, 0.5), reference.dropout_mask(2, M, K, 0.5)
    assert torch.equal(a, reference.dropout_mask(1, M, K, 0.5))  # same seed, same mask
    assert (a != b).float().mean() > 0.4  # different seeds: independent masks differ in ~half


def test_apply_dropout_scales_kept_and_zeroes_dropped():
    x = torch.randn(6, 40)
    p = 0.25
    keep = reference.dropout_mask(5, 6, 40, p)
    xd = reference.apply_dropout(x, keep, p)
    assert torch.equal(xd[keep], x[keep] * (1 / (1 - p)))
    assert (xd[~keep] == 0).all() and (~keep).any()
    assert reference.apply_dropout(x, None, p) is x


def test_philox_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        reference.dropout_mask(-1, 2, 2, 0.5)



# ---------------------------------------------------------------------------------------------
# Forward and backward against float64 autograd
# ---------------------------------------------------------------------------------------------

def _make_weight(fmt: str, N: int, K: int) -> object:
    W = torch.randn(N, K) / math.sqrt(K)
    if fmt == "dense":
        return DenseWeight(W.double())
    if fmt == "int8":
        return quantize_int8(W)
    return quantize_4bit(W, fmt, nested=True)[0]


@pytest.mark.parametrize("fmt", ["dense", "nf4", "fp4", "int8"])
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_backward_match_float64_autograd(fmt, r, bias, p):
    M, K, N, s, seed = 9, 128, 66, 0.7, 42
    weight = _make_weight(fmt, N, K)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(r, K, dtype=torch.float64) / math.sqrt(K)).requires_grad_()
    B = torch.randn(N, r, dtype=torch.float64).requires_grad_()
    b = torch.randn(N, dtype=torch.float64) if bias else None

    # The math written out independently of reference.lora_forward, with autograd for the grads.
    W = reference.dequantize(weight, torch.float64)  # [N, K], checked exact against bnb above
    keep = reference.dropout_mask(seed, M, K, p)
    xd = x * keep / (1 - p)
    y_expected = x @ W.T + (0 if b is None else b) + s * (xd @ A.T) @ B.T
    g = torch.randn(M, N, dtype=torch.float64)
    dx_e, dA_e, dB_e = torch.autograd.grad(y_expected, (x, A, B), g)

    with torch.no_grad():
        y, u = reference.lora_forward(x, weight, b, A, B, s, p, seed)
        dx, dA, dB = reference.lora_backward(g, x, u, weight, A, B, s, p, seed)
    # float64 throughout: only summation-order differences (~1e-15 relative) remain.
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_expected, **tol)
    torch.testing.assert_close(u, xd @ A.T, **tol)
    torch.testing.assert_close(dx, dx_e, **tol)
    torch.testing.assert_close(dA, dA_e, **tol)
    torch.testing.assert_close(dB, dB_e, **tol)
    _, dA2, dB2 = reference.lora_backward(g, x, u, weight, A, B, s, p, seed, needs_dx=False)
    assert _ is None and torch.equal(dA2, dA) and torch.equal(dB2, dB)


def test_forward_is_peft_order_of_operations():
    """bf16 activations, fp32 LoRA weights (peft's default): base in bf16, LoRA branch in fp32, one
    rounding of the sum. Exact equality with peft's graph written out in plain torch."""
    M, K, N, r, s = 7, 64, 32, 4, 2.0
    W = torch.randn(N, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    A, B = torch.randn(r, K), torch.randn(N, r)
    y, u = reference.lora_forward(x, DenseWeight(W), bias, A, B, s)
    result = F.linear(x, W, bias)  # peft: result = self.base_layer(x)
    xa = x.to(A.dtype)  # x = self._cast_input_dtype(x, lora_A.weight.dtype)
    expected = (result + F.linear(F.linear(xa, A), B) * s).to(result.dtype)
    assert y.dtype == torch.bfloat16 and u.dtype == torch.float32
    assert torch.equal(y, expected)


def test_base_only_forward_and_backward():
    weight = _make_weight("nf4", 40, 64)
    x = torch.randn(3, 64)
    y, u = reference.lora_forward(x, weight, None, None, None, 1.0)
    W = reference.dequantize(weight, torch.float32)
    assert u is None and torch.equal(y, F.linear(x, W))
    g = torch.randn(3, 40)
    dx, dA, dB = reference.lora_backward(g, x, None, weight, None, None, 1.0)
    assert torch.equal(dx, g @ W) and dA is None and dB is None
