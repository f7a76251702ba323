"""The LoRA layers the benchmarks time, built on one shared random base weight per shape, and the
reference each one's outputs are checked against.

    ours-triton         kernels.lora_linear(backend="triton") on a bnb NF4 double-quant weight, fp32
                        adapters (LoraModel's default, as peft's); the strategy is the cost model's
                        (kernels/triton/strategy.py) and the table says which ran
    ours-torch          kernels.lora_linear(backend="torch") (peft's graph, kernels/torch_ops.py), same weight
    peft-fp32           peft's LoRA `Linear4bit` on `bitsandbytes.nn.Linear4bit` (nf4, double quant) with
                        peft's default fp32 adapters (autocast_adapter_dtype=True)
    peft-bf16           the same with bf16 adapters
    bnb-gemm4bit        decode rows only (forward, M <= 16): bitsandbytes' own small-M path,
                        bnb.matmul_4bit (its gemm_4bit dispatcher), + the LoRA term as two bf16
                        F.linear: what peft runs at decode minus peft's own overhead
    floor               the bare dense bf16 GEMM(s) (cuBLAS): y = x @ W^T; backward dx = g @ W. No LoRA
    dense-lora-unfused  dense bf16 nn.Linear + the LoRA term as two thin F.linear (bf16 adapters)

bf16 activations, r = 16, lora_alpha = 32, no dropout (peft then uses nn.Identity). The quantized
providers share one quantization of W (the same packed bytes, copied per layer copy), so all
multiply by the same quantized W; floor and dense-lora-unfused use the dense bf16 W itself.
`copies` > 1 builds that many layers on separate copies of the weights, so a CUDA graph replaying
one step per copy cannot keep a weight in L2 (benchmarks/test_bench_lora.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

PROVIDERS = ("ours-triton", "ours-torch", "peft-fp32", "peft-bf16", "bnb-gemm4bit", "floor", "dense-lora-unfused")
DECODE_ONLY = ("bnb-gemm4bit",)
QUANTIZED = ("ours-triton", "ours-torch", "peft-fp32", "peft-bf16", "bnb-gemm4bit")
R, ALPHA = 16, 32
SCALING = ALPHA / R


@dataclass
class Layer:
    """fwd(x) -> y; params: the adapter weights [A, B] that get gradients (empty for the floor);
    weight_bytes: what a kernel must read for W (packed nibbles + absmax, or the dense bf16 W)."""

    fwd: Callable[[torch.Tensor], torch.Tensor]
    params: list
    weight_bytes: int
    keep: object = None  # storage a record views (kept alive with the layer)


@dataclass
class Shared:
    """One shape's base weight and adapter, shared by every provider (CPU tensors)."""

    W: torch.Tensor  # [N, K] fp32
    A: torch.Tensor  # [r, K] fp32
    B: torch.Tensor  # [N, r] fp32
    base: object = None  # the bnb Linear4bit quantized once (on the device)


def shared(K: int, N: int, device: torch.device, seed: int = 0) -> Shared:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * K**-0.5  # [N, K]
    A = (torch.rand(R, K, generator=gen) * 2 - 1) * K**-0.5
    B = torch.randn(N, R, generator=gen) * 0.01  # nonzero: the up-projection is timed and checked
    return Shared(W, A, B, _bnb_linear4bit(W, device))


def _bnb_linear4bit(W: torch.Tensor, device: torch.device):
    import bitsandbytes as bnb

    N, K = W.shape
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16,
                             compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(W.to(torch.bfloat16).cpu(), requires_grad=False,
                                    compress_statistics=True, quant_type="nf4")
    return base.to(device)  # quantizes on the move (GPU), or in place on CPU


def quant4bit_record(base):
    """kernels.Quant4bitWeight viewing a bnb Linear4bit's packed weight and quant state."""
    from kernels import Quant4bitWeight

    return Quant4bitWeight.from_bnb(base.weight.data, base.weight.quant_state)


def packed_bytes(rec) -> int:
    """Bytes a kernel must read for W: packed nibbles + absmax (+ nested state)."""
    n = rec.packed.numel() * rec.packed.element_size() + rec.absmax.numel() * rec.absmax.element_size()
    if rec.nested is not None:
        n += rec.nested.absmax.numel() * 4 + rec.nested.code.numel() * 4
    return n + rec.code.numel() * 4


def build(provider: str, sh: Shared, device: torch.device) -> Layer:
    """One provider's layer on its own copy of the shared weights."""
    import kernels

    A32, B32 = sh.A.to(device), sh.B.to(device)
    if provider in ("ours-triton", "ours-torch"):
        base = copy.deepcopy(sh.base)  # its own packed bytes, the same values
        rec = quant4bit_record(base)
        A, B = A32.clone().requires_grad_(), B32.clone().requires_grad_()
        backend = provider.split("-")[1]

        def fwd(x):
            return kernels.lora_linear(x, rec, None, A, B, SCALING, 0.0, training=True, backend=backend)
        return Layer(fwd, [A, B], packed_bytes(rec), keep=base)
    if provider in ("peft-fp32", "peft-bf16"):
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        base = copy.deepcopy(sh.base)
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0)
        layer = PeftLinear4bit(base, "default", config=cfg, r=R, lora_alpha=ALPHA, lora_dropout=0.0)
        dtype = torch.float32 if provider == "peft-fp32" else torch.bfloat16
        layer.lora_A["default"].to(device=device, dtype=dtype)
        layer.lora_B["default"].to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A32)
            layer.lora_B["default"].weight.copy_(B32)
        layer.train()
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return Layer(layer, params, packed_bytes(quant4bit_record(base)))
    if provider == "bnb-gemm4bit":
        import bitsandbytes as bnb

        base = copy.deepcopy(sh.base)
        A, B = A32.to(torch.bfloat16), B32.to(torch.bfloat16)
        packed, state = base.weight.data, base.weight.quant_state

        def fwd(x):
            return bnb.matmul_4bit(x, packed.t(), state) + F.linear(F.linear(x, A), B) * SCALING
        return Layer(fwd, [], packed_bytes(quant4bit_record(base)), keep=base)
    Wd = sh.W.to(device=device, dtype=torch.bfloat16)  # a frozen dense base, its own copy
    if provider == "floor":
        return Layer(lambda x: F.linear(x, Wd), [], Wd.numel() * 2)
    if provider == "dense-lora-unfused":
        A, B = A32.to(torch.bfloat16).requires_grad_(), B32.to(torch.bfloat16).requires_grad_()
        return Layer(lambda x: F.linear(x, Wd) + F.linear(F.linear(x, A), B) * SCALING, [A, B], Wd.numel() * 2)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def flops(M: int, K: int, N: int, mode: str, lora: bool = True) -> int:
    """Useful FLOPs: forward 2MNK (+ 2Mr(K+N) LoRA); backward adds dx 2MNK (+ 4Mr(K+N) LoRA grads)."""
    base, extra = 2 * M * N * K, (2 * M * R * (K + N) if lora else 0)
    return base + extra if mode == "fwd" else 2 * base + 3 * extra


# ---- the reference every provider is checked against --------------------------------------------

def reference(provider: str, sh: Shared, x: torch.Tensor, g: Optional[torch.Tensor]) -> dict:
    """{name: (value, magnitude)} in fp32 for y, and (with g) dx, dA, dB: `kernels.reference` (the
    spec) on the provider's own W (the quantized one, dequantized exactly, or the dense bf16 one),
    and the same computation on absolute values (the scale of the rounding errors)."""
    from kernels import DenseWeight, reference as spec

    if provider in QUANTIZED:
        W = spec.dequantize(quant4bit_record(sh.base), torch.float32)  # [N, K]: bnb's values
    else:
        W = sh.W.to(device=x.device, dtype=torch.bfloat16).float()
    lora = provider != "floor"
    A, B = sh.A.to(x.device), sh.B.to(x.device)
    if provider in ("peft-bf16", "dense-lora-unfused", "bnb-gemm4bit"):
        A, B = A.bfloat16().float(), B.bfloat16().float()  # what those providers multiply by
    out = {}
    for name, sign in (("value", 1), ("mag", -1)):
        f = (lambda t: t) if sign > 0 else (lambda t: t.abs())
        xs, Ws = f(x.float()), DenseWeight(f(W))
        As, Bs = (f(A), f(B)) if lora else (None, None)
        y, u = spec.lora_forward(xs, Ws, None, As, Bs, SCALING)
        out.setdefault("y", []).append(y)
        if g is not None:
            gs = f(g.float())
            dx, dA, dB = spec.lora_backward(gs, xs, u if lora else None, Ws, As, Bs, SCALING)
            for k, v in (("dx", dx), ("dA", dA), ("dB", dB)):
                if v is not None:
                    out.setdefault(k, []).append(v)
    return {k: tuple(v) for k, v in out.items()}


def outputs(layer: Layer, x: torch.Tensor, g: Optional[torch.Tensor]) -> dict:
    """What `check` compares: y [M, N], and with an upstream gradient g [M, N] also dx [M, K] and
    (for providers with LoRA parameters) dA [r, K], dB [N, r]."""
    if g is None:
        with torch.no_grad():
            return {"y": layer.fwd(x)}
    for p in layer.params:
        p.grad = None
    x = x.detach().requires_grad_()
    y = layer.fwd(x)
    y.backward(g)
    out = {"y": y.detach(), "dx": x.grad}
    if layer.params:
        out.update(dA=layer.params[0].grad, dB=layer.params[1].grad)
    return out


def check(got: dict, ref: dict, u: float = 2.0**-8) -> str:
    """"ok", or what is off: |got - ref| <= 4u (|ref| + mag) elementwise for every output (bf16
    roundings of the output and of the operands, tf32 LoRA products, the x.dtype decode of the gemv
    strategy: the tests' bound, tests/kernels/builders.py, plus slack; a wrong tile or nibble fails it)."""
    bad = []
    for name, (value, mag) in ref.items():
        t = got.get(name)
        if t is None:
            bad.append(f"{name} missing")
            continue
        t = t.float().reshape(value.shape)
        err = (t - value).abs()
        over = err > 4 * u * (value.abs() + mag)
        if not torch.isfinite(t).all() or over.any():
            bad.append(f"{name}: {int(over.sum())}/{over.numel()} off (max err {float(err.max()):.3g})")
    return "ok" if not bad else "; ".join(bad)
