"""LoraModel: parameter counts (peft's numbers and text), forwarding to the HF model,
disable_adapter, set_backend (and the deprecated kernel names), state_dict layout, merge_and_unload's result type."""
import contextlib
import io as stdio

import peft
import pytest
import torch
import transformers
from torch import nn

from lora_core import LoraConfig, LoraLinear, LoraModel, ModulesToSave, get_lora_model
from tiny_models import ARCHS, example_inputs, load_tiny, save_tiny


def build(arch: str) -> nn.Module:
    cfg_cls, kwargs, model_cls = ARCHS[arch]
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def printed(model) -> str:
    buf = stdio.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue()


def test_readme_example_gpt2_124m():
    # The full-size GPT-2 config (124M parameters) built locally, nothing downloaded.
    torch.manual_seed(0)
    model = get_lora_model(transformers.GPT2LMHeadModel(transformers.GPT2Config()), LoraConfig())
    assert printed(model) == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"
    assert model.trainable_parameters() == (294_912, 124_734_720)


COUNT_CASES = [
    ("llama", dict()),
    ("llama", dict(r=16, target_modules="all-linear", modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="all")),
    ("bloom", dict(r=2, bias="lora_only")),
    ("t5", dict(target_modules="all-linear", rank_pattern={"wo": 2})),
]


@pytest.mark.parametrize("arch,kwargs", COUNT_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(COUNT_CASES)])
def test_counts_equal_peft(arch, kwargs):
    ours = get_lora_model(build(arch), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()
    buf = stdio.StringIO()
    with contextlib.redirect_stdout(buf):
        theirs.print_trainable_parameters()
    assert printed(ours) == buf.getvalue()


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_counts_equal_peft_quantized(llama_dir, quantization):
    # peft counts a Params4bit element as 2 parameters (two 4-bit values per uint8 byte)
    cfg = dict(r=4, target_modules="all-linear")
    ours = get_lora_model(load_tiny(llama_dir, "llama", quantization), LoraConfig(**cfg))
    theirs = peft.get_peft_model(load_tiny(llama_dir, "llama", quantization), peft.LoraConfig(**cfg))
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_forwards_calls_and_attributes():
    base = build("llama")
    model = get_lora_model(base, LoraConfig(r=4, init_lora_weights=False))
    batch = example_inputs("llama")
    out = model(**batch)
    assert out.loss.ndim == 0 and out.logits.shape == (2, 8, 128)
    assert model.config is base.config
    ids = model.generate(batch["input_ids"][:1, :3], max_new_tokens=2, do_sample=False)
    assert ids.shape == (1, 5)
    model.gradient_checkpointing_enable()
    assert base.is_gradient_checkpointing


def test_state_dict_and_lora_layers_layout():
    model = get_lora_model(build("llama"), LoraConfig(r=4))
    keys = set(model.state_dict())
    assert "base_model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight" in keys
    assert "base_model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert set(model.lora_layers()) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"}
    assert model.lora_config.target_modules == {"q_proj", "v_proj"}


def test_disable_adapter_gives_base_output_and_restores():
    base_ref = build("llama")
    base = build("llama")
    base.load_state_dict(base_ref.state_dict())
    model = get_lora_model(base, LoraConfig(r=4, init_lora_weights=False, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.lm_head.trainable_module.weight.add_(1.0)  # the trained copy differs
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    with torch.no_grad():
        ref = base_ref(**batch).logits
        lora_out = model(**batch).logits
        with model.disable_adapter():
            off = model(**batch).logits
        again = model(**batch).logits
        with pytest.raises(KeyError):
            with model.disable_adapter():
                raise KeyError("boom")
        after_error = model(**batch).logits
    # same fp32 ops on the same weights (the kernel's base-only path is F.linear): exact
    torch.testing.assert_close(off, ref, rtol=0, atol=0)
    assert (lora_out - ref).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(again, lora_out, rtol=0, atol=0)
    torch.testing.assert_close(after_error, lora_out, rtol=0, atol=0)
    assert not any(m.disabled for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave)))


def test_set_backend_reaches_every_layer():
    model = get_lora_model(build("t5"), LoraConfig(target_modules="all-linear"))
    model.set_backend("torch")
    assert {layer.backend for layer in model.lora_layers().values()} == {"torch"}
    with pytest.raises(ValueError, match="bogus"):
        model.set_backend("bogus")
    assert {layer.backend for layer in model.lora_layers().values()} == {"torch"}  # unchanged


def test_backend_and_lora_dtype_options():
    model = get_lora_model(build("llama"), LoraConfig(), lora_dtype=torch.bfloat16, backend="torch")
    layer = next(iter(model.lora_layers().values()))
    assert layer.backend == "torch" and layer.lora_A["default"].weight.dtype == torch.bfloat16
    # layers a later adapter adds take the model's backend too
    model.add_adapter("other", LoraConfig(target_modules=["o_proj"]))
    assert {m.backend for m in model.lora_layers().values()} == {"torch"}


def test_kernel_is_a_deprecated_name_of_backend():
    """`kernel=` / `set_kernel` / `.kernel` (the knob's old name) still work, each with a FutureWarning."""
    with pytest.warns(FutureWarning, match="kernel=.*deprecated.*backend="):
        model = get_lora_model(build("llama"), LoraConfig(), kernel="torch")
    assert {m.backend for m in model.lora_layers().values()} == {"torch"}
    with pytest.warns(FutureWarning, match="set_kernel is deprecated"):
        model.set_kernel("auto")
    layer = next(iter(model.lora_layers().values()))
    assert layer.backend == "auto"
    with pytest.warns(FutureWarning, match="use .backend"):
        assert layer.kernel == "auto"
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="backend='bogus'"):
        layer.kernel = "bogus"
    with pytest.warns(FutureWarning, match="LoraLinear\\(kernel=...\\) is deprecated"):
        assert LoraLinear(nn.Linear(4, 3), kernel="torch").backend == "torch"


def test_merge_and_unload_returns_plain_model():
    model = get_lora_model(build("llama"), LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    hf = model.merge_and_unload()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in hf.modules())
    assert isinstance(hf.model.layers[0].self_attn.q_proj, nn.Linear)


def test_wrapping_a_lora_model_is_refused():
    model = get_lora_model(build("llama"), LoraConfig())
    with pytest.raises(ValueError, match="already"):
        LoraModel(model, LoraConfig())
