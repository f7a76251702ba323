"""DoRA beyond the per-variant comparison (test_variants.py): int8 and Conv1D bases, dropout, merge
and unmerge, several adapters, mixed batches, and the triton backend's refusal.

fp32 tolerances: 1e-5 relative (the same ops; only summation order differs) unless said otherwise.
"""
import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

import lora_core
from adapter_pairs import build
from tiny_models import example_inputs, load_tiny, save_tiny
from variant_pairs import (adapter_tensors, logits_and_backward, max_rel, one_thread,  # noqa: F401
                           pair, perturb_and_copy)

pytestmark = pytest.mark.usefixtures("one_thread")  # LAPACK on tiny matrices: see variant_pairs

TOL = 1e-5


def grad_diff(ours, theirs) -> float:
    return max(((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item()
               for a, b in adapter_tensors(ours, theirs).values())


def test_dora_on_int8_equals_peft_on_its_weights(tmp_path):
    """peft's DoRA cannot run on an int8 base on CPU (dequantizing moves the weight and drops its
    SCB), so peft runs on a dense copy holding bitsandbytes' dequantized int8 weights, the W our
    int8 path multiplies by: the same math, fp32 (all linear layers adapted, so no bitsandbytes
    int8 matmul runs on our side)."""
    path = save_tiny("llama", tmp_path / "llama")
    cfg = dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True)
    int8 = load_tiny(path, "llama", "int8")
    dense = load_tiny(path, "llama")
    with torch.no_grad():
        for name, m in int8.named_modules():
            if isinstance(m, bnb.nn.Linear8bitLt):
                W = bnb.functional.int8_vectorwise_dequant(m.weight.data, m.weight.SCB)  # [N, K] fp32
                dense.get_submodule(name).weight.copy_(W)
    torch.manual_seed(0)
    ours = lora_core.get_lora_model(int8, lora_core.LoraConfig(**cfg))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(dense, peft.LoraConfig(**cfg))
    assert max_rel(adapter_tensors(ours, theirs)) <= TOL  # magnitudes: ||W + s B A|| of the same W
    perturb_and_copy(ours, theirs)
    batch = example_inputs("llama")
    assert max_rel({"logits": (logits_and_backward(ours, batch), logits_and_backward(theirs, batch))}) <= TOL
    assert grad_diff(ours, theirs) <= TOL


def test_dora_on_gpt2_conv1d_equals_peft():
    """GPT-2 stores W as [in, out] (Conv1D): the norm is per output row of W^T."""
    cfg = dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], use_dora=True)
    torch.manual_seed(0)
    ours = lora_core.get_lora_model(build("gpt2"), lora_core.LoraConfig(**cfg))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(**cfg))
    assert max_rel(adapter_tensors(ours, theirs)) <= TOL
    perturb_and_copy(ours, theirs)
    batch = example_inputs("gpt2")  # eval mode: GPT-2's own dropout off (gradients still flow)
    assert max_rel({"logits": (logits_and_backward(ours, batch, train=False),
                               logits_and_backward(theirs, batch, train=False))}) <= TOL
    assert grad_diff(ours, theirs) <= TOL


def test_dora_dropout_draws_peft_s_mask():
    """With dropout, DoRA recomputes the base term on the dropped input (peft's rule) and draws the
    mask with nn.Dropout from torch's generator: the same seed gives peft's output and gradients."""
    base = nn.Sequential(nn.Linear(64, 32))
    cfg = dict(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.5)
    ours = lora_core.get_lora_model(copy.deepcopy(base), lora_core.LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    perturb_and_copy(ours, theirs)
    x = torch.randn(5, 64)
    outs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        y = model(x)
        y.square().sum().backward()
        outs.append(y)
    assert max_rel({"y": (outs[0], outs[1])}) <= TOL
    assert grad_diff(ours, theirs) <= TOL


def _dora_pair(tmp_path, **extra):
    ours, theirs = pair(save_tiny("llama", tmp_path / "llama"), "llama", "none", torch.float32, r=8, lora_alpha=16,
                        target_modules=["q_proj", "down_proj"], use_dora=True, **extra)
    perturb_and_copy(ours, theirs)
    return ours, theirs


def test_dora_merge_equals_peft_and_unmerge_restores(tmp_path):
    ours, theirs = _dora_pair(tmp_path)
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    ours.eval()
    with torch.no_grad():
        before = ours(**batch).logits
        w0 = {p: m.base_layer.weight.clone() for p, m in ours.lora_layers().items()}
        ours.merge_adapter()
        merged = ours(**batch).logits
        theirs.merge_adapter()
        peft_layers = dict(theirs.base_model.model.named_modules())
        for p, m in ours.lora_layers().items():  # f * (W + s B A): peft's merged weight
            assert max_rel({p: (m.base_layer.weight, peft_layers[p].get_base_layer().weight)}) <= 1e-6
        assert max_rel({"merged vs unmerged": (merged, before)}) <= TOL
        ours.unmerge_adapter()
        for p, m in ours.lora_layers().items():
            assert max_rel({p: (m.base_layer.weight, w0[p])}) <= 1e-6
        assert max_rel({"after unmerge": (ours(**batch).logits, before)}) <= TOL


def test_lora_and_dora_merged_in_either_order_equal_the_unmerged_forward(tmp_path):
    """Ours merges each adapter relative to the base without merged adapters, so any order and any
    split into merge calls give the forward of the unmerged adapters. (peft merges a DoRA adapter as
    f * (W + delta) with W already holding the other one, which rescales that one too.)"""
    ours, _ = _dora_pair(tmp_path)
    ours.add_adapter("plain", lora_core.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    ours.set_adapter(["default", "plain"])
    ours.eval()
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    with torch.no_grad():
        before = ours(**batch).logits
        for order in (["plain", "default"], ["default", "plain"]):
            for name in order:
                ours.merge_adapter([name])
            assert max_rel({str(order): (ours(**batch).logits, before)}) <= TOL
            ours.unmerge_adapter()
            assert max_rel({"unmerged": (ours(**batch).logits, before)}) <= TOL


def test_mixed_batch_with_dora_rows(tmp_path):
    """peft refuses adapter_names with DoRA; ours gives each row its adapter's output."""
    ours, _ = _dora_pair(tmp_path)
    ours.add_adapter("plain", lora_core.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   init_lora_weights=False))
    ours.eval()
    ids = example_inputs("llama", batch=3)["input_ids"]
    names = ["default", "plain", "__base__"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[i:i + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(input_ids=ids[i:i + 1]).logits
            assert max_rel({name: (mixed[i:i + 1], alone)}) <= TOL


def test_triton_backend_refuses_dora_with_the_reason(tmp_path):
    ours, _ = _dora_pair(tmp_path)
    ours.set_backend("triton")
    with pytest.raises(ValueError, match="DoRA's magnitude / weight-norm output scale is not fused"):
        ours(**example_inputs("llama"))
    ours.set_backend("torch")
    ours(**example_inputs("llama"))  # and the torch backend runs it


def test_dora_file_has_peft_s_magnitude_key(tmp_path):
    ours, _ = _dora_pair(tmp_path)
    ours.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mags = [k for k in keys if k.endswith("lora_magnitude_vector")]
    assert mags and all(k.startswith("base_model.model.model.layers.") for k in mags)
    assert len(mags) == 4 and keys[mags[0]].dim() == 1


def test_adapter_file_missing_the_magnitude_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    ours, _ = _dora_pair(tmp_path)
    ours.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "magnitude" not in k}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        lora_core.LoraModel.from_pretrained(build("llama"), str(tmp_path / "a"))


def test_combining_dora_adapters_is_refused(tmp_path):
    ours, _ = _dora_pair(tmp_path)
    with pytest.raises(ValueError, match="DoRA or lora_bias"):
        ours.add_weighted_adapter(["default"], [1.0], "combo", combination_type="linear")
