"""Builders for tests that put the same non-LoRA PEFT method on ours and on peft's model.

`pair(method, arch)` builds both from the same seed, so the same draws give the same weights
(checked by the tests, not assumed), then makes every trainable tensor matter: IA3 scales and
AdaLoRA's A/B/E start random (init_*=False), adaption-prompt gates are set to a non-zero value on
both sides. Trainable parameters are matched by position (each stack registers them in module
order, one per tensor).
"""
from __future__ import annotations

import peft
import torch
import transformers

import lora_core
from adapter_pairs import build
from tiny_models import example_inputs

# method -> (peft config class, our config class, kwargs). task_type is set per architecture.
METHODS = {
    "ia3": (peft.IA3Config, lora_core.IA3Config, dict(init_ia3_weights=False)),
    "adalora": (peft.AdaLoraConfig, lora_core.AdaLoraConfig,
                dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, lora_alpha=16, init_lora_weights=False)),
    "adaption_prompt": (peft.AdaptionPromptConfig, lora_core.AdaptionPromptConfig, dict(adapter_len=3, adapter_layers=2)),
    "prompt_tuning": (peft.PromptTuningConfig, lora_core.PromptTuningConfig, dict(num_virtual_tokens=4)),
}
# (method, arch) pairs the tests cover: Llama for all; GPT-2 / T5 where the method applies and
# where peft supports it (adaption prompts exist for Llama-like models and GPT-2 only).
CASES = [("ia3", "llama"), ("ia3", "gpt2"), ("ia3", "t5"), ("adalora", "llama"), ("adalora", "gpt2"),
         ("adaption_prompt", "llama"), ("adaption_prompt", "gpt2"), ("prompt_tuning", "llama"),
         ("prompt_tuning", "t5")]
GATE = 0.7  # adaption-prompt gates start at 0 (the base model); set non-zero so the prompts matter


def task_type(arch: str) -> str:
    return "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"


def configs(method: str, arch: str, **overrides):
    """(peft config, our config) with the same fields."""
    peft_cls, our_cls, kwargs = METHODS[method]
    kwargs = dict(kwargs, task_type=task_type(arch), **overrides)
    return peft_cls(**kwargs), our_cls(**kwargs)


def pair(method: str, arch: str, seed: int = 1, **overrides):
    """(ours, theirs): the same tiny base, the same method and config, built from the same seed."""
    theirs_cfg, ours_cfg = configs(method, arch, **overrides)
    base_theirs, base_ours = build(arch), build(arch)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base_theirs, theirs_cfg)
    torch.manual_seed(seed)
    ours = lora_core.get_lora_model(base_ours, ours_cfg)
    if method == "adaption_prompt":
        with torch.no_grad():
            for model in (ours, theirs):
                for name, p in model.named_parameters():
                    if name.endswith("adaption_gate"):
                        p.fill_(GATE)
    return ours, theirs


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def inputs(arch: str, seed: int = 1, labels: bool = True) -> dict:
    """A batch (with labels for a loss, or T5's decoder ids without labels)."""
    batch = example_inputs(arch, seed=seed)
    if labels:
        return batch
    if arch == "t5":
        return {"input_ids": batch["input_ids"], "decoder_input_ids": batch["labels"]}
    return {"input_ids": batch["input_ids"]}


def adamw_losses(model, arch: str, steps: int, lr: float = 1e-2, allocate: bool = False) -> list[float]:
    """Loss of each of `steps` AdamW steps on fixed batches (train mode, dropout draws seeded per
    step); `allocate` calls AdaLoRA's update_and_allocate(step) after each step, as peft's docs do."""
    opt = torch.optim.AdamW(trainable(model), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = model(**inputs(arch, seed=step)).loss
        loss.backward()
        opt.step()
        if allocate:
            target = model.base_model if isinstance(model, peft.PeftModel) else model
            target.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def tiny_starcoder(seed: int = 0):
    """A tiny GPTBigCode (StarCoder's architecture: multi-query attention, c_attn as nn.Linear)."""
    config = transformers.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           multi_query=True)
    torch.manual_seed(seed)
    return transformers.GPTBigCodeForCausalLM(config).eval()
