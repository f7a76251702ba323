"""Gradients through kernels.lora_linear(backend="torch"): against peft's graph written out and
float64, dtypes, autocast, activation checkpointing, and what is saved between the passes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from builders import quantize_4bit
from kernels import reference
from kernels.formats import DenseWeight


def peft_graph(x, W, bias, A, B, s, p=0.0):
    """peft's lora.Linear.forward written out in plain torch ops (autograd does the backward)."""
    result = F.linear(x, W, bias)  # base_layer(x)
    if not torch.is_autocast_enabled("cpu"):
        x = x.to(A.dtype)  # _cast_input_dtype(x, lora_A.weight.dtype), skipped under autocast
    xd = torch.nn.Dropout(p)(x) if p else x  # lora_dropout (nn.Identity when p = 0)
    return (result + F.linear(F.linear(xd, A), B) * s).to(result.dtype)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def grads(out, inputs, g):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, present, g)


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64_dense(p):
    M, K, N, r = 3, 8, 5, 2
    W = DenseWeight(torch.randn(N, K, dtype=torch.float64))
    x, A, B, b = leaves(*(torch.randn(*s, dtype=torch.float64) for s in ((M, K), (r, K), (N, r), (N,))))

    def f(x, A, B, b):
        return kernels.lora_linear(x, W, b, A, B, 0.5, p, training=True, backend="torch", seed=9)

    assert torch.autograd.gradcheck(f, (x, A, B, b))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora_dtype", [torch.float32, "same"])
def test_half_precision_matches_peft_graph_and_float64(x_dtype, lora_dtype):
    lora_dtype = x_dtype if lora_dtype == "same" else lora_dtype
    M, K, N, r, s = 16, 128, 96, 8, 2.0
    W = torch.randn(N, K, dtype=x_dtype) / math.sqrt(K)
    x, A, B, b = leaves(torch.randn(2, M, K, dtype=x_dtype), torch.randn(r, K, dtype=lora_dtype) / math.sqrt(K),
                        torch.randn(N, r, dtype=lora_dtype), torch.randn(N, dtype=x_dtype))
    g = torch.randn(2, M, N, dtype=x_dtype)
    y = kernels.lora_linear(x, DenseWeight(W), b, A, B, s, backend="torch")
    ours = grads(y, (x, A, B, b), g)
    y_p = peft_graph(x, W, b, A, B, s)
    theirs = grads(y_p, (x, A, B, b), g)
    assert y.dtype == x_dtype
    # Same ops on the same dtypes as peft's graph: identical forward; gradients computed by the same
    # mm calls, except that we sum the bias gradient over a flattened [M, N] (one rounding apart).
    assert torch.equal(y, y_p)
    for a, e in zip(ours, theirs):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)  # half precision: 1-2 ulps of 2**-8
    # Against float64 of the same math: bf16 has 8 mantissa bits (fp16 11), so the stored operands
    # and outputs each carry a relative error up to 2**-8; sums of 128 terms stay within ~3e-2.
    x64, A64, B64, b64 = leaves(*(t.double() for t in (x, A, B, b)))
    y64 = peft_graph(x64, W.double(), b64, A64, B64, s)
    exp64 = grads(y64, (x64, A64, B64, b64), g.double())
    torch.testing.assert_close(y.double(), y64, rtol=3e-2, atol=3e-2)
    for a, e in zip(ours, exp64):
        torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2 * e.abs().max().item())


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("fmt", ["dense", "nf4"])
def test_autocast_cpu_bf16_matches_peft_under_autocast(fmt, p):
    """Under torch.autocast(bf16) peft's F.linear calls all run in bf16 (base and LoRA branch), and
    its dropout runs on x as it came (fp32 here); ours casts the same way, then runs with autocast
    off. backward() is called inside the autocast region on purpose: on CPU the engine runs it on
    this thread, where autocast is still on."""
    M, K, N, r, s = 8, 128, 64, 4, 0.5
    W32 = torch.randn(N, K) / math.sqrt(K)
    if fmt == "dense":
        weight, W = DenseWeight(W32), W32
    else:
        weight, _ = quantize_4bit(W32, "nf4", nested=True)
        W = reference.dequantize(weight, torch.float32)
    x, A, B, b = leaves(torch.randn(M, K), torch.randn(r, K) / 8, torch.randn(N, r), torch.randn(N))
    g = torch.randn(M, N, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        y = kernels.lora_linear(x, weight, b, A, B, s, p, training=True, backend="torch")
        ours = grads(y, (x, A, B, b), g)
        torch.manual_seed(5)
        y_p = peft_graph(x, W, b, A, B, s, p)
        theirs = grads(y_p, (x, A, B, b), g)
    assert y.dtype == y_p.dtype == torch.bfloat16
    assert torch.equal(y, y_p)  # the same bf16 ops in the same order, the same dropout mask
    for a, e in zip(ours, theirs):
        assert a.dtype == e.dtype == torch.float32  # grads land in the fp32 leaves, as with peft
        if fmt == "dense":
            assert torch.equal(a, e)  # peft's own graph
        else:  # our quantized base's backward runs with autocast off (bf16 dx, as the spec): bnb's does not
            torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("fmt", ["dense", "nf4"])
def test_activation_checkpointing_with_dropout(use_reentrant, fmt):
    """Dropout with seed=None draws the seed from torch's generator; checkpointing restores the RNG
    state before recomputing, so the recompute regenerates the same mask: grads equal exactly."""
    M, K, N, r = 6, 64, 32, 4
    W32 = torch.randn(N, K)
    weight = DenseWeight(W32) if fmt == "dense" else quantize_4bit(W32, "nf4", nested=False)[0]
    x0, A0, B0 = torch.randn(M, K), torch.randn(r, K), torch.randn(N, r)

    def block(x, A, B):
        y = kernels.lora_linear(x, weight, None, A, B, 2.0, 0.3, training=True, backend="torch")
        return torch.tanh(y)

    def run(ckpt):
        torch.manual_seed(123)
        x, A, B = leaves(x0, A0, B0)
        out = checkpoint(block, x, A, B, use_reentrant=use_reentrant) if ckpt else block(x, A, B)
        out.sum().backward()
        return out, x.grad, A.grad, B.grad

    for plain, ck in zip(run(False), run(True)):
        assert torch.equal(plain, ck)


@pytest.mark.parametrize("bias_grad", [True, False])
def test_bias_gradient_only_when_required(bias_grad):
    M, K, N, r = 5, 64, 32, 2
    W = torch.randn(N, K)
    x, A, B = leaves(torch.randn(M, K), torch.randn(r, K), torch.randn(N, r))
    b = torch.randn(N).requires_grad_(bias_grad)
    kernels.lora_linear(x, DenseWeight(W), b, A, B, 1.0, backend="torch").square().sum().backward()
    if bias_grad:
        b2 = b.detach().clone().requires_grad_()
        peft_graph(x.detach(), W, b2, A.detach(), B.detach(), 1.0).square().sum().backward()
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-6, atol=1e-5)  # fp32 sum-order rounding
    else:
        assert b.grad is None


def test_frozen_input_gets_no_gradient_but_lora_does():
    W = torch.randn(32, 64)
    x = torch.randn(4, 64)  # e.g. the first layer's input: no grad
    A, B = leaves(torch.randn(2, 64), torch.randn(32, 2))
    kernels.lora_linear(x, DenseWeight(W), None, A, B, 1.0, backend="torch").sum().backward()
    assert A.grad is not None and B.grad is not None and x.grad is None


def _saved_numels(fn) -> list[tuple[int, tuple, int]]:
    saved = []

    def pack(t):
        saved.append((t.numel(), tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("fmt", ["dense", "nf4"])
def test_nothing_out_by_in_sized_is_saved(fmt):
    M, K, N, r = 4, 128, 96, 4  # N*K = 12288 is larger than every activation here
    W32 = torch.randn(N, K)
    weight = DenseWeight(W32) if fmt == "dense" else quantize_4bit(W32, "nf4", nested=True)[0]
    x, A, B = leaves(torch.randn(M, K), torch.randn(r, K), torch.randn(N, r))

    ours = _saved_numels(lambda: kernels.lora_linear(x, weight, None, A, B, 1.0, 0.1, True, "torch"))
    # a dense base's F.linear keeps a reference to the layer's own W (no copy, as in peft's graph)
    assert ours and all(n < N * K or ptr == W32.data_ptr() for n, _, ptr in ours), ours
    if fmt == "nf4":
        # The detector works: the spec under plain autograd saves the dequantized W (as W^T).
        naive = _saved_numels(lambda: reference.lora_forward(x, weight, None, A, B, 1.0, 0.1, 5))
        assert any(n == N * K for n, _, _ in naive)
        # Base-only calls on a quantized base save nothing tensor-sized at all.
        assert _saved_numels(lambda: kernels.lora_linear(x, weight, None, None, None, 1.0, backend="torch")) == []


def test_base_only_gradient():
    weight, _ = quantize_4bit(torch.randn(32, 64), "fp4", nested=False)
    W = reference.dequantize(weight, torch.float32)
    x, b = leaves(torch.randn(3, 64), torch.randn(32))
    g = torch.randn(3, 32)
    y = kernels.lora_linear(x, weight, b, None, None, 1.0, backend="torch")
    dx, db = grads(y, (x, b), g)
    assert torch.equal(y, F.linear(x, W, b))
    assert torch.equal(dx, g @ W)
    torch.testing.assert_close(db, g.sum(0))


def test_trainable_dense_base_weight_gets_its_gradient():
    """A dense base that requires grad (full fine-tuning next to LoRA) takes plain autograd."""
    W, x, A, B = leaves(torch.randn(32, 64), torch.randn(3, 64), torch.randn(2, 64), torch.randn(32, 2))
    y = kernels.lora_linear(x, DenseWeight(W), None, A, B, 1.0, backend="torch")
    y.square().sum().backward()
    W2 = W.detach().clone().requires_grad_()
    peft_graph(x.detach(), W2, None, A.detach(), B.detach(), 1.0).square().sum().backward()
    torch.testing.assert_close(W.grad, W2.grad)


@pytest.mark.parametrize("fmt", ["dense", "nf4"])
def test_dropout_gradients_equal_peft_graph_with_the_same_seed(fmt):
    """seed=None: the mask is nn.Dropout's from torch's generator, so after the same torch.manual_seed
    y and every gradient equal peft's graph bit for bit (fp32; a quantized base: bnb's W)."""
    M, K, N, r, p = 6, 128, 64, 4, 0.3
    W32 = torch.randn(N, K)
    weight = DenseWeight(W32) if fmt == "dense" else quantize_4bit(W32, "nf4", nested=True)[0]
    W = reference.dequantize(weight, torch.float32)
    x, A, B = leaves(torch.randn(2, M, K), torch.randn(r, K), torch.randn(N, r))
    g = torch.randn(2, M, N)
    torch.manual_seed(17)
    y = kernels.lora_linear(x, weight, None, A, B, 0.7, p, True, "torch")
    got = grads(y, [x, A, B], g)
    x2, A2, B2 = leaves(x, A, B)
    torch.manual_seed(17)
    y2 = peft_graph(x2, W, None, A2, B2, 0.7, p)
    want = grads(y2, [x2, A2, B2], g)
    assert torch.equal(y, y2)
    for name, a, b in zip("xAB", got, want):
        assert torch.equal(a, b), f"d{name}"
