"""Bottleneck adapters in astraios' format (`peft_type: "BOTTLENECK"`, the fork of peft that
`bigcode/astraios-7b-parallel` was trained with; today's peft cannot load it).

No fork to compare against here: a file written in its format (its config fields, its state-dict
keys, `.bin` as it saves) must load and give exactly the formula of the fork's
`peft/src/peft/tuners/bottleneck.py`, written out below with forward hooks on a plain model.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_core
from adapter_pairs import build
from method_pairs import tiny_starcoder

B = 16  # bottleneck size


def astraios_parallel(folder, model, fmt="bin", scaling=1.0, seed=3):
    """An adapter folder as the fork writes it for a parallel adapter on c_attn (and q_attn, which a
    model without cross-attention lacks, as in astraios-7b-parallel's config). Returns the tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"base_model_name_or_path": "bigcode/starcoderbase", "bias": "none", "bottleneck_size": B,
              "inference_mode": True, "init_weights": "bert", "modules_to_save": None, "non_linearity": "tanh",
              "adapter_dropout": 0.0, "peft_type": "BOTTLENECK", "revision": None, "scaling": scaling,
              "target_modules": ["c_attn", "q_attn"], "task_type": "CAUSAL_LM", "use_adapterp": False,
              "use_parallel_adapter": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(model.transformer.h):
        lin = block.attn.c_attn
        key = f"base_model.model.transformer.h.{i}.attn.c_attn"
        sd[f"{key}.adapter_down.weight"] = 0.1 * torch.randn(B, lin.in_features, generator=g)   # [b, in]
        sd[f"{key}.adapter_up.weight"] = 0.1 * torch.randn(lin.out_features, B, generator=g)    # [out, b]
        if scaling == "learned":
            sd[f"{key}.adapter_scaling"] = torch.tensor([0.5 + i])
    if fmt == "bin":
        torch.save(sd, folder / "adapter_model.bin")
    else:
        save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sd


def formula_model(model, sd, act=torch.tanh):
    """The fork's parallel form on `model` by hooks: y + adapter_up(act(adapter_down(x.float()))).to(y.dtype) * s."""
    for i, block in enumerate(model.transformer.h):
        key = f"base_model.model.transformer.h.{i}.attn.c_attn"
        down, up = sd[f"{key}.adapter_down.weight"], sd[f"{key}.adapter_up.weight"]
        s = sd.get(f"{key}.adapter_scaling", 1.0)

        def hook(module, inp, y, down=down, up=up, s=s):
            return y + (act(inp[0].float() @ down.T) @ up.T).to(y.dtype) * s
        block.attn.c_attn.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("fmt,dtype", [("bin", torch.float32), ("safetensors", torch.float32),
                                       ("bin", torch.bfloat16)])
def test_astraios_parallel_adapter_loads_and_equals_the_formula(tmp_path, fmt, dtype):
    sd = astraios_parallel(tmp_path / "adapter", tiny_starcoder(), fmt)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model = lora_core.LoraModel.from_pretrained(tiny_starcoder().to(dtype), tmp_path / "adapter")
    expected = formula_model(tiny_starcoder().to(dtype), sd)(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, expected)  # bf16 too: the adapter in fp32, cast back
    assert sorted(model.peft_config["default"].target_modules) == ["c_attn", "q_attn"]
    assert model.trainable_parameters()[0] == 0  # loaded for inference, as peft does


def test_saves_in_the_same_format_and_trains(tmp_path):
    sd = astraios_parallel(tmp_path / "adapter", tiny_starcoder(), scaling="learned")
    model = lora_core.LoraModel.from_pretrained(tiny_starcoder(), tmp_path / "adapter", is_trainable=True)
    model.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    fork_fields = {"base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode",
                   "bottleneck_size", "non_linearity", "adapter_dropout", "target_modules", "use_parallel_adapter",
                   "use_adapterp", "scaling", "bias", "init_weights", "modules_to_save"}
    assert set(written) == fork_fields and written["scaling"] == "learned"
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)

    # trainable: down, up and the learned scale of each layer
    n = sum(t.numel() for t in sd.values())
    assert model.trainable_parameters()[0] == n
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_a_new_parallel_adapter_starts_as_the_base_with_mam_init():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    base = tiny_starcoder()(input_ids=ids).logits
    cfg = lora_core.BottleneckConfig(bottleneck_size=B, use_parallel_adapter=True, init_weights="mam_adapter")
    model = lora_core.get_lora_model(tiny_starcoder(), cfg)  # targets: the fork's default for gpt_bigcode
    assert sorted(model.peft_config["default"].target_modules) == ["c_attn"]
    assert torch.equal(model(input_ids=ids).logits, base)  # adapter_up starts at zero
    bert = lora_core.get_lora_model(tiny_starcoder(), lora_core.BottleneckConfig(bottleneck_size=B,
                                                                                 use_parallel_adapter=True))
    assert not torch.equal(bert(input_ids=ids).logits, base)  # "bert": both N(0, 0.02)


def test_serial_adapters_follow_the_forks_placement():
    """Llama, use_parallel_adapter=False: gate_proj / up_proj get the adapter on their input
    ("mh_adapter"), down_proj on its output ("output_adapter"), as the fork's table says."""
    cfg = lora_core.BottleneckConfig(bottleneck_size=B, non_linearity="relu", target_modules=["gate_proj", "down_proj"],
                                     scaling=0.5)
    model = lora_core.get_lora_model(build("llama"), cfg)
    ref = build("llama")
    for path, layer in model.lora_layers().items():
        a = layer.adapters["default"]
        with torch.no_grad():
            a.adapter_up.weight.normal_(0, 0.05)
        down, up = a.adapter_down.weight.detach(), a.adapter_up.weight.detach()
        branch = (lambda h, down=down, up=up: (torch.relu(h.float() @ down.T) @ up.T).to(h.dtype) * 0.5)
        target = ref.get_submodule(path)
        if path.endswith("gate_proj"):
            assert (down.shape, up.shape) == ((B, 64), (64, B))  # in -> b -> in
            target.register_forward_pre_hook(lambda m, inp, branch=branch: (inp[0] + branch(inp[0]),))
        else:
            assert (down.shape, up.shape) == ((B, 64), (64, B))  # out -> b -> out
            target.register_forward_hook(lambda m, inp, y, branch=branch: y + branch(y))
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    with pytest.raises(ValueError, match="places serial adapters only on"):
        lora_core.get_lora_model(build("llama"), lora_core.BottleneckConfig(target_modules=["q_proj"]))


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ValueError, match="only bias='none'"):
        lora_core.BottleneckConfig(bias="all")
    with pytest.raises(ValueError, match="not an ACT2FN name"):
        lora_core.BottleneckConfig(non_linearity="swishy")
    astraios_parallel(tmp_path / "adapter", tiny_starcoder())
    model = lora_core.LoraModel.from_pretrained(tiny_starcoder(), tmp_path / "adapter")
    with pytest.raises(ValueError, match="not linear, so it has no weight delta to merge"):
        model.merge_adapter()
    model.set_backend("triton")
    with pytest.raises(ValueError, match="needs an activation on u"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
