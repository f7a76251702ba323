"""kernels.lora_linear: the one validation, the backend choice (and its reasons), the once-only
fallback warning, and every bad-input error."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import kernels
from builders import quantize_4bit, quantize_int8
from kernels import backends, reference
from kernels.formats import DenseWeight, Int8Weight

M, K, N, R = 3, 64, 32, 4


@pytest.fixture(autouse=True)
def _fresh_warnings():
    backends.reset_warnings()
    yield
    backends.reset_warnings()


@pytest.fixture
def call():
    """Valid dense inputs; override any argument by keyword."""
    args = dict(x=torch.randn(2, M, K), weight=DenseWeight(torch.randn(N, K)), bias=torch.randn(N),
                lora_A=torch.randn(R, K), lora_B=torch.randn(N, R), scaling=0.5)

    def run(**over):
        kw = {**args, **over}
        return kernels.lora_linear(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("lora_A"),
                                   kw.pop("lora_B"), kw.pop("scaling"), **kw)
    run.args = args
    return run


@pytest.fixture
def fake_triton(monkeypatch):
    """The triton backend with a stand-in launch module (the spec, counting calls), so the choice and
    the autograd wiring (LoraFunction) are tested without the real kernels."""

    class FakeLaunch:
        calls: list = []

        @staticmethod
        def reason(call):
            return "fp32 activations not supported (fake)" if call.x.dtype == torch.float32 else None

        @staticmethod
        def forward(call, seed):
            FakeLaunch.calls.append("forward")
            x = call.x.reshape(-1, call.K)
            y, u = reference.lora_forward(x, call.weight, call.bias, call.A, call.B, call.scaling)
            return y.view(*call.x.shape[:-1], call.N), u

        @staticmethod
        def backward(g, x, u, weight, A, B, scaling, dropout_p, seed, needs_dx):
            FakeLaunch.calls.append("backward")
            dx, dA, dB = reference.lora_backward(g.reshape(-1, N), x.reshape(-1, K), u, weight, A, B, scaling)
            return dx.view(x.shape), dA, dB

    monkeypatch.setattr(backends.TritonBackend, "_launch", FakeLaunch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors are the interpreter's
    return FakeLaunch


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------

def test_output_shape_and_torch_backend_matches_reference(call):
    y = call(backend="torch")
    a = call.args
    expected, _ = reference.lora_forward(a["x"].reshape(-1, K), a["weight"], a["bias"], a["lora_A"],
                                         a["lora_B"], 0.5)
    assert y.shape == (2, M, N) and torch.equal(y.reshape(-1, N), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_falls_back_on_cpu_and_says_so_once(call, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain stderr line, not a warning with a source line
        y = call()
        assert torch.equal(y, call(backend="torch"))
        call()
        call(x=torch.randn(5, K))
    assert capsys.readouterr().err == "kernels: backend 'auto' uses torch (no CUDA device)\n"


def test_auto_says_once_per_reason(monkeypatch, call, capsys):
    reasons = iter(["reason one", "reason two", "reason one"])
    monkeypatch.setattr(backends, "auto_reason", lambda c: next(reasons))
    for _ in range(3):
        call()
    assert capsys.readouterr().err.splitlines() == ["kernels: backend 'auto' uses torch (reason one)",
                                                    "kernels: backend 'auto' uses torch (reason two)"]


def test_triton_backend_runs_forward_and_backward_through_the_function(fake_triton, call):
    x = torch.randn(2, M, K, dtype=torch.float64, requires_grad=True)
    a = call.args
    A, B = a["lora_A"].double().requires_grad_(), a["lora_B"].double()
    bias = a["bias"].double().requires_grad_()
    y = kernels.lora_linear(x, DenseWeight(a["weight"].weight.double()), bias, A, B, 0.5, backend="triton")
    g = torch.randn(2, M, N, dtype=torch.float64)
    y.backward(g)
    assert fake_triton.calls == ["forward", "backward"] and type(y.grad_fn).__name__ == "LoraFunctionBackward"
    x2, A2, b2 = (t.detach().clone().requires_grad_() for t in (x, A, bias))
    reference.lora_forward(x2.reshape(-1, K), DenseWeight(a["weight"].weight.double()), b2, A2, B, 0.5)[0] \
        .backward(g.reshape(-1, N))
    for got, want in ((x.grad, x2.grad), (A.grad, A2.grad), (bias.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_triton_refuses_a_call_it_cannot_run_with_the_reason(fake_triton, call):
    with pytest.raises(ValueError, match=r"cannot run this call: fp32 activations not supported \(fake\).*'auto'"):
        call(backend="triton")
    assert fake_triton.calls == []


def test_trainable_dense_base_is_refused_by_triton_with_its_reason(fake_triton, call):
    """The fused backward computes no weight gradient: backend='triton' on a dense base that
    requires grad says so (it used to run the reference quietly), and that is auto's reason too."""
    W = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    x = torch.randn(M, K, dtype=torch.float64)
    with pytest.raises(ValueError, match="dense base weight requires grad"):
        kernels.lora_linear(x, DenseWeight(W), None, None, None, 1.0, backend="triton")
    y = kernels.lora_linear(x, DenseWeight(W), None, None, None, 1.0, backend="torch")
    y.sum().backward()
    assert W.grad is not None and fake_triton.calls == []
    with torch.no_grad():  # inference needs no weight gradient: the fused kernels may run
        kernels.lora_linear(x, DenseWeight(W), None, None, None, 1.0, backend="triton")
    assert fake_triton.calls == ["forward"]


def test_cpu_without_interpreter_says_how_to_enable_it(monkeypatch, call):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        call(backend="triton", x=torch.randn(M, K, dtype=torch.bfloat16),
             weight=DenseWeight(torch.randn(N, K, dtype=torch.bfloat16)))


def test_triton_not_importable_is_named(monkeypatch, call):
    monkeypatch.setattr(backends.TritonBackend, "_launch", "the Triton kernels cannot be imported (test)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"cannot be imported \(test\)"):
        call(backend="triton")


def test_unknown_backend_lists_valid_ones(call):
    with pytest.raises(ValueError, match=r"'cuda'.*\['auto', 'torch', 'triton'\]"):
        call(backend="cuda")


def test_dropout_only_in_training_and_reproducible(call):
    eval_y = call(dropout_p=0.5, training=False, backend="torch")
    assert torch.equal(eval_y, call(backend="torch"))  # no dropout outside training
    a = call(dropout_p=0.5, training=True, backend="torch", seed=3)  # explicit seed: the Philox mask
    assert torch.equal(a, call(dropout_p=0.5, training=True, backend="torch", seed=3))
    assert not torch.equal(a, call(dropout_p=0.5, training=True, backend="torch", seed=4))
    torch.manual_seed(7)
    b = call(dropout_p=0.5, training=True, backend="torch")  # seed=None: torch's generator
    torch.manual_seed(7)
    assert torch.equal(b, call(dropout_p=0.5, training=True, backend="torch"))


def test_base_only_call(call):
    a = call.args
    y = call(lora_A=None, lora_B=None, backend="torch")
    assert torch.equal(y, torch.nn.functional.linear(a["x"], a["weight"].weight, a["bias"]))


def test_quantized_formats_run_through_the_entry():
    x = torch.randn(4, 128)
    A, B = torch.randn(2, 128), torch.randn(64, 2)
    for weight in (quantize_4bit(torch.randn(64, 128), "nf4", True)[0], quantize_int8(torch.randn(64, 128))):
        y = kernels.lora_linear(x, weight, None, A, B, 1.0, backend="torch")
        expected, _ = reference.lora_forward(x, weight, None, A, B, 1.0)
        assert torch.equal(y, expected)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over,match", [
    (lambda a: dict(x=torch.randint(0, 3, (M, K))), "unsupported dtype torch.int64"),
    (lambda a: dict(x=torch.randn(M, K + 1)), "65 features .* K=64"),
    (lambda a: dict(x=torch.randn(M, K, device="meta")), "device mismatch"),
    (lambda a: dict(lora_A=torch.randn(R, K, device="meta")), "device mismatch"),
    (lambda a: dict(bias=torch.randn(N, device="meta")), "device mismatch"),
    (lambda a: dict(x=torch.randn(M, K, dtype=torch.float16)), "dtype mismatch.*float16.*float32"),
    (lambda a: dict(lora_A=torch.randn(R, K + 1)), r"lora_A must be \[r, K=64\]"),
    (lambda a: dict(lora_B=torch.randn(N + 1, R)), r"lora_B must be \[N=32, r=4\]"),
    (lambda a: dict(lora_B=torch.randn(N, R + 1)), r"lora_B must be \[N=32, r=4\]"),
    (lambda a: dict(lora_B=None), "both be tensors, or both None"),
    (lambda a: dict(lora_B=torch.randn(N, R, dtype=torch.float64)), "share one float dtype"),
    (lambda a: dict(bias=torch.randn(N + 1)), r"bias must have shape \[N=32\]"),
    (lambda a: dict(dropout_p=1.0, training=True), r"dropout_p=1.0: must be in \[0, 1\)"),
    (lambda a: dict(dropout_p=0.1, training=True, seed=-5), r"seed=-5"),
    (lambda a: dict(weight=DenseWeight(torch.randn(N, K, 1))), "2-D tensor"),
    (lambda a: dict(weight=torch.randn(N, K)), "unknown base weight type Tensor"),
])
def test_bad_input_errors(call, over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(backend="torch", **over(call.args))


def _nf4(nested=True):
    return quantize_4bit(torch.randn(N, K), "nf4", nested)[0]


def _replace(record, **fields):
    return dataclasses.replace(record, **fields)


@pytest.mark.parametrize("make,match", [
    (lambda: _replace(_nf4(), quant_type="int4"), "'nf4' and 'fp4'"),
    (lambda: _replace(_nf4(False), absmax=torch.ones(3)), "absmax must be contiguous with 32 entries"),
    (lambda: _replace(_nf4(False), absmax=_nf4(False).absmax.half()), "plain absmax must be fp32"),
    (lambda: _replace(_nf4(True), nested=None), "uint8 absmax means double quantization"),
    (lambda: _replace(_nf4(True), nested=_replace(_nf4(True).nested, code=torch.ones(16))), "need fp32, 256"),
    (lambda: _replace(_nf4(), packed=_nf4().packed[:-1]), "needs 1024"),
    (lambda: _replace(_nf4(), packed=torch.zeros(2, 1024, dtype=torch.uint8)[:, 0]), "contiguous"),
    (lambda: _replace(_nf4(), code=torch.ones(4)), "16-entry"),
    (lambda: Int8Weight(CB=torch.zeros(N, K, dtype=torch.int16), SCB=torch.ones(N)), "CB must be int8"),
    (lambda: Int8Weight(CB=torch.zeros(N, K, dtype=torch.int8), SCB=torch.ones(N - 1)), r"SCB must be a float32 \[N=32\]"),
])
def test_inconsistent_weight_records(call, make, match):
    with pytest.raises(ValueError, match=match):
        call(weight=make(), backend="torch")


def test_nothing_is_modified_by_a_rejected_call(call):
    a = call.args
    before = [t.clone() for t in (a["x"], a["weight"].weight, a["lora_A"], a["lora_B"])]
    with pytest.raises(ValueError):
        call(lora_B=torch.randn(N + 1, R), backend="torch")
    for b, t in zip(before, (a["x"], a["weight"].weight, a["lora_A"], a["lora_B"])):
        assert torch.equal(b, t)


def test_bnb_cpu_repacked_layout_is_named(call):
    """bitsandbytes' CPU repack (Linear4bit eval forward without grad) leaves a 2-D bf16 absmax."""
    w = _nf4(False)
    repacked = _replace(w, absmax=w.absmax.to(torch.bfloat16).view(N, -1))
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        call(weight=repacked, backend="torch")
