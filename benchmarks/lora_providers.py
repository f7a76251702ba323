"""The four LoRA layers the benchmarks time, built on one shared random base weight per shape.

    ours-triton  kernels.lora_linear(backend="triton") on a bnb NF4 double-quant weight
    ours-torch   kernels.lora_linear(backend="torch") (peft's graph, kernels/torch_ops.py) on the same weight
    peft         peft's LoRA `Linear4bit` wrapping `bitsandbytes.nn.Linear4bit` (nf4, double quant)
    floor        dense bf16 nn.Linear (cuBLAS) + LoRA as two thin F.linear calls, plain PyTorch

All four use bf16 activations and bf16 adapters (what training under torch.autocast(bf16) runs),
r = 16, lora_alpha = 32, no dropout (peft then uses nn.Identity). Our two share the bnb module's own
packed storage, so everybody multiplies by the same quantized W.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PROVIDERS = ("ours-triton", "ours-torch", "peft", "floor")
R, ALPHA = 16, 32


@dataclass
class Layer:
    """fwd(x) -> y; params: the tensors that get gradients (besides x); packed_bytes: W's storage."""

    fwd: Callable[[torch.Tensor], torch.Tensor]
    params: list
    weight_bytes: int


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


def build(provider: str, K: int, N: int, device: torch.device, seed: int = 0) -> Layer:
    """One provider's layer for W [N, K] (same seed -> same W for every provider)."""
    import kernels

    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * K**-0.5  # [N, K]
    A = ((torch.rand(R, K, generator=gen) * 2 - 1) * K**-0.5).to(torch.bfloat16).to(device)
    B = (torch.randn(N, R, generator=gen) * 0.01).to(torch.bfloat16).to(device)
    s = ALPHA / R
    if provider in ("ours-triton", "ours-torch"):
        rec = quant4bit_record(_bnb_linear4bit(W, device))
        A, B = A.requires_grad_(), B.requires_grad_()
        backend = provider.split("-")[1]
        fwd = lambda x: kernels.lora_linear(x, rec, None, A, B, s, 0.0, training=True, backend=backend)
        return Layer(fwd, [A, B], packed_bytes(rec))
    if provider == "peft":
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        base = _bnb_linear4bit(W, device)
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0)
        layer = PeftLinear4bit(base, "default", config=cfg, r=R, lora_alpha=ALPHA, lora_dropout=0.0)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        layer.lora_A["default"].to(torch.bfloat16)
        layer.lora_B["default"].to(torch.bfloat16)
        layer.train()
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return Layer(layer, params, packed_bytes(quant4bit_record(base)))
    if provider == "floor":
        Wd = W.to(torch.bfloat16).to(device)  # frozen dense base
        A, B = A.requires_grad_(), B.requires_grad_()
        fwd = lambda x: F.linear(x, Wd) + F.linear(F.linear(x, A), B) * s
        return Layer(fwd, [A, B], Wd.numel() * 2)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def flops(M: int, K: int, N: int, mode: str) -> int:
    """Useful FLOPs: forward 2MNK + 2Mr(K+N); backward adds dx (2MNK) and the LoRA grads 4Mr(K+N)."""
    fwd = 2 * M * N * K + 2 * M * R * (K + N)
    return fwd if mode == "fwd" else fwd + 2 * M * N * K + 4 * M * R * (K + N)
