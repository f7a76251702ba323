"""Builders for the LoRA-variant tests: the same variant config on ours and on peft's tiny model.

Both sides are built from the same seed, so random inits draw the same numbers and data-dependent
inits read the same base. Tensors are compared under our names (`adapter_pairs.peft_name` maps).
"""
from __future__ import annotations

import peft
import pytest
import torch

import lora_core
from adapter_pairs import no_cpu_repack, peft_name
from tiny_models import load_tiny

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # attention and MLP, square and not


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one intra-op thread: LAPACK's SVD / QR of these tiny matrices took ~90 ms with
    2 threads on the shared 2-core machine (thread contention) and ~3 ms with one. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pair(path, arch: str, quantization: str, dtype: torch.dtype, seed: int = 0, **cfg):
    """(ours, peft's) on two loads of the checkpoint at `path`, each built after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    ours = lora_core.get_lora_model(load_tiny(path, arch, quantization, dtype), lora_core.LoraConfig(**cfg))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(no_cpu_repack(load_tiny(path, arch, quantization, dtype)), peft.LoraConfig(**cfg))
    return ours, theirs


def adapter_tensors(ours, theirs, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our name: (our tensor, peft's tensor)} for every parameter of `adapter` (A, B, lora_B.bias,
    DoRA's magnitude)."""
    ref = dict(theirs.named_parameters())
    return {n: (p, ref[peft_name(n)]) for n, p in ours.named_parameters() if f".adapters.{adapter}." in n}


def base_weights(ours, theirs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer path: (our W, peft's W)} as fp32 [N, K] for every LoRA layer's base."""
    from lora_core import quant
    theirs_layers = dict(theirs.base_model.model.named_modules())
    return {p: (quant.dequantize_base(m.base_layer), quant.dequantize_base(theirs_layers[p].get_base_layer()))
            for p, m in ours.lora_layers().items()}


def max_rel(pairs: dict) -> float:
    """max over pairs of max|a - b| / max|b|."""
    return max(((a.detach().float() - b.detach().float()).abs().max()
                / b.detach().float().abs().max().clamp_min(1e-12)).item() for a, b in pairs.values())


@torch.no_grad()
def perturb_and_copy(ours, theirs, seed: int = 3) -> None:
    """Move every adapter tensor of peft's model away from its init (B, biases and magnitudes get
    noise, so each matters to the output), then copy all of them into ours."""
    g = torch.Generator().manual_seed(seed)
    for name, (mine, other) in adapter_tensors(ours, theirs).items():
        noise = torch.randn(other.shape, generator=g).to(other.dtype)
        if "lora_magnitude_vector" in name:
            other.mul_(1 + 0.1 * noise)
        elif ".lora_B." in name:
            other.add_(0.05 * noise)
        mine.copy_(other)


def logits_and_backward(model, batch, train: bool = True) -> torch.Tensor:
    """One forward + backward (gradients left on the parameters); returns the logits. train=False
    runs in eval mode (for models whose own dropout would differ between the two sides)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach().float()


def losses(model, batches, lr: float = 1e-2) -> list[float]:
    """The loss before each of len(batches) AdamW steps on the trainable parameters (AdamW updates
    each parameter on its own, so the order of the list does not matter)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out
