"""Merge: merged output equals the unmerged one (within the stated error per base), unmerge
restores the base, merging twice is a no-op, non-finite deltas are refused with nothing changed."""
import pytest
import torch

from lora_core import LoraConfig, LoraLinear, get_lora_model
from lora_core import quant
from tiny_models import example_inputs, load_tiny, save_tiny

# NF4's widest gap between neighbouring code values is -0.6962 - (-1) = 0.304 (of the block absmax;
# the positive side's widest, 1 - 0.7230, is 0.277); rounding to the nearest code errs by at most half.
NF4_HALF_STEP = 0.152
# int8 rounds W * 127 / row_absmax to an integer: at most half a step, 0.5 / 127 of the row absmax;
# bnb quantizes from fp16, whose rounding (2^-11 relative) adds a little.
INT8_HALF_STEP = 0.5 / 127 + 2 ** -11

BASES = {"fp32": ("none", torch.float32), "bf16": ("none", torch.bfloat16),
         "nf4": ("nf4", torch.bfloat16), "int8": ("int8", torch.float32)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return {a: save_tiny(a, root / a) for a in ("llama", "gpt2")}


def lora_model(dirs, arch, base, **cfg):
    quantization, dtype = BASES[base]
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **cfg)
    model = get_lora_model(load_tiny(dirs[arch], arch, quantization, dtype), config)
    with torch.no_grad():  # a trained-adapter-sized delta (B ~ U(+-0.5) by default would swamp W)
        for layer in model.lora_layers().values():
            layer.lora_B["default"].weight.mul_(0.2)
    return model


def base_weights(model) -> dict:
    return {n: quant.dequantize_base(layer.base_layer) for n, layer in model.lora_layers().items()}


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# merged-vs-unmerged tolerance on logits, with the reason:
MERGED_TOL = {
    "fp32": 1e-5,  # W + delta rounded once in fp32; matmul order changes: float rounding only
    "bf16": 5e-2,  # W + delta rounded to bf16 (2^-8 relative per weight), through 2 layers
    "nf4": 0.3,    # W + delta re-quantized to 4 bits: up to NF4_HALF_STEP of a block's absmax per weight
    "int8": 0.1,   # re-quantized per row to int8: up to INT8_HALF_STEP of the row absmax per weight
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_output(dirs, arch, base):
    model = lora_model(dirs, arch, base)
    batch = {"input_ids": example_inputs(arch)["input_ids"]}
    with torch.no_grad():
        unmerged = model(**batch).logits
        with model.disable_adapter():
            base_out = model(**batch).logits
        targets = {n: quant.dequantize_base(layer.base_layer) + layer.delta_weight()
                   for n, layer in model.lora_layers().items()}
        errors = model.merge_adapter()
        # the weight error merge reports is real and within the storage format's rounding: half an
        # ulp (2^-24 fp32, 2^-8 bf16: 24 / 8 significant bits) or half a quantization step
        for name, layer in model.lora_layers().items():
            measured = (quant.dequantize_base(layer.base_layer) - targets[name]).abs().max().item()
            assert errors[name] == pytest.approx(measured, abs=1e-6)
            scale = targets[name].abs().max().item()
            bound = {"fp32": 2 ** -24, "bf16": 2 ** -8, "nf4": NF4_HALF_STEP, "int8": INT8_HALF_STEP}[base]
            assert measured <= bound * scale * 1.01, (name, measured, bound * scale)
        merged = model(**batch).logits
        hf = model.merge_and_unload()
        unloaded = hf(**batch).logits
    assert not any(isinstance(m, LoraLinear) for m in hf.modules())
    d = rel(merged, unmerged)
    print(f"{arch}/{base}: merged vs unmerged logits {d:.2e}, adapter effect {rel(base_out, unmerged):.2e}")
    assert d <= MERGED_TOL[base]
    assert rel(base_out, unmerged) > 2 * d  # the test can fail: the delta matters more than the error
    if base == "int8":  # transformers now runs bnb's int8 matmul, which quantizes activations too
        assert rel(unloaded, merged) <= MERGED_TOL["int8"]
    else:  # same weights, same arithmetic (dequantize, then F.linear): exact
        torch.testing.assert_close(unloaded, merged, rtol=0, atol=0)


@pytest.mark.parametrize("base", list(BASES))
def test_unmerge_restores_base(dirs, base):
    model = lora_model(dirs, "gpt2", base)  # GPT-2: Conv1D, so fan_in_fan_out is exercised
    before = base_weights(model)
    model.merge_adapter()
    assert all(layer.merged for layer in model.lora_layers().values())
    model.unmerge_adapter()
    assert not any(layer.merged for layer in model.lora_layers().values())
    for name, w in base_weights(model).items():
        err, scale = (w - before[name]).abs().max().item(), before[name].abs().max().item()
        delta = model.lora_layers()[name].delta_weight().abs().max().item()
        bound = {  # dense: add then subtract in the base dtype, two roundings of |W + delta|
            "fp32": 2 * 2 ** -24 * (scale + delta), "bf16": 2 * 2 ** -8 * (scale + delta),
            # quantized: two re-quantizations (merge, unmerge), each within half a step of its absmax
            "nf4": 2 * NF4_HALF_STEP * (scale + delta), "int8": 2 * INT8_HALF_STEP * (scale + delta)}[base]
        assert err <= bound, (name, err, bound)


def test_fp32_unmerge_is_exact_to_rounding_and_merge_twice_is_noop(dirs):
    model = lora_model(dirs, "llama", "fp32")
    layer = model.lora_layers()["model.layers.0.self_attn.q_proj"]
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    w1 = layer.base_layer.weight.detach().clone()
    assert not torch.equal(w0, w1)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    with pytest.warns(UserWarning, match=r"\['default'\] already merged"):
        assert model.merge_adapter() == {}  # nothing left to merge at model level, and it says so
    torch.testing.assert_close(layer.base_layer.weight, w1, rtol=0, atol=0)  # no double add
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_non_finite_delta_refused_nothing_changed(dirs, base):
    model = lora_model(dirs, "llama", base)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    last = list(model.lora_layers().values())[-1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="non-finite"):
        last.merge()
    after = model.state_dict()
    changed = [k for k, v in before.items() if "lora_B" not in k and not torch.equal(v, after[k])]
    assert changed == [] and not any(layer.merged for layer in model.lora_layers().values())
