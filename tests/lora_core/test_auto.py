"""AutoLoraModel* (issue 14): an adapter folder alone opens the base its config names, equal to
loading by hand; `auto_mapping` as peft writes it; our task_type=None adapter opens in peft's
AutoPeftModel. fp32 unless stated: both routes run the same code on the same weights, so logits
are compared exactly.
"""
from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

import lora_core
from lora_core import (AutoLoraModel, AutoLoraModelForCausalLM, AutoLoraModelForSeq2SeqLM,
                       AutoLoraModelForSequenceClassification, LoraConfig, LoraModel, get_lora_model)
from task_models import save_task_model, task_inputs
from tiny_models import example_inputs, load_tiny, save_tiny


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama") / "base")


def _adapter(base_dir, out, arch="llama", **cfg):
    model = get_lora_model(load_tiny(base_dir, arch), LoraConfig(target_modules="all-linear", r=4, **cfg))
    _perturb(model)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("task,auto", [("CAUSAL_LM", AutoLoraModelForCausalLM), (None, AutoLoraModel),
                                       ("CAUSAL_LM", AutoLoraModel)])
def test_auto_equals_loading_by_hand(llama, tmp_path, task, auto):
    adapter = _adapter(llama, tmp_path / "a", task_type=task)
    by_auto = auto.from_pretrained(adapter)
    by_hand = LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama), adapter)
    assert isinstance(by_auto, LoraModel) and type(by_auto.base_model) is transformers.LlamaForCausalLM
    batch = example_inputs("llama")
    with torch.no_grad():
        a, b = by_auto(**batch).logits, by_hand(**batch).logits
        base = load_tiny(llama, "llama")(**batch).logits
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-2  # the adapter was loaded


def test_base_kwargs_reach_the_base(llama, tmp_path):
    adapter = _adapter(llama, tmp_path / "a", task_type="CAUSAL_LM")
    model = AutoLoraModelForCausalLM.from_pretrained(adapter, dtype=torch.bfloat16, is_trainable=True)
    assert model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert any(p.requires_grad for p in model.parameters())
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # as load_tiny's nf4
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    by_auto = AutoLoraModelForCausalLM.from_pretrained(adapter, quantization_config=bnb, dtype=torch.float32)
    layer = by_auto.base_model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"
    by_hand = LoraModel.from_pretrained(load_tiny(llama, "llama", "nf4"), adapter)
    batch = example_inputs("llama")
    with torch.no_grad():  # the same quantized weights and code on both routes: exact
        assert torch.equal(by_auto(**batch).logits, by_hand(**batch).logits)


def test_seq_cls_and_seq2seq(tmp_path):
    base_dir = save_task_model("llama", "SEQ_CLS", tmp_path / "cls")
    model = get_lora_model(transformers.AutoModelForSequenceClassification.from_pretrained(base_dir),
                           LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], r=4))
    _perturb(model)
    model.save_pretrained(tmp_path / "a")
    by_auto = AutoLoraModelForSequenceClassification.from_pretrained(tmp_path / "a")
    by_hand = LoraModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(base_dir),
                                        tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(by_auto(**task_inputs()).logits, by_hand(**task_inputs()).logits)

    t5 = save_tiny("t5", tmp_path / "t5")
    _adapter(t5, tmp_path / "t5a", arch="t5", task_type="SEQ_2_SEQ_LM")
    opened = AutoLoraModelForSeq2SeqLM.from_pretrained(tmp_path / "t5a")
    assert type(opened.base_model) is transformers.T5ForConditionalGeneration


def test_auto_mapping_as_peft_writes_it(llama, tmp_path):
    _adapter(llama, tmp_path / "ours")
    theirs = peft.get_peft_model(load_tiny(llama, "llama"), peft.LoraConfig(target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert mine["auto_mapping"] == ref["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"}
    _adapter(llama, tmp_path / "typed", task_type="CAUSAL_LM")
    typed = json.loads((tmp_path / "typed" / "adapter_config.json").read_text())
    assert typed["auto_mapping"] is None  # as peft: a task type names the class already


def test_our_untyped_adapter_opens_in_peft_autopeft(llama, tmp_path):
    adapter = _adapter(llama, tmp_path / "a")
    theirs = peft.AutoPeftModel.from_pretrained(str(adapter))
    ours = AutoLoraModel.from_pretrained(adapter)
    batch = example_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def test_refusals_before_the_base_loads(llama, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(a)))
    cls_adapter = tmp_path / "cls"
    cls_adapter.mkdir()
    (cls_adapter / "adapter_config.json").write_text(json.dumps(
        LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], base_model_name_or_path=str(llama)).to_dict()))
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS'.*AutoLoraModelForSequenceClassification"):
        AutoLoraModelForCausalLM.from_pretrained(cls_adapter)

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict()))
    with pytest.raises(ValueError, match="neither a task_type nor an auto_mapping"):
        AutoLoraModel.from_pretrained(bare)
    with pytest.raises(ValueError, match="does not name its base model"):
        AutoLoraModelForCausalLM.from_pretrained(bare)

    evil = LoraConfig(target_modules=["q_proj"], base_model_name_or_path=str(llama)).to_dict()
    evil["auto_mapping"] = {"base_model_class": "system", "parent_library": "os"}
    (bare / "adapter_config.json").write_text(json.dumps(evil))
    with pytest.raises(ValueError, match=r"only classes from \['transformers'\]"):
        AutoLoraModel.from_pretrained(bare)
    assert calls == []
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoLoraModel()


def test_exported_from_the_top_level():
    for name in ("AutoLoraModel", "AutoLoraModelForCausalLM", "AutoLoraModelForSeq2SeqLM",
                 "AutoLoraModelForSequenceClassification"):
        assert name in lora_core.__all__ and hasattr(lora_core, name)


def test_grown_vocabulary_from_the_adapter_tokenizer(llama, tmp_path):
    """peft's rule: a tokenizer beside the adapter with more tokens than the base's embedding rows
    grows the base before the adapter loads (here the adapter saved both grown embeddings)."""
    from train.models import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens([f"<extra{i}>" for i in range(40)])  # 101 + 40 = 141 > 128 rows
    base = load_tiny(llama, "llama")
    base.resize_token_embeddings(len(tokenizer))
    model = get_lora_model(base, LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    _perturb(model)
    model.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "a")
    opened = AutoLoraModelForCausalLM.from_pretrained(tmp_path / "a")
    assert opened.base_model.get_input_embeddings().weight.shape[0] == 141
    by_hand_base = load_tiny(llama, "llama")
    by_hand_base.resize_token_embeddings(141)
    by_hand = LoraModel.from_pretrained(by_hand_base, tmp_path / "a")
    ids = torch.tensor([[130, 5, 140, 7]])
    with torch.no_grad():
        assert torch.equal(opened(input_ids=ids).logits, by_hand(input_ids=ids).logits)
