"""LoRA variants against peft 0.21 on tiny Llama: DoRA, lora_bias, and the inits orthogonal, PiSSA
(exact and fast SVD), OLoRA, DoRA + PiSSA.

Per case: (1) the init: the same adapter tensors and the same (residual) base weights from the
same seed; (2) a 2-step AdamW trajectory from that init, the loss at every step; (3) on perturbed,
identical adapter tensors: logits and the gradient of every adapter tensor (A, B, lora_B.bias,
DoRA's magnitude); (4) peft's adapter file -> ours and our file -> peft: the same logits.

Tolerances (relative: max|ours - peft| / max|peft| for tensors and logits, ||ours - peft|| / ||peft||
for gradients), with their reasons:
"""
import peft
import pytest
import torch

import lora_core
from tiny_models import example_inputs, load_tiny, save_tiny
from variant_pairs import (TARGETS, adapter_tensors, base_weights, logits_and_backward, losses, max_rel,  # noqa: F401
                           one_thread, pair, perturb_and_copy)
from adapter_pairs import build, no_cpu_repack

pytestmark = pytest.mark.usefixtures("one_thread")  # LAPACK on tiny matrices: see variant_pairs

VARIANTS = {
    "dora": dict(use_dora=True),
    "lora_bias": dict(lora_bias=True, init_lora_weights=False),
    "orthogonal": dict(init_lora_weights="orthogonal"),
    "pissa": dict(init_lora_weights="pissa"),
    "pissa_niter": dict(init_lora_weights="pissa_niter_2"),
    "olora": dict(init_lora_weights="olora"),
    "dora_pissa": dict(use_dora=True, init_lora_weights="pissa"),
}
EXACT = {"init": 0.0, "base": 0.0, "loss": 1e-6, "logits": 1e-5, "grad": 1e-5}
# base -> (quantization, compute dtype, {check: tolerance})
BASES = {
    # the same fp32 ops on the same numbers (the inits call the same LAPACK routines on the same
    # matrices; the torch backend records peft's graph): measured 0 on CPU for everything; the
    # tolerances leave room for another summation order (a GPU's fused triton path)
    "fp32": ("none", torch.float32, EXACT),
    # nf4 with fp32 compute: both sides dequantize with bitsandbytes and re-quantize a residual with
    # it from fp32, so the same numbers again (measured as fp32)
    "nf4": ("nf4", torch.float32, EXACT),
    # nf4 with bf16 compute (the recipes' setting). peft rounds every adapter init to the compute
    # dtype before upcasting it to fp32 (ours keeps the fp32 values): init tensors one bf16 rounding
    # (2^-8) apart, and DoRA's initial norm too. OLoRA re-quantizes the residual from fp32 on both
    # sides: the same bases. peft's bnb 4-bit layer rounds the LoRA output to bf16 before adding it,
    # ours rounds the sum once (test_equivalence.py): measured losses 3e-4, logits 6e-3, gradients
    # 1.3e-2 (DoRA: 0, both sides add its fp32 term to the bf16 base output and round once).
    "nf4-bf16": ("nf4", torch.bfloat16, {"init": 2 ** -8, "base": 0.0, "loss": 5e-3, "logits": 3e-2, "grad": 5e-2}),
    # peft+bnb int8 quantizes the activations (outliers in fp16); ours multiplies by the dequantized
    # W exactly (test_equivalence.py: ~1 % per layer). Re-quantizing a residual is the same
    # bitsandbytes call on both sides (from fp16), so bases match exactly.
    "int8": ("int8", torch.float32, {"init": 1e-6, "base": 0.0, "loss": 2e-2, "logits": 5e-2, "grad": 5e-2}),
}
# peft's PiSSA refuses quantized bases (ours runs it: test_inits.py), its orthogonal init casts A and
# B to the base weight's dtype, uint8 for bitsandbytes (broken), and its DoRA on an int8 base fails on
# CPU (dequantizing moves the weight and drops SCB): see test_dora_on_int8_equals_peft_on_its_weights.
CASES = ([(v, "fp32") for v in VARIANTS] + [(v, "nf4") for v in ("dora", "lora_bias", "olora")]
         + [("dora", "nf4-bf16"), ("olora", "nf4-bf16"), ("lora_bias", "int8"), ("olora", "int8")])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("variant,base", CASES)
def test_variant_equals_peft(llama_dir, tmp_path, variant, base):
    quantization, dtype, tol = BASES[base]
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS, **VARIANTS[variant])
    ours, theirs = pair(llama_dir, "llama", quantization, dtype, **cfg)

    # (1) init: adapter tensors and bases
    assert max_rel(adapter_tensors(ours, theirs)) <= tol["init"]
    assert max_rel(base_weights(ours, theirs)) <= tol["base"]

    # (2) a few AdamW steps from the init
    batches = [example_inputs("llama", seed=10 + i) for i in range(2)]
    lo, lp = losses(ours, batches), losses(theirs, batches)
    assert max(abs(a - b) / abs(b) for a, b in zip(lo, lp)) <= tol["loss"], (lo, lp)

    # (3) logits and gradients on identical, perturbed adapter tensors
    perturb_and_copy(ours, theirs)
    batch = example_inputs("llama")
    out_o, out_p = logits_and_backward(ours, batch), logits_and_backward(theirs, batch)
    assert max_rel({"logits": (out_o, out_p)}) <= tol["logits"]
    worst = max(((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item()
                for a, b in adapter_tensors(ours, theirs).values())
    assert worst <= tol["grad"], worst

    # (4) files both ways: the loader rebuilds the init (residual base) from the same seed, then
    # reads the tensors; the loaded model gives the writer's logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    from_ours = peft.PeftModel.from_pretrained(no_cpu_repack(load_tiny(llama_dir, "llama", quantization, dtype)),
                                               str(tmp_path / "ours"))
    torch.manual_seed(0)
    from_peft = lora_core.LoraModel.from_pretrained(load_tiny(llama_dir, "llama", quantization, dtype),
                                                    str(tmp_path / "peft"))
    for model in (ours, theirs, from_ours, from_peft):
        model.train()  # bitsandbytes' exact path (its eval path on CPU repacks and runs in bf16)
    with torch.no_grad():
        ref_o, ref_p = ours(**batch).logits, theirs(**batch).logits
        assert max_rel({"our file -> peft": (from_ours(**batch).logits, ref_o)}) <= tol["logits"]
        assert max_rel({"peft file -> ours": (from_peft(**batch).logits, ref_p)}) <= tol["logits"]


def test_lora_bias_merges_into_the_base_bias_as_peft():
    """GPT-2's Conv1D layers have biases: merging adds scaling * b to them (peft's merge)."""
    cfg = dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], lora_bias=True, init_lora_weights=False)
    torch.manual_seed(0)
    ours = lora_core.get_lora_model(build("gpt2"), lora_core.LoraConfig(**cfg))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(**cfg))
    perturb_and_copy(ours, theirs)
    batch = {"input_ids": example_inputs("gpt2")["input_ids"]}
    ours.eval()
    with torch.no_grad():
        before = ours(**batch).logits
        bias0 = {p: m.base_layer.bias.clone() for p, m in ours.lora_layers().items()}
        ours.merge_adapter()
        theirs.merge_adapter()
        peft_layers = dict(theirs.base_model.model.named_modules())
        for p, m in ours.lora_layers().items():
            assert max_rel({p: (m.base_layer.bias, peft_layers[p].get_base_layer().bias)}) <= 1e-6
        assert max_rel({"merged": (ours(**batch).logits, before)}) <= 1e-5
        ours.unmerge_adapter()
        assert max_rel({p: (m.base_layer.bias, bias0[p]) for p, m in ours.lora_layers().items()}) <= 1e-6


def test_lora_bias_merge_refused_without_a_base_bias():
    model = lora_core.get_lora_model(build("llama"), lora_core.LoraConfig(lora_bias=True, init_lora_weights=False))
    w = {p: m.base_layer.weight.clone() for p, m in model.lora_layers().items()}
    with pytest.raises(ValueError, match="no bias to merge it into"):
        model.merge_adapter()
    assert all(torch.equal(m.base_layer.weight, w[p]) for p, m in model.lora_layers().items())
    assert not any(m.merged for m in model.lora_layers().values())
