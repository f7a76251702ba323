"""LoraLinear and quant.py on single layers: init rules, forward math, base-weight views, the CPU trap."""
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import kernels
from lora_core import LoraLinear
from lora_core import quant

K, N, R = 128, 64, 4  # in, out, rank: multiples of 64 / 32 so bnb's CPU constraints hold


def make_4bit(quant_type: str, double_quant: bool, dtype=torch.bfloat16, bias=True) -> nn.Module:
    """A bnb Linear4bit quantized on CPU from a random nn.Linear [N, K]."""
    lin = nn.Linear(K, N, bias=bias)
    layer = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, compress_statistics=double_quant,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.to(dtype), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant_type, module=layer)
    if bias:
        layer.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
    return layer.to("cpu")  # .to() quantizes


def make_int8(bias=True) -> nn.Module:
    lin = nn.Linear(K, N, bias=bias)
    layer = bnb.nn.Linear8bitLt(K, N, bias=bias, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def manual(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The LoRA formula written out in fp32 from the dense W: x W^T + b + s * x A^T B^T."""
    W = quant.dequantize_base(layer.base_layer)  # [N, K] fp32
    b = layer.base_layer.bias
    y = x.float() @ W.T + (0 if b is None else b.float())
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    return y + layer.scaling["default"] * (x.float() @ A.T) @ B.T


# ---- init ----------------------------------------------------------------------------------------
def test_init_true_is_peft_s():
    layer = LoraLinear(nn.Linear(K, N), r=R, lora_alpha=8)
    assert layer.lora_A["default"].weight.shape == (R, K) and layer.lora_B["default"].weight.shape == (N, R)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # fp32 by default, as peft
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    # kaiming_uniform(a=sqrt(5)) on [r, K] draws from U(-1/sqrt(K), 1/sqrt(K))
    bound = 1 / math.sqrt(K)
    assert layer.lora_A["default"].weight.abs().max() <= bound and layer.lora_A["default"].weight.abs().max() > 0.8 * bound
    assert layer.scaling == {"default": 8 / R} and layer.r == {"default": R}


def test_init_same_as_peft_with_same_seed():
    import peft
    base = nn.Sequential(nn.Linear(K, N))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=R, target_modules=["0"]))
    ours_base = nn.Linear(K, N)
    torch.manual_seed(3)  # same RNG draws in the same order: A, B default init, then A re-init
    ours = LoraLinear(ours_base, r=R)
    torch.testing.assert_close(ours.lora_A["default"].weight, theirs.base_model.model[0].lora_A["default"].weight)


def test_init_gaussian_and_false():
    torch.manual_seed(0)
    g = LoraLinear(nn.Linear(512, N), r=R, init_lora_weights="gaussian")
    # std of 2048 draws of N(0, 1/r^2) = 0.25 within ~5 % (sampling error ~1.6 %)
    assert abs(g.lora_A["default"].weight.std().item() - 1 / R) < 0.05 / R
    assert torch.count_nonzero(g.lora_B["default"].weight) == 0
    f = LoraLinear(nn.Linear(K, N), r=R, init_lora_weights=False)
    assert torch.count_nonzero(f.lora_B["default"].weight) == N * R  # B random: the adapter changes the output


def test_rslora_scaling():
    assert LoraLinear(nn.Linear(K, N), r=16, lora_alpha=8, use_rslora=True).scaling["default"] == 8 / 4


def test_lora_dtype_option():
    layer = LoraLinear(nn.Linear(K, N), r=R, lora_dtype=torch.bfloat16)
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.bfloat16


# ---- forward -------------------------------------------------------------------------------------
def test_forward_linear_and_conv1d_match_formula():
    x = torch.randn(2, 5, K)
    lin = LoraLinear(nn.Linear(K, N), r=R, lora_alpha=16, init_lora_weights=False)
    # fp32 throughout; only summation order differs from the manual formula
    torch.testing.assert_close(lin(x), manual(lin, x), rtol=1e-5, atol=1e-5)
    conv = Conv1D(N, K)  # weight [K, N]
    nn.init.normal_(conv.weight, std=0.02)
    c = LoraLinear(conv, r=R, init_lora_weights=False, fan_in_fan_out=True)
    assert c.in_features == K and c.out_features == N
    A, B = c.lora_A["default"].weight, c.lora_B["default"].weight
    torch.testing.assert_close(c(x), x @ conv.weight + conv.bias + c.scaling["default"] * (x @ A.T) @ B.T,
                               rtol=1e-5, atol=1e-5)


def test_disabled_gives_base_output_and_grads_reach_A_B():
    base = nn.Linear(K, N)
    layer = LoraLinear(base, r=R, init_lora_weights=False)
    x = torch.randn(3, K)
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    layer.disabled = False
    layer(x).sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_dropout_seed_follows_torch_manual_seed():
    layer = LoraLinear(nn.Linear(K, N), r=R, lora_dropout=0.5, init_lora_weights=False).train()
    x = torch.randn(4, K)
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    b = layer(x)
    torch.manual_seed(8)
    c = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)  # dropout is really applied (p = 0.5)
    layer.eval()
    torch.testing.assert_close(layer(x), manual(layer, x), rtol=1e-5, atol=1e-5)  # no dropout in eval


def test_bad_kernel_name():
    with pytest.raises(ValueError, match="bogus"):
        LoraLinear(nn.Linear(K, N), backend="bogus")


# ---- quant: base_weight views and dequantization vs bitsandbytes -----------------------------------
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_4bit_dequant_equals_bitsandbytes(quant_type, double_quant):
    layer = make_4bit(quant_type, double_quant)
    rec = quant.base_weight(layer)
    assert isinstance(rec, kernels.Quant4bitWeight) and rec.shape == (N, K)
    assert rec.packed.data_ptr() == layer.weight.data_ptr()  # a view, not a copy
    assert (rec.nested is not None) == double_quant
    ref = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # [N, K] bf16
    # exact: same table lookups and products; both end in the quantization dtype (bf16)
    torch.testing.assert_close(kernels.dequantize(rec), ref, rtol=0, atol=0)


def test_int8_dequant_equals_bitsandbytes():
    layer = make_int8()
    rec = quant.base_weight(layer)
    assert isinstance(rec, kernels.Int8Weight) and rec.CB.data_ptr() == layer.weight.data_ptr()
    ref = bnbF.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    # exact up to fp32 rounding of CB * (SCB / 127) vs CB * SCB * (1/127): at most 1 ulp
    torch.testing.assert_close(kernels.dequantize(rec, torch.float32), ref.float(), rtol=2e-7, atol=0)


def test_int8_scb_found_after_bnb_forward():
    layer = make_int8()
    scb = layer.weight.SCB.clone()
    layer(torch.randn(2, K))  # bnb moves CB/SCB from the parameter to layer.state
    torch.testing.assert_close(quant.base_weight(layer).SCB, scb, rtol=0, atol=0)


def test_conv1d_view_is_transposed():
    conv = Conv1D(N, K)
    rec = quant.base_weight(conv)
    assert rec.shape == (N, K) and rec.weight.data_ptr() == conv.weight.data_ptr()


def test_cpu_repacked_4bit_is_detected():
    layer = make_4bit("nf4", True).eval()
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer(torch.randn(2, K, dtype=torch.bfloat16))  # may repack in place on AVX512-BF16 CPUs
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    with pytest.raises(RuntimeError, match="packing_format_for_cpu"):
        quant.base_weight(layer)
    assert quant.unpack_cpu_layout(layer) == 1
    assert isinstance(quant.base_weight(layer), kernels.Quant4bitWeight)


def test_lora_layer_never_runs_bnb_forward():
    layer = make_4bit("nf4", True)
    layer.support_avx512bf16_for_cpu = True  # even with the repack path on, we never call bnb
    lora = LoraLinear(layer, r=R, init_lora_weights=False).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = lora(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # bf16 output; the reference is fp32 math on the same dequantized W: bf16 rounding of the output
    # (~2^-8 relative) plus the bf16 cast of the input to the base matmul.
    torch.testing.assert_close(y.float(), manual(lora, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["dense", "nf4", "int8"])
def test_requantize_round_trip(kind):
    layer = {"dense": lambda: nn.Linear(K, N), "nf4": lambda: make_4bit("nf4", True),
             "int8": make_int8}[kind]()
    W = quant.dequantize_base(layer)
    quant.requantize_into(layer, W)
    # re-quantizing an already-quantized W reproduces it: the codes and scales are a fixed point
    # up to the fp rounding of absmax (double quant re-derives it from 8-bit codes): 1 % of a step
    err = (quant.dequantize_base(layer) - W).abs().max().item()
    assert err <= (0 if kind == "dense" else 0.01 * W.abs().max().item())


# ---- the cached base-weight record ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "conv1d", "nf4", "int8"])
def test_base_record_is_reused_until_the_base_storage_changes(kind):
    """LoraLinear builds its kernels record once, not per forward, and rebuilds it when merge
    re-quantizes (new quant_state) or the storage is replaced, so the output always follows the
    layer's current weight (`manual` reads it through a freshly built record)."""
    base = {"dense": lambda: nn.Linear(K, N), "conv1d": lambda: Conv1D(N, K),
            "nf4": lambda: make_4bit("nf4", True, dtype=torch.float32), "int8": make_int8}[kind]()
    layer = LoraLinear(base, r=R, init_lora_weights=False, fan_in_fan_out=(kind == "conv1d"))
    x = torch.randn(3, K)
    # fp32 throughout; the only differences are summation order in the matmuls (~1e-6 here)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), manual(layer, x), **tol)
    rec = layer._base_record()
    assert layer._base_record() is rec  # no rebuild while nothing changed
    layer.merge()
    if kind == "nf4":  # a new QuantState: the old record would describe the old codes
        assert layer._base_record() is not rec
    layer.disabled = True  # base only: x W_merged^T + b, through the (re)built record
    W = quant.dequantize_base(base)
    b = base.bias.float()
    torch.testing.assert_close(layer(x), x @ W.T + b, **tol)
    layer.disabled = False
    layer.unmerge()
    torch.testing.assert_close(layer(x), manual(layer, x), **tol)
    # storage replaced (what .to() / a checkpoint load does): a new record is built
    rec = layer._base_record()
    with torch.no_grad():
        base.weight.data = base.weight.data.clone()
    assert layer._base_record() is not rec
    torch.testing.assert_close(layer(x), manual(layer, x), **tol)


def test_base_record_follows_to_dtype():
    """.to(float64) swaps the dense weight's storage: the next forward reads the new one."""
    layer = LoraLinear(nn.Linear(K, N), r=R, init_lora_weights=False)
    layer(torch.randn(2, K))
    assert "_record_cache" in layer.__dict__
    layer.to(torch.float64)
    assert "_record_cache" not in layer.__dict__  # dropped at once: the old storage is not kept alive
    x = torch.randn(2, K, dtype=torch.float64)
    torch.testing.assert_close(layer(x), manual(layer, x).double(), rtol=1e-5, atol=1e-5)
