"""LoRA+ (create_loraplus_optimizer) against peft's: the same parameter groups with the same learning
rates and weight decays, and the same AdamW trajectory (fp32: 1e-6 relative on the loss, the same
updates on the same numbers; measured < 1e-7)."""
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import lora_core
from adapter_pairs import build, peft_name
from tiny_models import example_inputs
from variant_pairs import one_thread, perturb_and_copy  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # LAPACK on tiny matrices: see variant_pairs

CONFIGS = {
    # lora_B.bias (1-D, "bias" in its name: B without decay), a LayerNorm copy (no decay), GPT-2 biases
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc"], lora_bias=True, init_lora_weights=False,
                          modules_to_save=["ln_f"], bias="lora_only")),
    # DoRA's magnitude (1-D, with decay) and a 2-D module to save (group A)
    "llama": ("llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True, modules_to_save=["lm_head"])),
    # LoRA on the embedding: its own group at loraplus_lr_embedding
    "embedding": ("llama", dict(target_modules=["q_proj", "embed_tokens"])),
}


def _pair(arch, cfg):
    torch.manual_seed(0)
    ours = lora_core.get_lora_model(build(arch), lora_core.LoraConfig(r=8, lora_alpha=16, **cfg))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build(arch), peft.LoraConfig(r=8, lora_alpha=16, **cfg))
    perturb_and_copy(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("case", list(CONFIGS))
def test_loraplus_equals_peft(case):
    arch, cfg = CONFIGS[case]
    ours, theirs = _pair(arch, cfg)
    kw = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, betas=(0.9, 0.99))
    opt_o = lora_core.create_loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    opt_p = peft_loraplus(theirs, torch.optim.AdamW, **kw)
    names_o = {id(p): peft_name(n) for n, p in ours.named_parameters()}
    names_p = {id(p): n for n, p in theirs.named_parameters()}
    assert len(opt_o.param_groups) == len(opt_p.param_groups) == 4
    for go, gp in zip(opt_o.param_groups, opt_p.param_groups):
        assert (go["lr"], go["weight_decay"], go["betas"]) == (gp["lr"], gp["weight_decay"], gp["betas"])
        assert sorted(names_o[id(p)] for p in go["params"]) == sorted(names_p[id(p)] for p in gp["params"])
    assert any(len(g["params"]) for g in opt_o.param_groups[2:])  # B groups are not empty
    assert bool(opt_o.param_groups[1]["params"]) == (case == "embedding")

    losses = {}
    for side, model, opt in (("ours", ours, opt_o), ("peft", theirs, opt_p)):
        model.eval()  # GPT-2's own dropout off; gradients still flow
        seq = []
        for i in range(3):
            opt.zero_grad(set_to_none=True)
            loss = model(**example_inputs(arch, seed=30 + i)).loss
            loss.backward()
            opt.step()
            seq.append(loss.item())
        losses[side] = seq
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(losses["ours"], losses["peft"])), losses


def test_loraplus_ratio_must_be_positive():
    model = lora_core.get_lora_model(build("llama"), lora_core.LoraConfig())
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        lora_core.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
