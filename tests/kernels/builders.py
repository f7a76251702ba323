"""Shared builders of the kernel tests: weight records from bitsandbytes, LoRA inputs, the float64
truth and its tolerance, and thin wrappers that run the Triton launchers on one case.

Ground truth: W is quantized with bitsandbytes.functional on CPU (quantize_4bit,
int8_vectorwise_quant) and dequantized by bitsandbytes.functional (dequantize_4bit,
int8_vectorwise_dequant) in float64; the expected outputs are `kernels.reference` run entirely in
float64 on that W (the spec, at a precision where its own rounding is negligible).

Tolerance, per element, with its reason (`bound`): the kernels round (a) the output to x.dtype
(<= u * |ref|), (b) A, B and a fp32/int8-dequantized W to x.dtype before the tensor-core products
(<= u * the sum of |terms|), (c) on a GPU, both operands of the products with the fp32 u / v (the
LoRA epilogues, dA, dB) to tf32 (2**-11 each, so <= 2**-10 * the sum of |terms|), and sum in
fp32 (K * 2**-24, negligible). With u the unit roundoff of x.dtype (bf16 2**-8, fp16 2**-11),
every error is below (2u + 2**-10) * (|ref| + mag), mag being the same computation on absolute
values (|x| @ |W|^T + ...). This is
an elementwise bound, not a global atol: a wrong tile, block, nibble order or dropout mask moves
whole rows by O(mag / sqrt(K)) and fails it. Single-element dequantization is proven bit-exact
separately (test_dequantize_bit_exact). Per strategy (kernels/triton/strategy.py):
  - "dequant-mm" rounds the LoRA term of y (and of dx) to x.dtype once before cuBLAS adds the base
    product: u * mag more, inside the bound's second u * mag ((b) takes the first);
  - "gemv" decodes 4-bit W through x.dtype values (the code and the absmax rounded to x.dtype, their
    product rounded: bitsandbytes' gemv_4bit precision), up to 3u more per weight element where the
    spec rounds once: `w_roundings=2` adds 2u * mag.

Sizes: on CUDA the same tests run at full shapes (Llama-7B-like K, N); on CPU through Triton's
interpreter (numpy per tile, slow) at small odd shapes that are multiples of no block size.
"""
from __future__ import annotations

import dataclasses

import bitsandbytes.functional as bnbF
import torch

from kernels import reference
from kernels.formats import DenseWeight, Int8Weight, Quant4bitWeight

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# (M, K, N): odd, not a multiple of any tile (32/64/128) or of the 4-bit blocksize per row.
ODD = (1031, 4096, 4099) if ON_GPU else (37, 320, 333)
SMALL = (515, 1000, 2050) if ON_GPU else (19, 130, 70)  # cheaper cases of the matrix
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", nested: bool = True, blocksize: int = 64,
                  device=None):
    """(Quant4bitWeight on `device` (default CPU), (packed, QuantState) on CPU) from bitsandbytes'
    own quantizer, run on CPU."""
    packed, state = bnbF.quantize_4bit(W.cpu(), blocksize=blocksize, compress_statistics=nested,
                                       quant_type=quant_type)
    rec = Quant4bitWeight.from_bnb(packed, state)
    if device is not None and torch.device(device).type != "cpu":
        nest = rec.nested and dataclasses.replace(rec.nested, code=rec.nested.code.to(device),
                                                  absmax=rec.nested.absmax.to(device))
        rec = dataclasses.replace(rec, packed=packed.to(device), absmax=rec.absmax.to(device),
                                  code=rec.code.to(device), nested=nest)
    return rec, (packed, state)


def quantize_int8(W: torch.Tensor) -> Int8Weight:
    """bitsandbytes' LLM.int8() storage of W (quantized from fp16, as Int8Params does)."""
    CB, SCB, _ = bnbF.int8_vectorwise_quant(W.to(torch.float16))
    return Int8Weight(CB=CB, SCB=SCB)


def make_weight(fmt: str, N: int, K: int, *, dtype=torch.bfloat16, nested=True, blocksize=64,
                transposed=False, seed=0):
    """(weight record on DEVICE, W64 [N, K] float64 ground truth from bitsandbytes.functional).

    fmt: "nf4" | "fp4" | "int8" | "dense". dtype: the dtype W is quantized from (4-bit) or stored
    in (dense). transposed: a dense W handed over as the .T view of a [K, N] tensor (GPT-2 Conv1D).
    """
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * 0.05  # [N, K] fp32 on CPU
    if fmt in ("nf4", "fp4"):
        rec, (packed, qs) = quantize_4bit(W.to(dtype), fmt, nested, blocksize, DEVICE)
        W64 = bnbF.dequantize_4bit(packed, qs).double()  # bnb's own dequantization: the truth
        return rec, W64.to(DEVICE)
    if fmt == "int8":
        rec = quantize_int8(W)
        W64 = bnbF.int8_vectorwise_dequant(rec.CB, rec.SCB).double()
        return Int8Weight(CB=rec.CB.to(DEVICE), SCB=rec.SCB.to(DEVICE)), W64.to(DEVICE)
    if fmt == "dense":
        Wd = W.to(dtype)
        if transposed:
            rec = DenseWeight(Wd.t().contiguous().to(DEVICE).t())  # [N, K] view of a [K, N] buffer
        else:
            rec = DenseWeight(Wd.to(DEVICE))
        return rec, Wd.double().to(DEVICE)
    raise ValueError(fmt)


def make_lora(N: int, K: int, r: int, dtype=torch.float32, seed=1):
    """A [r, K], B [N, r] with nonzero B (peft inits B = 0, which would hide the up-projection)."""
    gen = torch.Generator().manual_seed(seed)
    A = (torch.rand(r, K, generator=gen) * 2 - 1) / K**0.5
    B = torch.randn(N, r, generator=gen) * 0.5
    return A.to(dtype).to(DEVICE), B.to(dtype).to(DEVICE)


def rand(shape, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def poisoned(shape, dtype):
    """A NaN-filled output buffer: any element a kernel fails to write stays NaN and fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def d64(t):
    return None if t is None else t.double()


def a64(t):
    return None if t is None else t.double().abs()


def ref_forward(x, W64, bias, A, B, s, p, seed):
    """(y, u, mag_y, mag_u): the spec in float64 on bnb's W; bias rounded to x.dtype (nn.Linear)."""
    b = None if bias is None else bias.to(x.dtype)
    y, u = reference.lora_forward(x.double(), DenseWeight(W64), d64(b), d64(A), d64(B), s, p, seed)
    mag, mag_u = reference.lora_forward(x.double().abs(), DenseWeight(W64.abs()), a64(b), a64(A),
                                        a64(B), abs(s), p, seed)
    return y, u, mag, mag_u


def ref_backward(g, x, u64, W64, A, B, s, p, seed, needs_dx=True):
    """((dx, dA, dB), (mag_dx, mag_dA, mag_dB)) in float64."""
    out = reference.lora_backward(g.double(), x.double(), u64, DenseWeight(W64), A.double(),
                                  B.double(), s, p, seed, needs_dx)
    mag = reference.lora_backward(g.double().abs(), x.double().abs(), u64.abs(),
                                  DenseWeight(W64.abs()), A.double().abs(), B.double().abs(),
                                  abs(s), p, seed, needs_dx)
    return out, mag


def assert_close(name, got, ref, mag, dtype, w_roundings=0):
    """|got - ref| <= (2u + 2**-10)(|ref| + mag) + w_roundings * u * mag elementwise (reason: module
    docstring); no NaN."""
    assert got is not None, f"{name}: missing"
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.double()
    assert not torch.isnan(got).any(), f"{name}: {int(torch.isnan(got).sum())} NaN (unwritten?)"
    u = UNIT_ROUNDOFF[dtype]
    bound = (2 * u + 2.0**-10) * (ref.abs() + mag) + w_roundings * u * mag
    err = (got - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{bad.numel()} elements off; worst err "
                           f"{float((err - bound).max()):.3g} over its bound, max err {float(err.max()):.3g}")


# ---------------------------------------------------------------------------------------------
# The Triton launchers on one case (the backend's own entry is kernels.triton.launch, which picks a
# strategy by its cost model; these let a test hand over NaN-poisoned output buffers and name the
# strategy)
# ---------------------------------------------------------------------------------------------

W_ROUNDINGS = {"gemv": 2, "dequant-mm": 0, "fused": 0}  # assert_close's term per strategy (module doc)

def seed_tensor(seed, device=None):
    return None if seed is None else torch.full((1,), int(seed), dtype=torch.int64, device=device or DEVICE)


def triton_forward(x, weight, bias, A, B, scaling, dropout_p=0.0, seed=None, out=None, u_out=None, strategy=None):
    """(y [M, N], u [M, r] fp32) from one forward strategy: "gemv", "dequant-mm" or "fused"
    (default: "gemv" for M <= 16, else "fused")."""
    from kernels.triton import decode, forward, mm

    strategy = strategy or ("gemv" if x.shape[0] <= 16 else "fused")
    seed = seed_tensor(seed, x.device)
    if strategy == "fused":
        return forward.fused_forward(x, weight.kernel_args(), bias, A, B, scaling, dropout_p, seed, out=out,
                                     u_out=u_out)
    run = {"gemv": decode.gemv_forward, "dequant-mm": mm.mm_forward}[strategy]
    return run(x, weight, bias, A, B, scaling, dropout_p, seed, out=out, u_out=u_out)


def triton_backward(g, x, u, weight, A, B, scaling, dropout_p=0.0, seed=None, needs_dx=True, dx_out=None,
                    strategy="fused"):
    """(dx [M, K] | None, dA [r, K], dB [N, r]) from one backward strategy: "fused" or "dequant-mm"."""
    from kernels.triton import mm
    from kernels.triton.backward import fused_backward

    seed = seed_tensor(seed, x.device)
    if strategy == "dequant-mm":
        return mm.mm_backward(g.contiguous(), x, u, weight, A, B, scaling, dropout_p, seed, needs_dx, dx_out=dx_out)
    return fused_backward(g.contiguous(), x, u, weight.kernel_args(), A, B, scaling, dropout_p, seed, needs_dx,
                          dx_out=dx_out)
