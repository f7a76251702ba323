"""kernels.reference: the spec every Triton op is checked against.

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

from kernels import reference
from kernels.weights import DenseWeight, Int8Weight, NestedAbsmax, Quant4bitWeight


def quantize_4bit(W: torch.Tensor, quant_type: str, nested: bool) -> tuple[Quant4bitWeight, object]:
    """A Quant4bitWeight from bitsandbytes' own quantizer (CPU), and bnb's QuantState."""
    packed, st = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    nest = None
    if st.nested:
        nest = NestedAbsmax(code=st.state2.code, absmax=st.state2.absmax, blocksize=st.state2.blocksize,
                            offset=float(st.offset))
    w = Quant4bitWeight(packed=packed, absmax=st.absmax, code=st.code, blocksize=st.blocksize,
                        shape=tuple(st.shape), quant_type=quant_type, dtype=st.dtype, nested=nest)
    return w, (packed, st)


def quantize_int8(W: torch.Tensor) -> Int8Weight:
    CB, SCB, _ = bnbF.int8_vectorwise_quant(W.to(torch.float16))
    return Int8Weight(CB=CB, SCB=SCB)


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
    xd = reference.apply_dropout(x, 5, p)
    assert torch.equal(xd[keep], x[keep] * (1 / (1 - p)))
    assert (xd[~keep] == 0).all() and (~keep).any()
    assert reference.apply_dropout(x, 5, 0.0) is x


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
    assert torch.equal(reference.base_backward(g, x, weight), g @ W)


# ---------------------------------------------------------------------------------------------
# Fast paths: the same bits as the spec above, by other means
# ---------------------------------------------------------------------------------------------

def test_spec_dequantize_never_calls_bitsandbytes(monkeypatch):
    """`dequantize` is the pure-PyTorch spec: the bnb comparisons above test it, not bnb against
    itself (the torch backend's `dequantize_fast` is the one that calls bitsandbytes)."""
    weight, _ = quantize_4bit(torch.randn(16, 64), "nf4", nested=True)

    def boom(*a, **k):
        raise AssertionError("bitsandbytes called by the spec")

    monkeypatch.setattr(bnbF, "dequantize_4bit", boom)
    monkeypatch.setattr(bnbF, "dequantize_blockwise", boom)
    assert reference.dequantize(weight).shape == (16, 64)
    with pytest.raises(AssertionError, match="spec"):  # while the fast path does go through bnb
        reference.dequantize_fast(weight)


# (3, 96) and (7, 9): blocks of 64 straddle rows, which bnb 0.50's CPU kernel gets wrong (it
# scales per row-block; see the test below), so the fast path must decline them.
@pytest.mark.parametrize("shape", [(64, 128), (37, 320), (3, 96), (7, 9)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax_fp32", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_fast_equals_spec(shape, quant_type, nested, dtype):
    weight, _ = quantize_4bit(torch.randn(*shape, dtype=dtype), quant_type, nested)
    fast = reference.dequantize_fast(weight)
    took_bnb = "_bnb_args" in weight.__dict__
    assert took_bnb == (shape[1] % weight.blocksize == 0), "fast path taken/declined wrongly"
    spec = reference.dequantize(weight)
    assert fast.dtype == spec.dtype == dtype and torch.equal(fast, spec)
    for out_dtype in (torch.float32, torch.float64):  # through weight.dtype first, like the spec
        assert torch.equal(reference.dequantize_fast(weight, out_dtype), reference.dequantize(weight, out_dtype))


def test_bnb_cpu_kernel_is_wrong_for_blocks_straddling_rows():
    """Why dequantize_fast declines K % blocksize != 0: there bnb's own CPU dequantization does not
    invert its quantizer (the spec, with flat blocks, does). If a bnb upgrade fixes this, this test
    fails, and the restriction in `_bnb_can_dequantize` can go."""
    # rows of very different scale: a wrong absmax shows as an error of the large row's size
    W = torch.randn(3, 96) * torch.tensor([[0.01], [1.0], [0.01]])
    weight, (packed, st) = quantize_4bit(W, "nf4", nested=False)
    spec_err = (reference.dequantize(weight) - W).abs().max()
    bnb_err = (bnbF.dequantize_4bit(packed, st) - W).abs().max()
    # NF4 rounds to within half its widest code gap (0.152) times the block absmax (= max|W| at
    # worst); bnb's row-block scaling gives the small rows the large row's absmax (~max|W| errors)
    assert spec_err <= 0.16 * W.abs().max() and bnb_err > 0.5 * W.abs().max()


def test_dequantize_fast_falls_back_for_a_table_bnb_would_ignore():
    """bnb's kernels use their built-in NF4/FP4 table; a record with another `code` takes the spec."""
    weight, _ = quantize_4bit(torch.randn(8, 64), "nf4", nested=False)
    other = Quant4bitWeight(packed=weight.packed, absmax=weight.absmax, code=weight.code.flip(0),
                            blocksize=weight.blocksize, shape=weight.shape, quant_type="nf4",
                            dtype=weight.dtype)
    got = reference.dequantize_fast(other)
    assert "_bnb_args" not in other.__dict__
    assert torch.equal(got, reference.dequantize(other))
    assert not torch.equal(got, reference.dequantize(weight))  # the table really matters here


def _mask_from_spec(seed: int, start: int, n: int, p: float) -> torch.Tensor:
    offsets = torch.arange(start, start + n, dtype=torch.int64)
    u = reference.uniform_from_uint32(reference.philox_randint(seed, offsets))
    return u >= torch.tensor(p, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 5, 2**40 + 7, 2**63 - 1])
@pytest.mark.parametrize("p", [0.0, 1e-12, 0.1, 0.5, 0.999999, 1 - 1e-9])
def test_dropout_mask_equals_the_philox_formula(seed, p):
    """dropout_mask's rearranged rounds and integer threshold give exactly tl.rand(...) >= p, as
    the module doc writes it (philox_randint + uniform_from_uint32, themselves checked vs Triton)."""
    for M, K in [(1, 1), (37, 45), (3, 40000)]:  # 3 x 40000: several chunks and a partial one
        assert torch.equal(reference.dropout_mask(seed, M, K, p), _mask_from_spec(seed, 0, M * K, p).view(M, K))
    # chunks whose counter high word is not zero (offsets >= 2**32, too large to allocate whole)
    n = 4096
    for start in (2**32 - n, 2**32, 2**33 + 5 * n):
        out = torch.empty(n, dtype=torch.bool)
        bufs = [torch.empty(n, dtype=torch.int64) for _ in range(6)]
        reference._philox_keep_chunk(seed, start, n, reference._keep_threshold(p), bufs, out)
        assert torch.equal(out, _mask_from_spec(seed, start, n, p))


@pytest.mark.parametrize("p", [0.0, 1e-12, 0.1, 0.3, 0.5, 0.9, 0.999999, 1 - 1e-9])
def test_keep_threshold_is_the_float_comparison(p):
    """u(v) = float32(v) * SCALE >= float32(p) exactly when v >= T, checked on both sides of T."""
    T = reference._keep_threshold(p)
    v = torch.tensor([T - 2, T - 1, T, T + 1, 0, 2**31 - 1], dtype=torch.int64).clamp(0, 2**31 - 1)  # v's domain
    u = v.to(torch.float32) * torch.tensor(reference._UINT_TO_FLOAT_SCALE, dtype=torch.float32)
    assert torch.equal(u >= torch.tensor(p, dtype=torch.float32), v >= T)


@pytest.mark.parametrize("s", [2.0, 0.5, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_peft_order_bit_for_bit(s, dtype):
    """lora_backward equals peft's autograd order (g * s first) exactly: by scaling the thin dB / v
    when s is a power of two (exact), and by peft's own order otherwise."""
    M, K, N, r = 33, 64, 48, 8
    x, g = torch.randn(M, K, dtype=dtype), torch.randn(M, N, dtype=dtype)
    A, B = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
    W = torch.randn(N, K, dtype=dtype)
    u = F.linear(x, A)
    dx, dA, dB = reference.lora_backward(g, x, u, DenseWeight(W), A, B, s)
    gs = g * s  # peft: MulBackward of `lora_B(...) * scaling`
    v = gs.mm(B)
    assert torch.equal(dB, gs.t().mm(u)) and torch.equal(dA, v.t().mm(x))
    assert torch.equal(dx, g.mm(W) + v.mm(A))
