"""kernels.torch_ops, the torch backend: its speed paths give the spec's bits (kernels.reference), and
its dropout is peft's draw (nn.Dropout from torch's generator), or the spec's Philox mask for an
explicit seed."""
from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F

import kernels
from builders import quantize_4bit, quantize_int8
from kernels import reference, torch_ops
from kernels.call import make_call
from kernels.formats import DenseWeight, Quant4bitWeight


def test_spec_dequantize_never_calls_bitsandbytes(monkeypatch):
    """`reference.dequantize` is pure PyTorch: the bnb comparisons of test_reference test it, not bnb
    against itself (torch_ops.dequantize is the one that calls bitsandbytes)."""
    weight, _ = quantize_4bit(torch.randn(16, 64), "nf4", nested=True)

    def boom(*a, **k):
        raise AssertionError("bitsandbytes called")

    monkeypatch.setattr(bnbF, "dequantize_4bit", boom)
    monkeypatch.setattr(bnbF, "dequantize_blockwise", boom)
    assert reference.dequantize(weight).shape == (16, 64)
    with pytest.raises(AssertionError, match="bitsandbytes called"):
        torch_ops.dequantize(weight)


# (3, 96) and (7, 9): blocks of 64 straddle rows, which bnb 0.50's CPU kernel gets wrong (it
# scales per row-block; see the test below), so the fast path must decline them.
@pytest.mark.parametrize("shape", [(64, 128), (37, 320), (3, 96), (7, 9)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax_fp32", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_spec(shape, quant_type, nested, dtype):
    weight, _ = quantize_4bit(torch.randn(*shape, dtype=dtype), quant_type, nested)
    fast = torch_ops.dequantize(weight)
    took_bnb = weight.__dict__["_bnb_args"] is not None
    assert took_bnb == (shape[1] % weight.blocksize == 0), "fast path taken/declined wrongly"
    spec = reference.dequantize(weight)
    assert fast.dtype == spec.dtype == dtype and torch.equal(fast, spec)
    for out_dtype in (torch.float32, torch.float64):  # through weight.dtype first, like the spec
        assert torch.equal(torch_ops.dequantize(weight, out_dtype), reference.dequantize(weight, out_dtype))
    int8 = quantize_int8(torch.randn(*shape))
    assert torch.equal(torch_ops.dequantize(int8), reference.dequantize(int8))


def test_bnb_cpu_kernel_is_wrong_for_blocks_straddling_rows():
    """Why the fast path declines K % blocksize != 0: there bnb's own CPU dequantization does not
    invert its quantizer (the spec, with flat blocks, does). If a bnb upgrade fixes this, this test
    fails, and the restriction in `torch_ops._bnb_args` can go."""
    # rows of very different scale: a wrong absmax shows as an error of the large row's size
    W = torch.randn(3, 96) * torch.tensor([[0.01], [1.0], [0.01]])
    weight, (packed, st) = quantize_4bit(W, "nf4", nested=False)
    spec_err = (reference.dequantize(weight) - W).abs().max()
    bnb_err = (bnbF.dequantize_4bit(packed, st) - W).abs().max()
    # NF4 rounds to within half its widest code gap (0.152) times the block absmax (= max|W| at
    # worst); bnb's row-block scaling gives the small rows the large row's absmax (~max|W| errors)
    assert spec_err <= 0.16 * W.abs().max() and bnb_err > 0.5 * W.abs().max()


def test_dequantize_falls_back_for_a_table_bnb_would_ignore():
    """bnb's kernels use their built-in NF4/FP4 table; a record with another `code` takes the spec."""
    weight, _ = quantize_4bit(torch.randn(8, 64), "nf4", nested=False)
    other = Quant4bitWeight(packed=weight.packed, absmax=weight.absmax, code=weight.code.flip(0),
                            blocksize=weight.blocksize, shape=weight.shape, quant_type="nf4", dtype=weight.dtype)
    got = torch_ops.dequantize(other)
    assert other.__dict__["_bnb_args"] is None
    assert torch.equal(got, reference.dequantize(other))
    assert not torch.equal(got, reference.dequantize(weight))  # the table really matters here


@pytest.mark.parametrize("s", [2.0, 0.3])  # a power of two takes the BLAS-alpha path without grad
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["dense", "nf4"])
def test_forward_equals_spec_with_and_without_autograd(s, dtype, fmt):
    M, K, N, r = 2 * 9, 128, 48, 8
    W32 = torch.randn(N, K) / K**0.5
    weight = DenseWeight(W32.to(dtype)) if fmt == "dense" else quantize_4bit(W32.to(dtype), "nf4", True)[0]
    x = torch.randn(2, 9, K, dtype=dtype)
    A, B, bias = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype), torch.randn(N, dtype=dtype)
    spec, _ = reference.lora_forward(x.reshape(M, K), weight, bias, A, B, s)
    call = make_call(x, weight, bias, A, B, s, 0.0, False, None, None)
    with torch.no_grad():
        fast = torch_ops.lora_forward(call)
    graph = torch_ops.lora_forward(make_call(x.requires_grad_(), weight, bias, A, B, s, 0.0, False, None, None))
    assert fast.shape == graph.shape == (2, 9, N)
    assert torch.equal(fast.reshape(M, N), spec) and torch.equal(graph.detach().reshape(M, N), spec)


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_dropout_is_nn_dropout_from_torch_generator(lora_dtype):
    """seed=None: exactly `nn.Dropout(p)(x.to(lora dtype))` after the same torch.manual_seed, and the
    generator advances as nn.Dropout's does (the next draw matches too)."""
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    p = 0.3
    torch.manual_seed(11)
    ours = torch_ops.dropout_input(x, None, lora_dtype, p, None)
    after_ours = torch.rand(4)
    torch.manual_seed(11)
    theirs = torch.nn.Dropout(p)(x.to(lora_dtype))
    after_theirs = torch.rand(4)
    assert ours.dtype == lora_dtype and torch.equal(ours, theirs) and torch.equal(after_ours, after_theirs)
    # an explicit seed: the spec's Philox mask instead (the triton backend's draw), no generator use
    keep = reference.dropout_mask(5, 15, 64, p)
    torch.manual_seed(11)
    philox = torch_ops.dropout_input(x, None, lora_dtype, p, 5)
    untouched = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(untouched, torch.rand(4))
    assert torch.equal(philox, reference.apply_dropout(x.to(lora_dtype), keep.view(3, 5, 64), p))


def test_lora_linear_seed_none_follows_manual_seed_and_explicit_seed_is_philox():
    M, K, N, r = 6, 64, 32, 4
    x, W = torch.randn(M, K), DenseWeight(torch.randn(N, K))
    A, B = torch.randn(r, K), torch.randn(N, r)

    def run(seed=None):
        return kernels.lora_linear(x, W, None, A, B, 1.0, 0.5, training=True, backend="torch", seed=seed)

    torch.manual_seed(3)
    a = run()
    torch.manual_seed(3)
    assert torch.equal(a, run())
    assert not torch.equal(a, run())  # the generator moved on: a new mask
    expected, _ = reference.lora_forward(x, W, None, A, B, 1.0, 0.5, 9)
    assert torch.equal(run(9), expected)
    # a training call without LoRA (adapter disabled) has no dropout to draw
    assert torch.equal(kernels.lora_linear(x, W, None, None, None, 1.0, 0.5, training=True, backend="torch"),
                       F.linear(x, W.weight))
