"""Bad input to the Triton launchers: a clear error naming the problem, never a kernel crash.

Each check runs before anything is allocated or launched, so these tests are fast on CPU too.
`unsupported_reason` (what backend="auto" asks) returns the same message instead of raising.
"""
import bitsandbytes.functional as bnbF
import pytest
import torch

from kernels import lora_4bit, lora_dense, lora_int8
from kernels.triton_common import MAX_RANK, TritonInputError
from kernels.weights import DenseWeight, Int8Weight, Quant4bitWeight
from triton_cases import DEVICE, make_lora, make_weight, rand

N, K, M = 64, 128, 20


@pytest.fixture(scope="module")
def nf4():
    return make_weight("nf4", N, K)[0]


def _call(weight, x=None, bias=None, A=..., B=..., p=0.0, seed=None, mod=lora_4bit):
    if A is ...:
        A, B = make_lora(N, K, 8)
    x = rand((M, K), torch.bfloat16) if x is None else x
    return mod.lora_forward(x, weight, bias, A, B, 1.0, p, seed)


def test_fp32_activations_rejected_and_reported(nf4):
    x = rand((M, K), torch.float32)
    with pytest.raises(TypeError, match="fp16/bf16 activations"):
        _call(nf4, x=x)
    A, B = make_lora(N, K, 8)
    assert "fp16/bf16" in lora_4bit.unsupported_reason(x, nf4, None, A, B, 0.0)
    assert lora_4bit.unsupported_reason(x.bfloat16(), nf4, None, A, B, 0.0) is None


@pytest.mark.parametrize("what,kwargs,match", [
    ("x wrong K", dict(x=torch.zeros(M, K + 1, dtype=torch.bfloat16)), "expects K=128"),
    ("x 3-D", dict(x=torch.zeros(2, M, K, dtype=torch.bfloat16)), "must be 2-D"),
    ("A wrong K", dict(A=torch.zeros(8, K + 2), B=torch.zeros(N, 8)), "lora_A"),
    ("B wrong r", dict(A=torch.zeros(8, K), B=torch.zeros(N, 4)), "lora_B"),
    ("only A", dict(A=torch.zeros(8, K), B=None), "both given or both None"),
    ("rank too big", dict(A=torch.zeros(MAX_RANK * 2, K), B=torch.zeros(N, MAX_RANK * 2)), "rank"),
    ("bias wrong", dict(bias=torch.zeros(N + 1)), "bias"),
    ("dropout no seed", dict(p=0.1), "seed"),
    ("dropout p=1", dict(p=1.0, seed=1), r"\[0, 1\)"),
])
def test_bad_shapes_and_arguments(nf4, what, kwargs, match):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(TritonInputError, match=match):
        _call(nf4, **kwargs)


def test_non_contiguous_x(nf4):
    x = rand((K, M), torch.bfloat16).t()  # [M, K] with stride (1, M)
    with pytest.raises(TritonInputError, match="contiguous along K"):
        _call(nf4, x=x)


def test_device_mismatch(nf4):
    other = torch.device("cpu") if DEVICE.type == "cuda" else torch.device("meta")
    A, B = make_lora(N, K, 8)
    with pytest.raises(TritonInputError, match="same device"):
        _call(nf4, A=A.to(other), B=B)
    w = make_weight("int8", N, K)[0]
    w_other = Int8Weight(CB=w.CB.to(other), SCB=w.SCB.to(other))
    with pytest.raises(TritonInputError, match="base weight"):
        _call(w_other, mod=lora_int8)


def test_cpu_tensors_need_the_interpreter(nf4, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    A, B = make_lora(N, K, 8)
    if DEVICE.type == "cuda":
        with pytest.raises(TritonInputError, match="same device|CUDA"):
            lora_4bit.lora_forward(x, nf4, None, A, B, 1.0)
    else:
        with pytest.raises(TritonInputError, match="need CUDA tensors"):
            lora_4bit.lora_forward(x, nf4, None, A, B, 1.0)


def test_bnb_cpu_repacked_layout_rejected():
    """bnb's CPU repack (Linear4bit.forward in eval on CPU) changes the layout in place: detect it."""
    W = torch.randn(N, K, dtype=torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    repacked, qs2 = bnbF._convert_weight_packed_for_cpu(packed, qs)
    assert qs2.packing_format_for_cpu
    weight = Quant4bitWeight(packed=repacked.to(DEVICE), absmax=qs2.absmax.to(DEVICE),
                             code=qs2.code.to(DEVICE), blocksize=64, shape=(N, K), quant_type="nf4",
                             dtype=torch.bfloat16, nested=None)
    with pytest.raises(TritonInputError, match="CPU-repacked"):
        _call(weight)
    x = rand((M, K), torch.bfloat16)
    assert "CPU-repacked" in lora_4bit.unsupported_reason(x, weight, None, None, None, 0.0)


@pytest.mark.parametrize("break_it,match", [
    (lambda w: dict(packed=w.packed[: w.packed.numel() // 2]), "bytes"),
    (lambda w: dict(absmax=w.absmax[:-1]), "absmax has"),
    (lambda w: dict(blocksize=48), "power of two"),
    (lambda w: dict(absmax=w.absmax.float(), nested=None), None),  # fine: plain fp32 absmax values
    (lambda w: dict(nested=None), "no nested"),
    (lambda w: dict(code=w.code[:8]), "16 fp32"),
])
def test_inconsistent_4bit_state(nf4, break_it, match):
    fields = dict(packed=nf4.packed, absmax=nf4.absmax, code=nf4.code, blocksize=nf4.blocksize,
                  shape=nf4.shape, quant_type=nf4.quant_type, dtype=nf4.dtype, nested=nf4.nested)
    fields.update(break_it(nf4))
    weight = Quant4bitWeight(**fields)
    if match is None:
        lora_4bit.weight_args(weight)  # accepted
        return
    with pytest.raises(TritonInputError, match=match):
        _call(weight)


def test_wrong_format_and_dtypes():
    dense = make_weight("dense", N, K)[0]
    with pytest.raises(TritonInputError, match="Quant4bitWeight"):
        _call(dense)  # lora_4bit given a dense record
    with pytest.raises(TritonInputError, match="2-D int8"):
        _call(Int8Weight(CB=torch.zeros(N, K, dtype=torch.int16, device=DEVICE),
                         SCB=torch.ones(N, device=DEVICE)), mod=lora_int8)
    with pytest.raises(TritonInputError, match="fp16/bf16/fp32"):
        _call(DenseWeight(torch.zeros(N, K, dtype=torch.int32, device=DEVICE)), mod=lora_dense)
    import kernels

    with pytest.raises(TypeError, match="unknown base weight"):
        kernels.lora_linear(rand((M, K), torch.bfloat16), object(), None, None, None, 1.0,
                            backend="triton")


def test_backward_bad_grad_and_u(nf4):
    A, B = make_lora(N, K, 8)
    x = rand((M, K), torch.bfloat16)
    u = torch.zeros(M, 8, device=DEVICE)
    with pytest.raises(TritonInputError, match="grad_output"):
        lora_4bit.lora_backward(torch.zeros(M, N + 1, device=DEVICE), x, u, nf4, A, B, 1.0)
    with pytest.raises(TritonInputError, match="u must be"):
        lora_4bit.lora_backward(torch.zeros(M, N, device=DEVICE), x, u[:, :4], nf4, A, B, 1.0)
