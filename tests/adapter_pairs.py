"""Builders for tests that put the same adapters on ours and on peft's model (several adapters).

Parameter names map one to one (P = module path in the HF model, X = a modules_to_save module):

    ours  base_model.P.adapters.<name>.lora_A.weight      peft  base_model.model.P.lora_A.<name>.weight
    ours  base_model.P.adapters.<name>.lora_B.bias        peft  base_model.model.P.lora_B.<name>.bias
    ours  base_model.P.adapters.<name>.lora_magnitude_vector
                                                          peft  base_model.model.P.lora_magnitude_vector.<name>.weight
    ours  base_model.P.adapters.<name>.lora_embedding_A   peft  base_model.model.P.lora_embedding_A.<name>
    ours  base_model.X.modules_to_save.<name>.k           peft  base_model.model.X.modules_to_save.<name>.k
"""
from __future__ import annotations

import re

import peft
import torch
import transformers

import lora_core
from tiny_models import ARCHS

B_SCALE = 0.3  # init_lora_weights=False draws B ~ U(+-1/sqrt(r)): scaled to a trained adapter's size


def build(arch: str, seed: int = 0):
    """A tiny model straight from its config (fp32), the same weights for the same seed."""
    cfg_cls, kwargs, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()


def no_cpu_repack(model):
    """bitsandbytes' eval-mode CPU path repacks 4-bit weights in place and computes in bf16; peft's
    layers call it, ours never do. Switched off so both stacks dequantize exactly."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def peft_name(ours: str) -> str:
    """Our parameter name -> peft's for the same tensor (see the module docstring)."""
    name = "base_model.model." + ours[len("base_model."):]
    name = re.sub(r"\.adapters\.([^.]+)\.lora_magnitude_vector$", r".lora_magnitude_vector.\1.weight", name)
    name = re.sub(r"\.adapters\.([^.]+)\.(lora_embedding_[AB])$", r".\2.\1", name)
    return re.sub(r"\.adapters\.([^.]+)\.(lora_[AB])\.", r".\2.\1.", name)


def pair(base_ours, base_peft, adapters: dict[str, dict]):
    """ours and peft's model with the same named adapters ({name: LoraConfig kwargs}, the first one
    created by get_*_model, the others by add_adapter) and identical non-zero weights: peft's random
    init (init_lora_weights=False), B scaled by B_SCALE, copied into ours by name."""
    items = list(adapters.items())
    first, cfg = items[0]
    ours = lora_core.get_lora_model(base_ours, lora_core.LoraConfig(init_lora_weights=False, **cfg),
                                    adapter_name=first)
    theirs = peft.get_peft_model(no_cpu_repack(base_peft), peft.LoraConfig(init_lora_weights=False, **cfg),
                                 adapter_name=first)
    for name, cfg in items[1:]:
        ours.add_adapter(name, lora_core.LoraConfig(init_lora_weights=False, **cfg))
        theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **cfg))
    copy_weights(ours, theirs)
    return ours, theirs


@torch.no_grad()
def copy_weights(ours, theirs) -> dict[str, str]:
    """peft's adapter tensors -> ours (B and modules_to_save copies perturbed first so every tensor
    matters); returns {our name: peft name}."""
    mine = dict(ours.named_parameters())
    ref = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(0)
    key_map = {}
    for name, p in mine.items():
        if ".adapters." not in name and ".modules_to_save." not in name:
            continue
        other = ref[peft_name(name)]
        if ".lora_B." in name:
            other.mul_(B_SCALE)
        elif ".modules_to_save." in name:
            other.add_(0.05 * torch.randn(other.shape, generator=g))
        p.copy_(other)
        key_map[name] = peft_name(name)
    return key_map


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
