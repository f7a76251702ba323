"""LoRA+ (Hayou et al. 2024): lora_B learns `loraplus_lr_ratio` times faster than lora_A.

`create_loraplus_optimizer` is peft 0.21's function (name, keywords, parameter groups and their
order), for our LoraModel: every trainable parameter goes to one of four groups

    A              lr,                           weight_decay = loraplus_weight_decay
    embedding      loraplus_lr_embedding (1e-6)   (LoRA on an nn.Embedding base)
    B              lr * loraplus_lr_ratio,       weight_decay = loraplus_weight_decay
    B, no decay    lr * loraplus_lr_ratio,       weight_decay = 0

where "B" is every parameter whose name contains "lora_B" and every 1-D parameter (so lora_B's
bias, DoRA's magnitude, trained biases and norms of modules_to_save), as in peft; "no decay" are
those among them that are biases or sit in a LayerNorm (transformers' rule, which peft uses).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type, *, lr: float, loraplus_lr_ratio: float,
                              **kwargs: Any) -> torch.optim.Optimizer:
    """peft's LoRA+ optimizer over `model`'s trainable parameters (groups in the module docstring).

    kwargs go to `optimizer_cls` (betas, eps, ...; a weight_decay there is overridden by each
    group's, as in peft), except loraplus_weight_decay (default 0.0) and loraplus_lr_embedding
    (default 1e-6), which this function takes. For bitsandbytes' 8-bit Adam variants the
    embeddings' states stay 32-bit, as peft arranges.
    """
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    if not isinstance(loraplus_lr_ratio, (int, float)) or isinstance(loraplus_lr_ratio, bool) \
            or not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio!r}: must be a positive number (peft "
                         f"suggests >= 1: lora_B's learning rate over lora_A's)")
    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    embedding_layers = {name for name, m in model.named_modules()
                        if isinstance(getattr(m, "base_layer", None), nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(name.startswith(layer + ".adapters.") for layer in embedding_layers):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    kwargs["lr"] = lr
    optimizer = optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
