"""The `lorafuse::*` operators (kernels/ops.py) pass `torch.library.opcheck`: schema (no hidden
mutation or aliasing), fake function (shapes, dtypes and devices as the real one's), autograd
registration, and AOTAutograd with dynamic shapes. On CPU the Triton operators run in Triton's
interpreter (tests/kernels/conftest.py); their values are proven against the spec by
test_triton_forward/backward, and here only against the eager call they stand for.
"""
import pytest
import torch

from builders import DEVICE, SMALL, make_lora, make_weight, rand
from kernels import ops
from kernels.call import LoraCall


def _nf4(N=64, K=128, dtype=torch.bfloat16):
    weight, W64 = make_weight("nf4", N, K, dtype=dtype)
    return weight, W64


def test_dequantize_4bit_opcheck_and_bits():
    from kernels.torch_ops import dequantize

    weight, _ = _nf4()
    torch.library.opcheck(torch.ops.lorafuse.dequantize_4bit.default, ops.flatten(weight))
    assert torch.equal(ops.dequantize_4bit(weight), dequantize(weight))  # the same bits as eager


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_matmul_4bit_opcheck_and_values(transpose, lora):
    from kernels.torch_ops import dequantize

    weight, _ = _nf4(dtype=torch.float32)
    n, k = weight.shape
    a = rand((2, 3, k if transpose else n), torch.float32)  # [B, T, K] or [B, T, N]
    out_dim = n if transpose else k
    bias = rand((out_dim,), torch.float32, seed=3) if transpose else None
    u = rand((2, 3, 4), torch.float32, seed=4) if lora else None  # [B, T, r]
    up = rand((4, out_dim), torch.float32, seed=5) if lora else None  # [r, out]
    args = (a, transpose, bias, u, up, 0.5, *ops.flatten(weight))
    torch.library.opcheck(torch.ops.lorafuse.matmul_4bit.default, args)
    w = dequantize(weight, torch.float32)  # [N, K]
    want = a @ (w.t() if transpose else w)
    want = want if bias is None else want + bias
    want = want if u is None else want + 0.5 * (u @ up)
    torch.testing.assert_close(ops.matmul_4bit(a, weight, transpose, bias, u, up, 0.5), want,
                               rtol=1e-5, atol=1e-5)  # fp32, another summation order only


@pytest.mark.parametrize("fmt,dropout_p", [("nf4", 0.0), ("dense", 0.1)])
def test_triton_ops_opcheck_and_equal_eager(fmt, dropout_p):
    """The operators give the eager Triton path's values, forward and backward (same kernels, same
    Philox seed); opcheck runs them forward and through autograd."""
    M, K, N = SMALL
    weight, _ = make_weight(fmt, N, K)
    A, B = make_lora(N, K, 4, dtype=torch.bfloat16)
    x = rand((M, K), torch.bfloat16)
    seed = torch.full((1,), 1234, dtype=torch.int64, device=DEVICE) if dropout_p else None
    leaves = [t.detach().requires_grad_() for t in (x, A, B)]
    args = (*leaves, None, seed, *ops.flatten(weight), 0.5, dropout_p)
    torch.library.opcheck(torch.ops.lorafuse.triton_forward.default, args)
    y, u = torch.ops.lorafuse.triton_forward.default(*args)
    g = rand(y.shape, torch.bfloat16, seed=6)
    torch.library.opcheck(torch.ops.lorafuse.triton_backward.default,
                          (g, x, u, A, B, seed, *ops.flatten(weight), 0.5, dropout_p, True))

    import kernels

    call = LoraCall(leaves[0], weight, None, leaves[1], leaves[2], 0.5, dropout_p, None, N, K)
    y = ops.triton_lora(call, seed)
    y.float().square().sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    want_y = kernels.lora_linear(leaves[0], weight, None, leaves[1], leaves[2], 0.5, dropout_p, training=True,
                                 backend="triton", seed=1234 if dropout_p else None)
    want_y.float().square().sum().backward()
    assert torch.equal(y, want_y)
    for g, t in zip(got, leaves):
        assert torch.equal(g, t.grad)


def test_int8_dequantize_literal_is_the_named_constant():
    """reference.dequantize writes 1/127 as a literal (kernels/ops.py matmul_4bit says why)."""
    from kernels import reference
    from kernels.formats.int8 import INT8_INV_127

    weight, _ = make_weight("int8", 64, 128)
    want = weight.CB * weight.SCB.view(-1, 1) * INT8_INV_127
    assert torch.equal(reference.dequantize(weight), want)


def test_auto_fallback_line_under_compile_without_a_graph_break(capfd):
    """backend='auto' on CPU tensors says why it uses torch once, also when the call is compiled
    with fullgraph=True (a print while tracing would be a graph break, which fullgraph refuses)."""
    import kernels
    from kernels import backends
    from kernels.formats import DenseWeight

    backends.reset_warnings()
    weight = DenseWeight(rand((8, 16), torch.float32).cpu())
    A, B = (rand(s, torch.float32, seed=i).cpu() for i, s in ((3, (4, 16)), (4, (8, 4))))
    f = torch.compile(lambda x: kernels.lora_linear(x, weight, None, A, B, 0.5, backend="auto"),
                      backend="eager", fullgraph=True)
    x = rand((2, 16), torch.float32).cpu()
    for _ in range(2):
        torch.testing.assert_close(f(x), kernels.lora_linear(x, weight, None, A, B, 0.5, backend="torch"))
    err = capfd.readouterr().err
    assert err.count("kernels: backend 'auto' uses torch (") == 1, err
