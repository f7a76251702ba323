"""Injection: which modules get LoRA (peft's matching rules, checked against peft), freezing, bias,
modules_to_save, fan_in_fan_out, rank/alpha patterns."""
import peft
import pytest
import torch
import transformers
from torch import nn

from lora_core import LoraConfig, LoraLinear, ModulesToSave, find_targets, get_lora_model
from tiny_models import ARCHS


def build(arch: str) -> nn.Module:
    """A tiny model straight from its config (fp32, no files: matching does not need weights)."""
    cfg_cls, kwargs, model_cls = ARCHS[arch]
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()


def peft_targets(arch: str, **kwargs) -> set[str]:
    """Module paths peft wraps with LoRA for the same config."""
    model = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


CASES = [
    ("llama", dict()),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=0)),
    ("llama", dict(target_modules=r".*\.0\.self_attn\.(q|o)_proj")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\..*")),
    ("gpt2", dict()),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[0])),
    ("bloom", dict()),
    ("bloom", dict(target_modules="all-linear")),
    ("t5", dict()),
    ("t5", dict(target_modules="all-linear")),
    ("t5", dict(target_modules=["q", "k", "wo"])),
]


@pytest.mark.parametrize("arch,kwargs", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_targets_equal_peft(arch, kwargs):
    ours = find_targets(build(arch), LoraConfig(**kwargs))
    assert set(ours) == peft_targets(arch, **kwargs)


def test_find_targets_does_not_modify():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = find_targets(model, LoraConfig(target_modules="all-linear"))
    assert len(names) == 14 and "lm_head" not in names  # 2 layers x 7 linears, head excluded
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_swap_freezes_base_and_trains_lora():
    model = get_lora_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = model.lora_layers()
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.{n}.adapters.default.lora_{ab}.weight" for n in layers for ab in "AB"}


def test_inference_mode_trains_nothing():
    model = get_lora_model(build("llama"), LoraConfig(inference_mode=True))
    assert model.trainable_parameters()[0] == 0


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_match_peft(bias):
    ours = get_lora_model(build("gpt2"), LoraConfig(bias=bias, target_modules=["c_attn"]))
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(bias=bias, target_modules=["c_attn"]))
    ours_t = {n[len("base_model."):] for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    theirs_t = {n[len("base_model.model."):] for n, p in theirs.named_parameters()
                if p.requires_grad and "lora_" not in n}
    assert ours_t == theirs_t and ours_t  # same base biases made trainable (and some are)
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_modules_to_save_wrapper():
    model = get_lora_model(build("llama"), LoraConfig(modules_to_save=["lm_head"]))
    head = model.base_model.lm_head
    assert isinstance(head, ModulesToSave)
    assert head.trainable_module.weight.requires_grad and not head.original_module.weight.requires_grad
    assert head.trainable_module.weight.data_ptr() != head.original_module.weight.data_ptr()
    assert head.weight is head.trainable_module.weight  # attribute reads reach the active copy


def test_conv1d_gets_fan_in_fan_out_with_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        model = get_lora_model(build("gpt2"), LoraConfig())
    assert all(layer.fan_in_fan_out for layer in model.lora_layers().values())
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        model = get_lora_model(build("llama"), LoraConfig(fan_in_fan_out=True))
    assert not any(layer.fan_in_fan_out for layer in model.lora_layers().values())


def test_rank_and_alpha_patterns_match_peft():
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                  rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"q_proj": 3})
    ours = get_lora_model(build("llama"), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(**kwargs))
    for name, layer in ours.lora_layers().items():
        ref = theirs.base_model.model.get_submodule(name)
        assert (layer.r, layer.scaling) == (ref.r, ref.scaling), name


def test_default_targets_recorded_in_config():
    model = get_lora_model(build("bloom"), LoraConfig())
    assert model.lora_config.target_modules == {"query_key_value"}
