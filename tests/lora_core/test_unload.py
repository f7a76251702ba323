"""unload(), get_base_model(), enable_adapter_layers() / disable_adapter_layers() (issue 14).

unload() must give the base model's outputs exactly (bit for bit): it puts the very base layers
back, untouched, and bitsandbytes' own CPU setting with them (on nf4 a fresh base runs
bitsandbytes' eval-mode path; the unloaded one must too).
"""
from __future__ import annotations

import peft
import pytest
import torch

from adapter_pairs import build, pair
from lora_core import LoraConfig, LoraLinear, ModulesToSave, get_lora_model
from tiny_models import example_inputs, load_tiny, save_tiny


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unload")
    return {arch: save_tiny(arch, root / arch) for arch in ("llama", "gpt2", "t5")}


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("arch,quant", [("llama", "none"), ("gpt2", "none"), ("t5", "none"), ("llama", "nf4")])
def test_unload_gives_the_base_outputs_exactly(dirs, arch, quant):
    batch = example_inputs(arch)
    with torch.no_grad():
        expected = load_tiny(dirs[arch], arch, quant)(**batch).logits  # a fresh base, as bnb runs it
    base = load_tiny(dirs[arch], arch, quant)
    model = get_lora_model(base, LoraConfig(target_modules="all-linear", r=4))
    _perturb(model)
    with torch.no_grad():
        adapted = model(**batch).logits
        assert (adapted.float() - expected.float()).abs().max() > 1e-2  # the adapter mattered
        plain = model.unload()
        assert plain is base and model.get_base_model() is base
        assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in plain.modules())
        assert torch.equal(plain(**batch).logits, expected)


def test_unload_refused_while_merged(dirs):
    model = get_lora_model(load_tiny(dirs["llama"], "llama"), LoraConfig(r=4))
    _perturb(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge_adapter\(\).*merge_and_unload"):
        model.unload()
    assert model.lora_layers()  # nothing removed


def test_unload_keeps_the_trained_head_as_peft():
    """modules_to_save: peft's unload keeps the active adapter's trained copy; so do we."""
    ours, theirs = pair(build("llama"), build("llama"), {"default": dict(target_modules=["q_proj"],
                                                                         modules_to_save=["lm_head"])})
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    with torch.no_grad():
        assert torch.equal(ours.unload()(**batch).logits, theirs.unload()(**batch).logits)


def test_disable_and_enable_adapter_layers_equal_peft():
    ours, theirs = pair(build("llama"), build("llama"), {"default": dict(target_modules="all-linear",
                                                                         modules_to_save=["lm_head"])})
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    with torch.no_grad():
        base = build("llama")(**batch).logits
        adapted = ours(**batch).logits
        ours.disable_adapter_layers()
        theirs.base_model.disable_adapter_layers()
        assert torch.equal(ours(**batch).logits, base)
        assert torch.equal(theirs(**batch).logits, base)
        assert ours.get_model_status().enabled is False
        ours.enable_adapter_layers()
        theirs.base_model.enable_adapter_layers()
        assert torch.equal(ours(**batch).logits, adapted)
        assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
        assert ours.get_model_status().enabled is True


def test_get_base_model_is_the_wrapped_model_as_peft():
    ours, theirs = pair(build("llama"), build("llama"), {"default": dict(target_modules=["q_proj"])})
    mine, ref = ours.get_base_model(), theirs.get_base_model()
    assert type(mine) is type(ref)  # the transformers model, adapter layers inside (peft's meaning)
    assert isinstance(mine.model.layers[0].self_attn.q_proj, LoraLinear)
    assert isinstance(ref.model.layers[0].self_attn.q_proj, peft.tuners.lora.Linear)
