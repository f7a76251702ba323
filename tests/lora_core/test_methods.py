"""IA3, AdaLoRA, adaption prompts and prompt tuning against peft 0.21 on tiny models (fp32: exact).

Each case: the same seed gives the same trainable tensors and counts; the same outputs and
gradients; the same AdamW trajectory; peft's file loads into ours with equal outputs and ours
into peft. AdaLoRA runs long enough for its rank allocation to prune, and ends with peft's rank
pattern. Builders: tests/method_pairs.py.
"""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_core
from lora_core import io
from adapter_pairs import build, max_rel, no_cpu_repack
from method_pairs import CASES, adamw_losses, configs, inputs, pair, trainable
from tiny_models import load_tiny, save_tiny

IDS = [f"{m}-{a}" for m, a in CASES]


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_same_seed_same_weights_counts_outputs_and_grads(method, arch):
    ours, theirs = pair(method, arch)
    mine, ref = trainable(ours), trainable(theirs)
    assert [tuple(p.shape) for p in mine] == [tuple(p.shape) for p in ref]
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))  # same draws in the same order
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()  # trainable and total
    ours.train(), theirs.train()
    batch = inputs(arch)
    torch.manual_seed(5)  # GPT-2 / T5 have dropout: the same draws on both sides
    out = ours(**batch)
    torch.manual_seed(5)
    ref_out = theirs(**batch)
    assert out.logits.shape == ref_out.logits.shape  # prompt tuning: [b, n + seq, vocab] as peft
    assert torch.equal(out.logits, ref_out.logits)
    assert out.loss.item() == ref_out.loss.item()  # AdaLoRA: with peft's orthogonality term
    out.loss.backward()
    ref_out.loss.backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, ref))


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_files_both_ways(method, arch, tmp_path):
    ours, theirs = pair(method, arch)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    mine_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(mine_json) == set(ref_json)  # peft's fields, nothing of ours

    def norm(v):  # peft writes sets in set order, we sort them
        return sorted(v) if isinstance(v, list) else v
    # peft_version: we never invent one; fan_in_fan_out: peft rewrites it for Conv1D (GPT-2), we
    # set it per layer, as for LoRA
    assert {k for k in ref_json if norm(mine_json[k]) != norm(ref_json[k])} <= {"peft_version", "fan_in_fan_out"}
    mine_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(mine_sd) == set(ref_sd) and all(torch.equal(mine_sd[k], ref_sd[k]) for k in ref_sd)

    batch = inputs(arch, labels=False)
    theirs.eval()
    expected = theirs(**batch).logits
    loaded = lora_core.LoraModel.from_pretrained(build(arch), tmp_path / "peft")
    assert torch.equal(loaded(**batch).logits, expected)
    back = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ours")
    assert torch.equal(back(**batch).logits, expected)


@pytest.mark.parametrize("method", ["ia3", "adaption_prompt", "prompt_tuning"])
def test_adamw_trajectory_equals_peft(method):
    ours, theirs = pair(method, "llama")
    assert adamw_losses(ours, "llama", 4) == adamw_losses(theirs, "llama", 4)
    assert all(torch.equal(a, b) for a, b in zip(trainable(ours), trainable(theirs)))


def test_adalora_allocation_prunes_like_peft(tmp_path):
    """10 steps (total_step 8, tinit 1, tfinal 2): the budget falls from 4 to 2 per layer, E is masked
    where peft masks it, and both files hold only the kept triplets."""
    ours, theirs = pair("adalora", "llama", target_modules=["q_proj", "v_proj", "down_proj"])
    assert adamw_losses(ours, "llama", 10, allocate=True) == adamw_losses(theirs, "llama", 10, allocate=True)
    pattern = ours.peft_config["default"].rank_pattern
    ref = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert pattern == ref
    kept = [sum(v) for v in pattern.values()]
    assert sum(kept) == 2 * len(kept) and min(kept) < 4  # the target budget, and something was pruned

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"] == \
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    mine_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(torch.equal(mine_sd[k], ref_sd[k]) for k in ref_sd) and set(mine_sd) == set(ref_sd)
    assert mine_sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == kept[0]

    batch = inputs("llama", labels=False)
    from_peft = lora_core.LoraModel.from_pretrained(build("llama"), tmp_path / "peft")(**batch).logits
    from_ours = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")(**batch).logits
    assert torch.equal(from_peft, from_ours)
    ours.eval()
    # the pruned files sum fewer (zero) rank terms: fp32 summation order only
    assert max_rel(from_peft, ours(**batch).logits) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_merge_and_unmerge_equal_peft(arch):
    """W (and, for output scaling, the bias: GPT-2's Conv1D layers have one) scaled as peft scales them."""
    ours, theirs = pair("ia3", arch)
    ours.eval(), theirs.eval()
    batch = inputs(arch, labels=False)
    before = ours(**batch).logits
    ours.merge_adapter()
    theirs.merge_adapter()
    ref = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if ".base_layer." in name:
            assert torch.equal(p, ref["base_model.model." + name[len("base_model."):]]), name
    assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
    ours.unmerge_adapter()
    assert max_rel(ours(**batch).logits, before) < 1e-6  # divides by l + 1e-8, as peft


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_per_layer_methods_on_bitsandbytes_bases(method, quantization, tmp_path):
    """fp32 compute: ours dequantizes W exactly; nf4 then equals peft exactly, int8 within bnb's
    activation quantization (bnb's own int8 matmul, which peft calls, rounds x to int8)."""
    save_tiny("llama", tmp_path)
    theirs_cfg, ours_cfg = configs(method, "llama")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(no_cpu_repack(load_tiny(tmp_path, "llama", quantization)), theirs_cfg)
    torch.manual_seed(1)
    ours = lora_core.get_lora_model(load_tiny(tmp_path, "llama", quantization), ours_cfg)
    ours.train(), theirs.train()
    out, ref = ours(**inputs("llama")), theirs(**inputs("llama"))
    out.loss.backward(), ref.loss.backward()
    tol = 0.0 if quantization == "nf4" else 1e-5
    assert max_rel(out.logits, ref.logits) <= tol
    assert max(max_rel(a.grad, b.grad) for a, b in zip(trainable(ours), trainable(theirs))) <= 10 * tol + 1e-6


def test_ia3_on_nf4_with_bf16_compute_keeps_the_dtype(tmp_path):
    """peft 0.21's 4-bit IA3 layer returns fp32 for bf16 inputs (it takes the output dtype after its
    own upcast), and the next attention fails on mixed dtypes; ours returns the input's dtype."""
    save_tiny("llama", tmp_path)
    ours = lora_core.get_lora_model(load_tiny(tmp_path, "llama", "nf4", torch.bfloat16),
                                    configs("ia3", "llama")[1])
    out = ours(**inputs("llama"))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_triton_refuses_what_the_kernels_cannot_compute():
    ours, _ = pair("ia3", "llama")
    ours.set_backend("triton")
    with pytest.raises(ValueError, match="cannot run this ia3 adapter: the fused kernels have no row/column scale"):
        ours(**inputs("llama", labels=False))
    ours.set_backend("auto")  # auto: the base where it can, the scale in PyTorch
    assert torch.isfinite(ours(**inputs("llama", labels=False)).logits).all()


def test_prompt_tuning_generate_is_greedy_decoding_of_the_forward():
    """Ours continues the prompted sequence exactly as repeated full forwards do. peft 0.21's
    generate agrees on the first token, then drifts: it positions the generated tokens as if the
    virtual tokens were not there."""
    ours, theirs = pair("prompt_tuning", "llama")
    ours.eval(), theirs.eval()
    ids = inputs("llama", labels=False)["input_ids"]
    out = ours.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    seq = ids
    for _ in range(4):
        nxt = ours(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    ref = theirs.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, : ids.shape[1] + 1], ref[:, : ids.shape[1] + 1])


def test_prompt_tuning_loads_trainable_and_continues(tmp_path):
    ours, theirs = pair("prompt_tuning", "llama")
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        peft.PeftModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
    again = lora_core.LoraModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
    saved = again.prompt_encoder["default"].embedding.weight.detach().clone()
    assert torch.equal(saved, ours.prompt_encoder["default"].embedding.weight)
    assert again.trainable_parameters()[0] == 4 * 64
    adamw_losses(again, "llama", 1)
    assert not torch.equal(again.prompt_encoder["default"].embedding.weight, saved)


def test_zero_init_and_disable_give_the_base_model():
    base_logits = build("llama")(**inputs("llama", labels=False)).logits
    model = lora_core.get_lora_model(build("llama"), lora_core.AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    assert torch.equal(model(**inputs("llama", labels=False)).logits, base_logits)  # gates start at 0
    for method in ("adaption_prompt", "ia3", "prompt_tuning"):
        ours, _ = pair(method, "llama")
        ours.eval()
        assert not torch.equal(ours(**inputs("llama", labels=False)).logits[:, -8:], base_logits)
        with ours.disable_adapter():
            assert torch.equal(ours(**inputs("llama", labels=False)).logits, base_logits)


def test_configs_read_by_peft_type(tmp_path):
    for method, arch in [("ia3", "llama"), ("adalora", "llama"), ("adaption_prompt", "llama"),
                         ("prompt_tuning", "llama")]:
        theirs_cfg, ours_cfg = configs(method, arch)
        model = peft.get_peft_model(build(arch), theirs_cfg)
        model.save_pretrained(tmp_path / method)
        read = io.read_config(tmp_path / method)
        assert type(read) is type(ours_cfg)
        assert read.peft_type == str(theirs_cfg.peft_type.value)
        # a peft config object works too, through its fields
        assert lora_core.get_lora_model(build(arch), theirs_cfg).trainable_parameters() == \
            model.get_nb_trainable_parameters()
    (tmp_path / "loha").mkdir()
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type='LOHA': lorafuse does not implement this PEFT method"):
        io.read_config(tmp_path / "loha")


def test_method_checks_and_refusals():
    with pytest.raises(ValueError, match="total_step"):
        lora_core.AdaLoraConfig(init_r=4)
    with pytest.raises(ValueError, match="subset of target_modules"):
        lora_core.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="adapter_layers=3 but the model has only 2"):
        lora_core.get_lora_model(build("llama"), lora_core.AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(ValueError, match="model types"):
        lora_core.get_lora_model(build("t5"), lora_core.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    ia3, _ = pair("ia3", "llama")
    with pytest.raises(ValueError, match="cannot be added to them"):
        ia3.add_adapter("lora", lora_core.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="combines LoRA adapters"):
        ia3.add_weighted_adapter(["default"], [1.0], "mix")
    prompt, _ = pair("prompt_tuning", "llama")
    with pytest.raises(ValueError, match="nothing to merge"):
        prompt.merge_adapter()
    with pytest.raises(ValueError, match="for a trainable AdaLoRA adapter"):
        ia3.update_and_allocate(0)
    assert prompt.get_prompt(3).shape == (3, 4, 64)
    with pytest.raises(ValueError, match="not a prompt-tuning adapter"):
        ia3.get_prompt(1)


def test_ia3_all_linear_files_load_both_ways(tmp_path):
    """peft 0.21 cannot reload its own IA3 file for target_modules='all-linear' (targets saved as paths,
    feedforward_modules as names, compared literally). Ours reads it; ours writes the feed-forward
    targets as paths, which peft reads."""
    theirs = peft.get_peft_model(build("llama"), peft.IA3Config(target_modules="all-linear", init_ia3_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="should be a subset"):
        peft.PeftModel.from_pretrained(build("llama"), tmp_path / "peft")
    batch = inputs("llama", labels=False)
    ours = lora_core.LoraModel.from_pretrained(build("llama"), tmp_path / "peft")
    assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    assert torch.equal(back(**batch).logits, theirs(**batch).logits)


def test_status_of_layer_methods_equals_peft_and_prompt_methods_are_refused():
    for method in ("ia3", "adalora"):
        ours, theirs = pair(method, "llama")
        mine, ref = ours.get_model_status(), theirs.get_model_status()
        assert (mine.num_adapter_layers, mine.trainable_params, mine.total_params) == \
            (ref.num_adapter_layers, ref.trainable_params, ref.total_params)
    ours, _ = pair("prompt_tuning", "llama")
    with pytest.raises(TypeError, match="have none"):
        ours.get_model_status()


def test_adalora_eval_loss_is_the_task_loss():
    """peft adds the orthogonality term to every loss it returns, eval included; ours adds it in
    training mode only, so an eval loss compares across methods."""
    ours, theirs = pair("adalora", "llama")
    ours.eval(), theirs.eval()
    batch = inputs("llama")
    task = torch.nn.functional.cross_entropy(ours(**batch).logits[:, :-1].reshape(-1, 128),
                                             batch["labels"][:, 1:].reshape(-1))
    assert torch.allclose(ours(**batch).loss, task) and theirs(**batch).loss > task + 1.0


def test_ia3_merges_into_a_4bit_base_within_its_requantization(tmp_path):
    """peft does not merge IA3 into bitsandbytes layers; ours re-quantizes W * l (lossy, reported)."""
    save_tiny("llama", tmp_path)
    ours = lora_core.get_lora_model(load_tiny(tmp_path, "llama", "nf4"), configs("ia3", "llama")[1])
    batch = inputs("llama", labels=False)
    before = ours(**batch).logits
    errors = ours.merge_adapter()
    assert errors and max(errors.values()) > 0  # the re-quantization error, per layer
    assert max_rel(ours(**batch).logits, before) < 0.1  # nf4 steps of W * l, not a wrong scale


def test_mixed_batch_of_two_ia3_adapters_equals_each_alone():
    """peft has no mixed batch for IA3; ours runs each row through its own adapter (the input-side
    scale of down_proj included) and "__base__" rows through the base."""
    ours, _ = pair("ia3", "llama")
    torch.manual_seed(3)
    ours.add_adapter("other", lora_core.IA3Config(init_ia3_weights=False))
    ours.eval()
    ids = inputs("llama", labels=False)["input_ids"]
    ids = torch.cat([ids, ids[:1]])  # 3 rows
    mixed = ours(input_ids=ids, adapter_names=["other", "default", "__base__"]).logits
    for row, name in enumerate(["other", "default"]):
        ours.set_adapter(name)
        assert torch.equal(mixed[row], ours(input_ids=ids[row:row + 1]).logits[0])
    with ours.disable_adapter():
        assert torch.equal(mixed[2], ours(input_ids=ids[2:3]).logits[0])


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_model_status_names_the_method_as_peft_does(method):
    ours, theirs = pair(method, "llama")
    assert ours.get_model_status().peft_types == theirs.get_model_status().peft_types == {
        "default": {"ia3": "IA3", "adalora": "ADALORA"}[method]}
