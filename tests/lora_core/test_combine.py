"""add_weighted_adapter against peft 0.21: every combination type gives peft's numbers.

Exact (fp32, rtol = atol = 0) for every type: the same tensor ops in the same order on the same
fp32 weights, the same LAPACK SVD on the same delta, and for dare the same torch.bernoulli draws
(same seed, same order: layers in module order, every A then every B, or one delta per adapter).
"""
import pytest
import torch

from adapter_pairs import build, max_rel, pair
from lora_core import LoraConfig, get_lora_model

# same rank (the linear family needs it), different alphas and partly different targets
SAME_R = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
          "b": dict(r=4, lora_alpha=4, target_modules=["v_proj", "o_proj"])}
# different ranks (cat and svd)
DIFF_R = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
          "b": dict(r=6, lora_alpha=12, target_modules=["v_proj", "o_proj"])}

CASES = [
    ("cat", DIFF_R, {}), ("svd", DIFF_R, {}), ("svd", DIFF_R, dict(svd_rank=3, svd_clamp=0.9)),
    ("linear", SAME_R, {}), ("magnitude_prune", SAME_R, dict(density=0.5)),
    ("ties", SAME_R, dict(density=0.5)), ("ties", SAME_R, dict(density=0.6, majority_sign_method="frequency")),
    ("dare_linear", SAME_R, dict(density=0.5)), ("dare_ties", SAME_R, dict(density=0.7)),
    ("ties_svd", DIFF_R, dict(density=0.5)), ("dare_ties_svd", DIFF_R, dict(density=0.5)),
    ("magnitude_prune_svd", DIFF_R, dict(density=0.4, svd_rank=5)),
]


@pytest.mark.parametrize("kind,adapters,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_combination_equals_peft(kind, adapters, kw):
    ours, theirs = pair(build("llama"), build("llama"), adapters)
    weights = [0.7, -0.4]  # a negative weight exercises the sign handling
    for model in (ours, theirs):
        torch.manual_seed(123)  # dare draws from torch's default generator, as peft
        model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=kind, **kw)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    ref = dict(theirs.named_parameters())
    layers = {p: m for p, m in ours.lora_layers().items() if "mix" in m.adapters}
    assert len(layers) == 6  # q, v, o of 2 blocks: every layer holding a or b
    for path, layer in layers.items():
        for ab in ("lora_A", "lora_B"):
            mine = getattr(layer.adapters["mix"], ab).weight
            theirs_w = ref[f"base_model.model.{path}.{ab}.mix.weight"]
            torch.testing.assert_close(mine, theirs_w, rtol=0, atol=0, msg=f"{path}.{ab}")
            assert not mine.requires_grad  # frozen, as peft
    batch = {"input_ids": torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))}
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=0)


def test_cat_and_svd_are_the_weighted_sum_of_deltas():
    ours, _ = pair(build("llama"), build("llama"), DIFF_R)
    w = [0.7, -0.4]
    ours.add_weighted_adapter(["a", "b"], w, "cat", combination_type="cat")
    ours.add_weighted_adapter(["a", "b"], w, "svd", combination_type="svd", svd_rank=10)  # full rank here
    for path, layer in ours.lora_layers().items():
        want = sum(wi * layer.adapters[n].delta_weight() for n, wi in zip("ab", w) if n in layer.adapters)
        # cat is exact up to fp32 rounding; a rank-10 SVD of a rank <= 10 delta as well
        assert max_rel(layer.delta_weight(["cat"]), want) <= 1e-5, path
        assert max_rel(layer.delta_weight(["svd"]), want) <= 1e-4, path


def test_rslora_adapters_combine_to_the_weighted_sum():
    """peft keeps use_rslora on the combined adapter, whose scaling r / sqrt(r) = sqrt(r) then
    multiplies the combination; ours switches it off, so the delta is the weighted sum."""
    cfg = {n: dict(c, use_rslora=True) for n, c in DIFF_R.items()}
    ours, theirs = pair(build("llama"), build("llama"), cfg)
    for model in (ours, theirs):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    layer = ours.lora_layers()["model.layers.0.self_attn.v_proj"]
    want = layer.adapters["a"].delta_weight() + layer.adapters["b"].delta_weight()
    assert max_rel(layer.delta_weight(["mix"]), want) <= 1e-5
    peft_layer = theirs.base_model.model.get_submodule("model.layers.0.self_attn.v_proj")
    peft_delta = peft_layer.get_delta_weight("mix")
    assert abs(max_rel(peft_delta, want) - (10 ** 0.5 - 1)) < 1e-3  # peft: sqrt(10) times too big


def test_modules_to_save_copy_comes_from_the_source_adapter():
    cfg = {"a": dict(SAME_R["a"], modules_to_save=["lm_head"]), "b": SAME_R["b"]}
    ours, _ = pair(build("llama"), build("llama"), cfg)
    ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="linear")
    head = ours.base_model.lm_head
    assert torch.equal(head.modules_to_save["mix"].weight, head.modules_to_save["a"].weight)
    assert not torch.equal(head.modules_to_save["mix"].weight, head.original_module.weight)


@pytest.mark.parametrize("kwargs,err", [
    (dict(adapters=["a", "zz"], weights=[1, 1], adapter_name="m"), r"unknown adapter\(s\) \['zz'\]"),
    (dict(adapters=["a", "b"], weights=[1], adapter_name="m"), "one weight per adapter"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "already exists"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="ties"), "needs density"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="median"), "combination_type"),
])
def test_bad_arguments_change_nothing(kwargs, err):
    ours = get_lora_model(build("llama"), LoraConfig(**SAME_R["a"]), adapter_name="a")
    ours.add_adapter("b", LoraConfig(**SAME_R["b"]))
    keys = set(ours.state_dict())
    with pytest.raises(ValueError, match=err):
        ours.add_weighted_adapter(**kwargs)
    assert set(ours.state_dict()) == keys and set(ours.peft_config) == {"a", "b"}


def test_linear_needs_one_rank():
    ours, _ = pair(build("llama"), build("llama"), DIFF_R)
    with pytest.raises(ValueError, match="one rank"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="linear")
