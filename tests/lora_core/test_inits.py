"""LoRA inits beyond the per-variant comparison with peft (test_variants.py): orthogonal's zero
product, PiSSA / OLoRA where peft cannot (quantized bases, GPT-2's Conv1D), LoftQ's reconstruction
error, and the PiSSA / OLoRA -> LoRA conversion (path_initial_model_for_weight_conversion).

fp32 tolerance 1e-5 relative unless said otherwise (the same math in another order).
"""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_core
from adapter_pairs import build, no_cpu_repack, peft_name
from lora_core import quant
from tiny_models import example_inputs, load_tiny, save_tiny
from variant_pairs import losses, max_rel, one_thread, pair  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # LAPACK on tiny matrices: see variant_pairs

TOL = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_orthogonal_product_is_zero_with_both_factors_random():
    model = lora_core.get_lora_model(build("llama"), lora_core.LoraConfig(init_lora_weights="orthogonal", r=8))
    for layer in model.lora_layers().values():
        a = layer.adapters["default"]
        assert a.lora_A.weight.abs().min() > 0 and a.lora_B.weight.abs().max() > 0
        assert (a.lora_B.weight @ a.lora_A.weight).abs().max() < 1e-6


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_keep_a_gpt2_conv1d_model_s_output(init):
    """GPT-2 stores W as [in, out]; the inits factor W [out, in] (peft's OLoRA factors the stored
    matrix, which gives A and B of the wrong shapes for c_attn [64 -> 192])."""
    batch = {"input_ids": example_inputs("gpt2")["input_ids"]}
    before = logits(build("gpt2"), batch)
    model = lora_core.get_lora_model(build("gpt2"), lora_core.LoraConfig(init_lora_weights=init, r=8,
                                                                         target_modules=["c_attn", "c_fc"]))
    assert max_rel({"init": (logits(model, batch), before)}) <= TOL
    assert model.lora_layers()["transformer.h.0.attn.c_attn"].adapters["default"].lora_B.weight.shape == (192, 8)


def test_pissa_on_gpt2_equals_peft():
    cfg = dict(init_lora_weights="pissa", r=8, target_modules=["c_attn", "c_fc"])
    torch.manual_seed(0)
    ours = lora_core.get_lora_model(build("gpt2"), lora_core.LoraConfig(**cfg))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(**cfg))
    ref = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():  # A, B and every (residual) base weight, bit for bit
        assert torch.equal(p, ref[peft_name(name)]), name


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_residual_inits_on_quantized_bases(llama_dir, init, quantization):
    """peft's PiSSA refuses quantized bases; ours dequantizes, factors, and re-quantizes the residual
    (as peft's OLoRA does): the output moves by about one quantization step of the residual
    (relative to max|logit|, measured: nf4 1.5e-2 to 1.7e-2; int8 5.9e-3, of which 5.3e-3 is
    bitsandbytes' int8 activation rounding in the unwrapped model, which the default init shows
    too), below what a small trained adapter changes (5e-2 to 1.3e-1 for B += 0.05 noise)."""
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    before = logits(no_cpu_repack(load_tiny(llama_dir, "llama", quantization)), batch)
    model = lora_core.get_lora_model(load_tiny(llama_dir, "llama", quantization),
                                     lora_core.LoraConfig(init_lora_weights=init, r=8,
                                                          target_modules=["q_proj", "up_proj"]))
    assert max_rel({"init": (logits(model, batch), before)}) <= 3e-2
    layer = model.lora_layers()["model.layers.0.mlp.up_proj"]
    assert quant.is_quantized(layer.base_layer)
    assert layer.adapters["default"].lora_B.weight.norm() > 1  # A and B carry W's top components


def test_loftq_error_falls_below_quantization_and_with_iterations(llama_dir):
    """||W - (Q + s B A)|| < ||W - Q|| after one step, and falls as steps are added; the base
    becomes Q, the nf4 quantization that LoftQ settled on."""
    errs = {}
    for iters in (1, 4):
        cfg = lora_core.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": iters},
                                   r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"])
        errs[iters] = lora_core.get_lora_model(load_tiny(llama_dir, "llama"), cfg).loftq_errors()
    assert len(errs[1]) == 4
    for path, e in errs[4].items():
        assert len(e.per_iteration) == 4
        assert e.per_iteration[0] < e.quantization
        assert all(b <= a * (1 + 1e-6) for a, b in zip(e.per_iteration, e.per_iteration[1:])), e
        assert e.per_iteration[-1] < errs[1][path].per_iteration[-1]


@pytest.mark.parametrize("bits,alpha", [(4, 32), (8, 8)])
def test_loftq_model_reconstructs_w_with_its_scaling(llama_dir, bits, alpha):
    """With scaling = alpha / r != 1 the adapter still fits W - Q (peft's A = R, B = L would give
    scaling * L R); the base is Q as stored in the base dtype."""
    w = {p: quant.dequantize_base(m) for p, m in load_tiny(llama_dir, "llama").named_modules()
         if p.endswith(("q_proj", "up_proj"))}
    cfg = lora_core.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": bits, "loftq_iter": 2},
                               r=8, lora_alpha=alpha, target_modules=["q_proj", "up_proj"])
    model = lora_core.get_lora_model(load_tiny(llama_dir, "llama"), cfg)
    for path, layer in model.lora_layers().items():
        Q = quant.dequantize_base(layer.base_layer)
        err = (w[path] - (Q + layer.delta_weight())).norm().item()
        assert err <= model.loftq_errors()[path].per_iteration[-1] * (1 + 1e-5)
        assert err < (w[path] - Q).norm().item()


def test_loftq_refuses_a_quantized_base_before_changing_it(llama_dir):
    model = load_tiny(llama_dir, "llama", "nf4")
    cfg = lora_core.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="already quantized"):
        lora_core.get_lora_model(model, cfg)
    assert not any(isinstance(m, lora_core.LoraLinear) for m in model.modules())


def test_rank_above_min_dimension_refused():
    with pytest.raises(ValueError, match="larger than min"):
        lora_core.get_lora_model(build("llama"), lora_core.LoraConfig(init_lora_weights="pissa", r=96,
                                                                       target_modules=["k_proj"]))


@pytest.mark.requires_cuda
def test_loftq_equals_peft_on_cuda():
    """peft's loftq_init quantizes on CUDA; with lora_alpha = r (scaling 1) ours gives its tensors."""
    from peft.utils.loftq_utils import loftq_init
    from lora_core.init import loftq
    W = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    q, A, B = loftq_init(W, num_bits=4, reduced_rank=8, num_iter=2)
    A2, B2, deq, _ = loftq(W.cuda(), 8, 1.0, 4, 2)
    assert max_rel({"Q": (deq().cpu(), q.float()), "A": (A2.cpu(), A.cpu()), "B": (B2.cpu(), B.cpu())}) <= 1e-4


# ---- conversion ------------------------------------------------------------------------------------
def _train_and_convert(model, tmp_path, name):
    """Save the init, train 3 AdamW steps, save converted; returns (converted dir, trained logits)."""
    model.save_pretrained(tmp_path / f"{name}_init")
    losses(model, [example_inputs("llama", seed=20 + i) for i in range(3)], lr=2e-2)
    model.save_pretrained(tmp_path / f"{name}_lora",
                          path_initial_model_for_weight_conversion=str(tmp_path / f"{name}_init"))
    return tmp_path / f"{name}_lora"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_applies_to_the_original_base_and_equals_peft_s(llama_dir, tmp_path, init):
    cfg = dict(init_lora_weights=init, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    ours, theirs = pair(llama_dir, "llama", "none", torch.float32, **cfg)
    batch = {"input_ids": example_inputs("llama")["input_ids"]}
    converted = _train_and_convert(ours, tmp_path, "ours")
    theirs.save_pretrained(tmp_path / "peft_init")
    losses(theirs, [example_inputs("llama", seed=20 + i) for i in range(3)], lr=2e-2)
    theirs.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    trained = logits(ours, batch)

    cfg_disk = json.loads((converted / "adapter_config.json").read_text())
    assert (cfg_disk["r"], cfg_disk["lora_alpha"], cfg_disk["init_lora_weights"]) == (16, 32, True)
    ours_t = load_file(str(converted / "adapter_model.safetensors"))
    peft_t = load_file(str(tmp_path / "peft_lora" / "adapter_model.safetensors"))
    assert ours_t.keys() == peft_t.keys()
    # after 3 AdamW steps of the same training on both sides (fp32 summation order; measured 2.5e-6)
    assert max_rel({k: (ours_t[k], peft_t[k]) for k in ours_t}) <= 2e-5
    # the converted adapter on the ORIGINAL base gives the trained model's output, with ours and peft
    mine = lora_core.LoraModel.from_pretrained(load_tiny(llama_dir, "llama"), str(converted))
    peft_loaded = peft.PeftModel.from_pretrained(load_tiny(llama_dir, "llama"), str(converted))
    assert max_rel({"ours": (logits(mine, batch), trained)}) <= TOL
    assert max_rel({"peft": (logits(peft_loaded, batch), trained)}) <= TOL
    # the initial folder was only read
    assert json.loads((tmp_path / "ours_init" / "adapter_config.json").read_text())["init_lora_weights"] == init


def test_conversion_refusals(llama_dir, tmp_path):
    model = lora_core.get_lora_model(load_tiny(llama_dir, "llama"),
                                     lora_core.LoraConfig(init_lora_weights="pissa", use_dora=True, r=8))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="DoRA"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = lora_core.get_lora_model(load_tiny(llama_dir, "llama"),
                                     lora_core.LoraConfig(init_lora_weights="pissa", r=4))
    with pytest.raises(ValueError, match="other \\['r'\\]"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain.add_adapter("second", lora_core.LoraConfig(r=4))
    with pytest.raises(ValueError, match="converts one adapter"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out").exists()
