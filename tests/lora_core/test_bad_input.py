"""Bad input: a clear error naming the problem and the fix, and the model left exactly as it was."""
import pytest
import torch
import transformers

from lora_core import LoraConfig, LoraLinear, get_lora_model
from tiny_models import ARCHS


def build(arch: str):
    cfg_cls, kwargs, model_cls = ARCHS[arch]
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == types
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_targets_matching_nothing_lists_available():
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError) as err:
        get_lora_model(model, LoraConfig(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "matched no module" in msg and "['query', 'value']" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg  # the available linear layers, so the user can pick
    assert_unchanged(model, snap)


def test_regex_matching_nothing():
    model = build("gpt2")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="c_attn"):  # lists GPT-2's layers
        get_lora_model(model, LoraConfig(target_modules=r".*\.nothing"))
    assert_unchanged(model, snap)


def test_target_that_is_not_linear():
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not a linear layer"):
        get_lora_model(model, LoraConfig(target_modules=["mlp"]))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("field,value,expect", [
    ("r", 0, "positive integer"), ("r", -4, "positive integer"),
    ("lora_dropout", 1.0, r"\[0, 1\)"), ("lora_dropout", -0.5, r"\[0, 1\)"),
    ("bias", "everything", "unknown bias mode"),
])
def test_bad_fields_at_construction_and_after_edit(field, value, expect):
    with pytest.raises(ValueError, match=f"{field}.*{expect}"):
        LoraConfig(**{field: value})
    # a config edited after construction is re-validated before the model is touched
    model = build("llama")
    snap = snapshot(model)
    cfg = LoraConfig()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"{field}.*{expect}"):
        get_lora_model(model, cfg)
    assert_unchanged(model, snap)


def test_model_that_already_has_lora_layers():
    lora = get_lora_model(build("llama"), LoraConfig())
    inner = lora.base_model
    snap = {k: v.clone() for k, v in inner.state_dict().items()}
    with pytest.raises(ValueError, match="already has LoRA layers.*Fix"):
        get_lora_model(inner, LoraConfig(target_modules=["k_proj"]))
    assert inner.state_dict().keys() == snap.keys()
    assert all(torch.equal(inner.state_dict()[k], v) for k, v in snap.items())
    assert len(lora.lora_layers()) == 4  # still only the first adapter's q/v layers


def test_unknown_kernel_leaves_model_unchanged():
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="backend='bogus'"):
        get_lora_model(model, LoraConfig(), backend="bogus")
    assert_unchanged(model, snap)


def test_unknown_arch_without_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules explicitly"):
        get_lora_model(model, LoraConfig())


def test_disable_adapter_on_merged_model():
    lora = get_lora_model(build("llama"), LoraConfig())
    lora.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with lora.disable_adapter():
            pass
