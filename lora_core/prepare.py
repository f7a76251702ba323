"""prepare_model_for_kbit_training: the QLoRA recipe's preparation of a (quantized) base model.

What it does (the facts follow peft 0.21's function of the same name):
- freezes every parameter;
- casts every fp16/bf16 parameter that is not bitsandbytes-quantized storage (norms, biases,
  embeddings, the output head) to fp32. Casting only the 1-D ones is not enough without autocast:
  an fp32 norm output would then meet a bf16 nn.Linear and fail on the dtype mismatch;
- enables input gradients and gradient checkpointing when asked, so checkpointed blocks whose
  frozen inputs need no grad still backpropagate into the LoRA weights;
- makes the output logits fp32 (a forward hook on the output head casts its output; with the head
  upcast above this is a no-op, and it keeps the guarantee if the head stays in half precision).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import quant


def _fp32_output_hook(module, args, output):
    return output.float() if torch.is_tensor(output) else output


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """Prepare a Hugging Face model (quantized or not) for LoRA training, in place; returns it.

    Call it on the base model before `get_lora_model`. gradient_checkpointing_kwargs go to
    `model.gradient_checkpointing_enable` (e.g. {"use_reentrant": False}).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if quant.is_quantized(module) and name == "weight":
                continue  # packed 4-bit / int8 storage is not a float tensor to upcast
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        # With reentrant checkpointing a block whose inputs need no grad gets no backward at all;
        # making the embedding output require grad fixes that (non-reentrant does not need it).
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_lorafuse_fp32_hook", False):
        head.register_forward_hook(_fp32_output_hook)
        head._lorafuse_fp32_hook = True
    return model
