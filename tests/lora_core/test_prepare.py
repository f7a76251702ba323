"""prepare_model_for_kbit_training on nf4 and int8 tiny models: frozen base, fp32 small params and
logits, and training through gradient checkpointing reaches every LoRA weight."""
import pytest
import torch

from lora_core import LoraConfig, get_lora_model, prepare_model_for_kbit_training
from tiny_models import example_inputs, load_tiny, save_tiny


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("prep"))


@pytest.mark.parametrize("quantization,dtype", [("nf4", torch.bfloat16), ("int8", torch.float32),
                                                ("none", torch.bfloat16)])
@pytest.mark.parametrize("reentrant", [True, False])
def test_prepare_then_train_with_checkpointing(llama_dir, quantization, dtype, reentrant):
    model = load_tiny(llama_dir, "llama", quantization, dtype)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert not any(p.requires_grad for p in model.parameters())
    for name, p in model.named_parameters():
        if p.dtype not in (torch.uint8, torch.int8):  # all but the quantized storage upcast
            assert p.dtype == torch.float32, name
    assert model.is_gradient_checkpointing

    lora = get_lora_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    lora.train()
    out = lora(**example_inputs("llama"))
    assert out.logits.dtype == torch.float32  # the fp32 head hook
    out.loss.backward()
    for name, layer in lora.lora_layers().items():
        # B starts at zero, so A's gradient is zero at step 0; B's must be non-zero everywhere
        g = layer.lora_B["default"].weight.grad
        assert g is not None and g.abs().sum() > 0, name
        assert layer.lora_A["default"].weight.grad is not None, name


def test_checkpoint_recompute_sees_the_same_dropout(llama_dir):
    """The dropout seed is drawn from torch's RNG, which checkpointing restores before recomputing:
    gradients with and without checkpointing are the same (fp32, same ops: float rounding only)."""
    grads = []
    for checkpointing in (False, True):
        model = load_tiny(llama_dir, "llama")
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = get_lora_model(model, LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
        lora.train()
        torch.manual_seed(11)
        with torch.no_grad():
            for layer in lora.lora_layers().values():
                layer.lora_A["default"].weight.normal_(std=0.1)
                layer.lora_B["default"].weight.normal_(std=0.1)
        torch.manual_seed(5)
        lora(**example_inputs("llama")).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in lora.named_parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_dtypes_and_flags_match_peft(llama_dir):
    from peft import prepare_model_for_kbit_training as peft_prepare
    ours = prepare_model_for_kbit_training(load_tiny(llama_dir, "llama", "nf4", torch.bfloat16))
    theirs = peft_prepare(load_tiny(llama_dir, "llama", "nf4", torch.bfloat16))
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing
