"""Several adapters on one model, against peft 0.21 (issue 12): two adapters of different rank and
targets, switching, several active at once, a mixed batch with "__base__" rows, generate with
adapter_names, delete, per-adapter merge, status, and the peft methods we refuse by name.

Tolerances. fp32: exact (the same fp32 ops on the same weights, in peft's order) for logits and
mixed batches; gradients within 1e-6 relative (summation order inside autograd's matmuls may
differ; measured 0). nf4 (bf16 compute), as in test_equivalence.py: NF4_TOL = 5e-2 relative on
logits, NF4_GRAD_TOL = 8e-2 on gradients (norm ratio): peft's bnb 4-bit layer rounds each LoRA
output to bf16 before adding it to the base output, ours adds in fp32 and rounds once (measured
7e-3 / 1.2e-2). In a mixed batch both sides round each row's term to bf16 before adding it
(measured 0).
"""
import contextlib
import io as stdio
import os
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraModel as PeftTuner
from transformers.integrations.peft import PeftAdapterMixin

from adapter_pairs import build, max_rel, pair, peft_name
from lora_core import LoraConfig, LoraLinear, LoraModel, get_lora_model
from tiny_models import example_inputs, load_tiny, save_tiny

NF4_TOL = 5e-2
NF4_GRAD_TOL = 8e-2  # ||ours - peft|| / ||peft|| per tensor, as test_equivalence.py's nf4 row
GRAD_TOL = 1e-6
# "default": r=4 on q/v; "other": r=8, another alpha, on k/v/down_proj (v is shared, k and down only
# "other"'s: those layers hold only "other")
TWO = {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
       "other": dict(r=8, lora_alpha=4, target_modules=["k_proj", "v_proj", "down_proj"])}


def llama_pair(adapters=TWO):
    return pair(build("llama"), build("llama"), adapters)


def logits(model, batch, **kw):
    return model(**batch, **kw).logits


def test_layers_hold_what_their_adapters_target():
    ours, theirs = llama_pair()
    layers = ours.lora_layers()
    assert set(layers["model.layers.0.self_attn.q_proj"].adapters) == {"default"}
    assert set(layers["model.layers.0.self_attn.v_proj"].adapters) == {"default", "other"}
    assert set(layers["model.layers.0.self_attn.k_proj"].adapters) == {"other"}  # only the second one
    assert layers["model.layers.0.self_attn.v_proj"].r == {"default": 4, "other": 8}
    assert layers["model.layers.0.self_attn.v_proj"].scaling == {"default": 2.0, "other": 0.5}
    assert set(ours.peft_config) == {"default", "other"} and ours.active_adapter == "default"
    assert ours.peft_config["other"].target_modules == {"k_proj", "v_proj", "down_proj"}


def _switch_and_compare(ours, theirs, batch, logit_tol: float, grad_tol: float) -> dict:
    """set_adapter default -> other -> default on both; each time the trainable sets and counts
    agree, logits within logit_tol and every trained A / B gradient within grad_tol (relative).
    Returns each adapter's logits (ours) and the worst differences seen."""
    seen, worst = {}, {"logits": 0.0, "grads": 0.0}
    for name in ["default", "other", "default"]:
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert ours.active_adapter == theirs.active_adapter == name
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        out_o, out_t = ours(**batch), theirs(**batch)
        worst["logits"] = max(worst["logits"], max_rel(out_o.logits, out_t.logits))
        out_o.loss.backward()
        out_t.loss.backward()
        ref = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            if ".adapters." not in n:
                continue
            q = ref[peft_name(n)]
            assert p.requires_grad == q.requires_grad == (f".adapters.{name}." in n), n
            if p.requires_grad:
                worst["grads"] = max(worst["grads"], (p.grad - q.grad).norm().item() / q.grad.norm().item())
        seen[name] = out_o.logits.detach()
    assert worst["logits"] <= logit_tol and worst["grads"] <= grad_tol, worst
    assert max_rel(seen["default"], seen["other"]) > 1e-2  # the two adapters really differ
    return worst


def test_switching_equals_peft_logits_grads_counts():
    ours, theirs = llama_pair()
    _switch_and_compare(ours, theirs, example_inputs("llama"), logit_tol=0.0, grad_tol=GRAD_TOL)


def test_switching_nf4_within_tolerance(tmp_path):
    path = save_tiny("llama", tmp_path / "llama")
    ours, theirs = pair(load_tiny(path, "llama", "nf4", torch.bfloat16),
                        load_tiny(path, "llama", "nf4", torch.bfloat16), TWO)
    worst = _switch_and_compare(ours, theirs, example_inputs("llama"), logit_tol=NF4_TOL, grad_tol=NF4_GRAD_TOL)
    print(f"nf4 two adapters: worst logits {worst['logits']:.2e}, worst grad {worst['grads']:.2e}")


def test_two_active_adapters_equal_peft():
    ours, theirs = llama_pair()
    ours.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])  # peft's tuner takes a list
    batch = example_inputs("llama")
    assert ours.active_adapters == ["default", "other"]
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_one_active_adapter_is_one_fused_call(monkeypatch):
    """The fast path: a layer with one active adapter makes exactly one kernels.lora_linear call
    carrying that adapter's A and B (a second adapter on the layer costs nothing)."""
    import kernels
    ours, _ = llama_pair()
    calls = []
    real = kernels.lora_linear

    def spy(x, weight, bias, A, B, *args, **kw):
        calls.append((A is not None, kw.get("seed")))
        return real(x, weight, bias, A, B, *args, **kw)
    monkeypatch.setattr(kernels, "lora_linear", spy)
    layer = ours.lora_layers()["model.layers.0.self_attn.v_proj"]  # holds both adapters
    layer.train()
    layer.adapters["default"].lora_dropout = torch.nn.Dropout(0.1)
    layer(torch.randn(2, 3, 64))
    assert calls == [(True, None)]  # one call, LoRA fused, seed left to the backend


def _mixed_and_single(ours, batch, names):
    """(mixed-batch logits, {adapter: logits with that adapter alone active}) in eval mode."""
    ours.eval()
    with torch.no_grad():
        mixed = logits(ours, batch, adapter_names=names)
        single = {}
        for name in ("other", "default"):
            ours.set_adapter(name)
            single[name] = logits(ours, batch)
    return mixed, single


def test_mixed_batch_equals_peft_and_base_rows_equal_base():
    # each adapter has its own copy of lm_head (peft 0.21 crashes when only one of them has one)
    cfgs = {n: dict(c, modules_to_save=["lm_head"]) for n, c in TWO.items()}
    ours, theirs = pair(build("llama"), build("llama"), cfgs)
    reference = build("llama")  # the untouched base model
    names = ["other", "__base__", "default", "other"]
    batch = {"input_ids": example_inputs("llama", batch=4)["input_ids"]}
    theirs.eval()
    with torch.no_grad():
        mixed_t = logits(theirs, batch, adapter_names=names)
        base = reference(**batch).logits
    mixed_o, single = _mixed_and_single(ours, batch, names)
    torch.testing.assert_close(mixed_o, mixed_t, rtol=0, atol=0)
    torch.testing.assert_close(mixed_o[1], base[1], rtol=0, atol=0)  # "__base__": the base model exactly
    # each row as if its adapter were the only one (fp32; the row's matmuls run in a smaller batch)
    torch.testing.assert_close(mixed_o[[0, 3]], single["other"][[0, 3]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed_o[2], single["default"][2], rtol=1e-6, atol=1e-6)
    assert max_rel(mixed_o[2], base[2]) > 1e-2 and max_rel(mixed_o[0], base[0]) > 1e-2


def test_mixed_batch_modules_to_save_of_one_adapter_only():
    """Where peft 0.21 raises KeyError: rows of an adapter without a copy of lm_head use the
    original head, as that adapter does when it runs alone."""
    cfgs = {"default": dict(TWO["default"], modules_to_save=["lm_head"]), "other": TWO["other"]}
    ours, _ = pair(build("llama"), build("llama"), cfgs)
    names = ["other", "default", "__base__"]
    batch = {"input_ids": example_inputs("llama", batch=3)["input_ids"]}
    mixed, single = _mixed_and_single(ours, batch, names)
    torch.testing.assert_close(mixed[0], single["other"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], single["default"][1], rtol=1e-6, atol=1e-6)


def test_mixed_batch_nf4_within_tolerance(tmp_path):
    path = save_tiny("llama", tmp_path / "llama")
    ours, theirs = pair(load_tiny(path, "llama", "nf4", torch.bfloat16),
                        load_tiny(path, "llama", "nf4", torch.bfloat16), TWO)
    names = ["default", "__base__", "other"]
    batch = {"input_ids": example_inputs("llama", batch=3)["input_ids"]}
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        mixed_o = logits(ours, batch, adapter_names=names)
        mixed_t = logits(theirs, batch, adapter_names=names)
        with ours.disable_adapter():
            base = logits(ours, batch)
    print(f"nf4 mixed batch: {max_rel(mixed_o, mixed_t):.2e}")
    assert max_rel(mixed_o, mixed_t) <= NF4_TOL
    torch.testing.assert_close(mixed_o[1], base[1], rtol=0, atol=0)


def test_mixed_batch_refusals():
    ours, theirs = llama_pair()
    batch = {"input_ids": example_inputs("llama", batch=2)["input_ids"]}
    ours.train()
    theirs.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(**batch, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="training mode"):
        theirs(**batch, adapter_names=["default", "other"])  # peft refuses too
    ours.eval()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['typo'\]"):
        ours(**batch, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="3 entries but the input has 2 rows"):
        ours(**batch, adapter_names=["default", "other", "other"])
    with pytest.raises(TypeError, match="list of adapter names"):
        ours(**batch, adapter_names="default")
    with pytest.raises(TypeError, match="aLoRA"):
        ours(**batch, alora_offsets=[1, 1])  # never left to the HF model's **kwargs
    ours.merge_adapter(["other"])
    with pytest.raises(ValueError, match="merged"):
        ours(**batch, adapter_names=["default", "other"])
    assert all(m.row_adapters is None for m in ours.lora_layers().values())  # nothing left behind


@pytest.mark.parametrize("arch,beams", [("llama", 1), ("llama", 2), ("t5", 2)])
def test_generate_with_adapter_names_equals_peft(arch, beams):
    cfgs = {"default": dict(r=4, lora_alpha=8, target_modules=["q", "v"] if arch == "t5" else ["q_proj", "v_proj"]),
            "other": dict(r=8, lora_alpha=16, target_modules=["k", "o"] if arch == "t5" else ["k_proj", "o_proj"])}
    ours, theirs = pair(build(arch), build(arch), cfgs)
    ours.eval()
    theirs.eval()
    ids = example_inputs(arch, batch=3, seq=4)["input_ids"]
    names = ["other", "__base__", "default"]
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=beams)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, adapter_names=names, **kw)
        want = theirs.generate(input_ids=ids, adapter_names=names, **kw)
        ours.set_adapter("other")
        alone = ours.generate(input_ids=ids[:1], **kw)  # row 0 with "other" as the only adapter
    assert torch.equal(got, want)
    assert torch.equal(got[:1], alone)


def test_delete_adapter_equals_peft():
    ours, theirs = llama_pair()
    batch = example_inputs("llama")
    with pytest.warns(UserWarning, match="Setting active adapter to other"):
        ours.delete_adapter("default")
    with pytest.warns(UserWarning, match="Setting active adapter to other"):
        theirs.delete_adapter("default")
    # peft 0.21 leaves its model-level active adapter at the deleted "default" (its layers switch to
    # "other" one by one, and its forward then fails with KeyError until set_adapter); ours switches
    # the model and every layer
    assert ours.active_adapter == "other" and ours.get_model_status().active_adapters == ["other"]
    theirs.set_adapter("other")
    assert set(ours.peft_config) == {"other"}
    assert not any("default" in layer.adapters for layer in ours.lora_layers().values())
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.delete_adapter("default")
    ours.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        ours.delete_adapter("other")


def test_merge_per_adapter_equals_peft():
    ours, theirs = llama_pair()
    batch = example_inputs("llama")
    ours.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    both = logits(ours, batch).detach()
    ours.merge_adapter(["other"])
    theirs.merge_adapter(["other"])
    # "other" is inside W now, "default" still runs as LoRA: the same function (fp32 rounding of W + delta)
    assert max_rel(logits(ours, batch), both) <= 1e-5
    status = ours.get_model_status()
    assert status.merged_adapters == ["other"]
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    merged_o = ours.merge_and_unload(adapter_names=["other"])
    merged_t = theirs.merge_and_unload(adapter_names=["other"])
    assert not any(isinstance(m, LoraLinear) for m in merged_o.modules())
    for (n, a), (_, b) in zip(merged_o.state_dict().items(), merged_t.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)  # W + delta in fp32 on both sides


def test_layer_and_model_status_equal_peft():
    ours, theirs = llama_pair()
    ours.set_adapter("other")
    theirs.set_adapter("other")
    ours.merge_adapter(["other"])
    theirs.merge_adapter(["other"])
    mine = {s.name: s for s in ours.get_layer_status()}
    ref = {s.name[len("model."):]: s for s in theirs.get_layer_status()}
    assert mine.keys() == ref.keys()
    fields = ["enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"]
    for name, s in mine.items():
        for f in fields:
            assert getattr(s, f) == getattr(ref[name], f), (name, f)
    mo, mt = ours.get_model_status(), theirs.get_model_status()
    for f in ["base_model_type", "peft_types", "trainable_params", "total_params", "num_adapter_layers",
              "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"]:
        assert getattr(mo, f) == getattr(mt, f), f
    assert mo.adapter_model_type == "LoraModel"


def test_print_and_counts_after_add_and_set():
    ours, theirs = llama_pair()
    for name in ("other", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        bufs = []
        for m in (ours, theirs):
            buf = stdio.StringIO()
            with contextlib.redirect_stdout(buf):
                m.print_trainable_parameters()
            bufs.append(buf.getvalue())
        assert bufs[0] == bufs[1]
        assert ours.trainable_parameters() == ours.get_nb_trainable_parameters()


def test_add_adapter_checks_before_changing_anything():
    ours, _ = llama_pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for name, cfg, err in [("other", LoraConfig(), "already exists"),
                           ("a.b", LoraConfig(), "not usable"), ("__base__", LoraConfig(), "not usable"),
                           ("new", LoraConfig(target_modules=["nothing"]), "matched no module"),
                           ("new", LoraConfig(bias="all"), None)]:
        if err is None:  # the first bias adapter is fine; a second one is refused (peft's rule)
            ours.add_adapter(name, cfg)
            with pytest.raises(ValueError, match="only one adapter may have bias"):
                ours.add_adapter("new2", LoraConfig(bias="lora_only"))
            continue
        with pytest.raises(ValueError, match=err):
            ours.add_adapter(name, cfg)
        assert ours.state_dict().keys() == before.keys()
    with pytest.raises(TypeError, match="argument order"):
        ours.add_adapter(LoraConfig(), "x")  # transformers' order (config first) is not peft's
    ours.add_adapter("from_peft", peft.LoraConfig(r=2, target_modules=["o_proj"]))  # a peft config works
    assert ours.peft_config["from_peft"].r == 2


# ---- peft's methods: ours, or refused by name (never forwarded to the HF model) --------------------
def _peft_names() -> set[str]:
    module_names = set(dir(torch.nn.Module))
    names = {n for n in dir(peft.PeftModel) if not n.startswith("_")}
    names |= {n for n in vars(PeftAdapterMixin) if not n.startswith("_")}
    names |= {n for n in dir(PeftTuner) if not n.startswith("_")}
    return names - module_names


def test_every_peft_method_is_ours_or_refused():
    ours = get_lora_model(build("llama"), LoraConfig(r=4))
    names = _peft_names()
    assert {"load_adapter", "add_adapter", "set_adapter", "push_to_hub", "active_adapters"} <= names
    implemented, refused = [], []
    for name in sorted(names):
        if hasattr(LoraModel, name) or name in vars(ours):
            implemented.append(name)
            continue
        with pytest.raises(AttributeError, match=f"LoraModel.{name}: not available in lorafuse"):
            getattr(ours, name)
        refused.append(name)
    assert "enable_peft_hotswap" in refused and "load_adapter" in implemented and "add_weighted_adapter" in implemented
    assert "push_to_hub" in implemented  # issue 14: the adapter only (tests/lora_core/test_hub.py)
    # the wrapped HF model has transformers' PeftAdapterMixin methods itself: forwarding would have
    # called those (the old "The version of PEFT ..." errors); ours answer instead
    for name in (n for n in vars(PeftAdapterMixin) if not n.startswith("_")):
        assert hasattr(type(ours.base_model), name), name
        assert name in implemented or name in refused, name


def test_load_adapter_is_ours_with_a_clear_error(tmp_path):
    ours = get_lora_model(build("llama"), LoraConfig(r=4))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ours.load_adapter(tmp_path / "missing" / "adapter", "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reaches transformers' own load_adapter
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ours.load_adapter(str(tmp_path / "nowhere"), "x")


TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not TRITON_OK, reason="the triton backend needs CUDA or TRITON_INTERPRET=1 (tests/kernels/"
                                          "conftest.py sets it at collection, so a full run covers this)")
def test_triton_backend_runs_the_active_adapter_and_falls_back_for_a_mixed_batch(monkeypatch):
    from lora_core import LoraAdapter
    from lora_core import layer as layer_module
    monkeypatch.setattr(layer_module, "_warned", set())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96, device=device, dtype=torch.bfloat16)
    layer = LoraLinear(base, r=4, init_lora_weights=False, backend="triton").eval()
    layer.add_adapter("other", LoraAdapter(64, 96, r=8, lora_alpha=4, init_lora_weights=False, device=device))
    x = torch.randn(3, 5, 64, device=device, dtype=torch.bfloat16)

    def run(kernel, **kw):
        layer.backend = kernel
        with torch.no_grad():
            return layer(x, **kw).float()
    # bf16 output: the triton kernel accumulates in a different order than torch's matmul (~1 bf16 ulp)
    tol = dict(rtol=2e-2, atol=2e-2)
    for name in ("default", "other"):
        layer.set_adapter(name)
        torch.testing.assert_close(run("triton"), run("torch"), **tol)
    names = ["other", "__base__", "default"]
    with pytest.warns(UserWarning, match="mixed batch.*PyTorch"):
        mixed = run("triton", adapter_names=names)
    torch.testing.assert_close(mixed, run("torch", adapter_names=names), **tol)


def test_mixed_batch_row_index_is_built_once_per_names():
    """Every wrapped layer (and every decode step) of a mixed batch asks for the same row groups:
    the index tensors are made once, in order of first appearance."""
    from lora_core.layer import row_groups

    names = ["b", "__base__", "b", "a"]
    groups = row_groups(names, torch.device("cpu"))
    assert list(groups) == ["b", "__base__", "a"]
    assert [groups[n].tolist() for n in groups] == [[0, 2], [1], [3]]
    again = row_groups(list(names), torch.device("cpu"))
    assert all(again[n] is groups[n] for n in groups)
