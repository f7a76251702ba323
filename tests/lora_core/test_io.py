"""PEFT-format adapters both ways (issue 2, "What must be shown" 3 and the adapter parts of 5).

Every round trip perturbs all trainable tensors (LoRA A and B, trained biases, modules_to_save
copies) with noise first, so an adapter that loaded nothing, or loaded a tensor into the wrong place,
changes the output and fails the test.

Tolerance for output comparisons: ATOL = RTOL = 1e-5. Both sides hold bit-identical weights and run
the same fp32 math (base matmul + scaling * B(A x)); 4-bit bases are dequantized exactly by both
(bitsandbytes' CPU repacking path, which rounds absmax to bf16, is switched off on the peft side as
lora_core switches it off on ours). What remains is fp32 reassociation if the two stacks order the
adds differently: ~1e-7 relative per op, far below 1e-5, while a missing or misplaced adapter
tensor moves the logits by > 1e-2 (asserted as `EFFECT`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_core
import lora_core.io as lio
from lora_core import LoraConfig, LoraLinear, LoraModel, get_lora_model
from tiny_models import example_inputs, load_tiny, save_tiny

ATOL = RTOL = 1e-5
EFFECT = 1e-2  # the adapter must move the logits by at least this much, or the test proves nothing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> saved tiny model directory (built once per module)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = save_tiny(arch, root / arch)
        return cache[arch]
    return get


def _load(path, arch, quant="none"):
    model = load_tiny(path, arch, quant)
    _no_bnb_cpu_repack(model)
    return model


def _no_bnb_cpu_repack(model):
    # bitsandbytes' eval-mode CPU path repacks 4-bit weights in place and computes in bf16; peft's
    # layers call it, ours never do. Switch it off so both stacks dequantize exactly (see ATOL).
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _perturb(model, seed=0):
    """Add noise to every trainable tensor: LoRA A/B, trained biases, modules_to_save copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_((0.2 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _logits(model, arch):
    with torch.no_grad():
        return model(**example_inputs(arch)).logits.float()


def _disk(directory) -> dict[str, tuple[list, str]]:
    """{key: (shape, dtype)} of an adapter's safetensors file, and check its metadata."""
    with safe_open(str(Path(directory) / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}


def _snapshot(model):
    """Everything a failed load must leave alone: module types and every tensor's value."""
    types = [(n, type(m)) for n, m in model.named_modules()]
    tensors = {k: t.detach().clone() for k, t in lio._tensors(model)}
    return types, tensors


def _assert_unchanged(model, snap):
    types, tensors = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    now = dict(lio._tensors(model))
    assert now.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(now[k], t), k


# (arch, quantization, bias, modules_to_save): dense Llama / GPT-2 (Conv1D) / T5, nf4 Llama and
# GPT-2, each bias mode, modules_to_save on an output head and on a module with a bias.
CASES = [
    ("llama", "none", "none", None),
    ("llama", "none", "none", ["lm_head"]),
    ("gpt2", "none", "all", ["ln_f"]),
    ("gpt2", "none", "lora_only", None),
    ("t5", "none", "none", None),
    ("llama", "nf4", "none", ["lm_head"]),
    ("gpt2", "nf4", "all", None),
]


@pytest.mark.parametrize("arch,quant,bias,mts", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_peft_format_both_ways(tiny, tmp_path, arch, quant, bias, mts):
    path = tiny(arch)
    kwargs = dict(r=4, lora_alpha=8, bias=bias, modules_to_save=mts)

    # ours -> disk -> peft
    base = _load(path, arch, quant)
    base_logits = _logits(base, arch)
    ours = get_lora_model(base, LoraConfig(**kwargs))
    _perturb(ours, seed=1)
    ours_logits = _logits(ours, arch)
    assert (ours_logits - base_logits).abs().max() > EFFECT
    ours.save_pretrained(tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(_load(path, arch, quant), tmp_path / "ours")
    torch.testing.assert_close(_logits(in_peft, arch), ours_logits, atol=ATOL, rtol=RTOL)

    # peft -> disk -> ours
    theirs = peft.get_peft_model(_load(path, arch, quant), peft.LoraConfig(**kwargs))
    _perturb(theirs, seed=2)
    theirs_logits = _logits(theirs, arch)
    assert (theirs_logits - base_logits).abs().max() > EFFECT
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = LoraModel.from_pretrained(_load(path, arch, quant), tmp_path / "theirs")
    torch.testing.assert_close(_logits(in_ours, arch), theirs_logits, atol=ATOL, rtol=RTOL)

    # Same files: the same keys, shapes and dtypes as peft writes for the same config.
    assert _disk(tmp_path / "ours") == _disk(tmp_path / "theirs")
    # Loaded for inference: frozen and in eval mode, like peft's default.
    assert not any(p.requires_grad for p in in_ours.parameters())
    assert not in_ours.training


def test_adapter_config_is_peft_config(tiny, tmp_path):
    """Our adapter_config.json has no key peft's LoraConfig lacks and reads back as the same config."""
    path = tiny("llama")
    ours = get_lora_model(_load(path, "llama"), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1,
                                                           target_modules=["q_proj", "o_proj"]))
    ours.save_pretrained(tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    peft_fields = {f.name for f in peft.LoraConfig.__dataclass_fields__.values()}
    assert set(written) <= peft_fields, set(written) - peft_fields
    assert written["inference_mode"] is True
    assert written["base_model_name_or_path"] == str(path)
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.peft_type) == (4, 16, 0.1, peft.PeftType.LORA)
    assert set(cfg.target_modules) == {"q_proj", "o_proj"}
    # read_config gives back our config for both writers.
    assert lio.read_config(tmp_path / "a").target_modules == {"q_proj", "o_proj"}
    # Files get the mode of any new file (safetensors alone would leave the weights 0600, which
    # another user serving the adapter could not read).
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o666 & ~umask, name


def test_transformers_load_adapter(tiny, tmp_path):
    """transformers' own `model.load_adapter(dir)` (backed by peft) reads our adapter."""
    path = tiny("llama")
    ours = get_lora_model(_load(path, "llama"), LoraConfig(r=4, modules_to_save=["lm_head"]))
    _perturb(ours, seed=3)
    ours.save_pretrained(tmp_path / "a")
    hf = _load(path, "llama")
    hf.load_adapter(str(tmp_path / "a"))
    torch.testing.assert_close(_logits(hf, "llama"), _logits(ours, "llama"), atol=ATOL, rtol=RTOL)


def test_bin_weights_and_trainable_load(tiny, tmp_path):
    """adapter_model.bin (peft's safe_serialization=False) loads; is_trainable=True keeps it trainable."""
    path = tiny("gpt2")
    theirs = peft.get_peft_model(_load(path, "gpt2"), peft.LoraConfig(r=4, bias="lora_only"))
    _perturb(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    ours = LoraModel.from_pretrained(_load(path, "gpt2"), tmp_path / "a", is_trainable=True)
    torch.testing.assert_close(_logits(ours, "gpt2"), _logits(theirs, "gpt2"), atol=ATOL, rtol=RTOL)
    trainable = {n for n, p in ours.base_model.named_parameters() if p.requires_grad}
    # peft's "P.lora_A.default.weight" is our "P.adapters.default.lora_A.weight"
    assert trainable == {re.sub(r"\.(lora_[AB])\.default\.", r".adapters.default.\1.", n)
                         for n, p in theirs.base_model.model.named_parameters() if p.requires_grad}
    assert any(n.endswith("c_attn.base_layer.bias") for n in trainable)  # bias="lora_only" trains it
    assert ours.lora_config.inference_mode is False


def test_hub_only_for_repo_ids(tiny, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub (mocked here: tests never reach the hub); a missing
    local path never does."""
    import huggingface_hub
    path = tiny("llama")
    ours = get_lora_model(_load(path, "llama"), LoraConfig(r=4))
    _perturb(ours, seed=5)
    ours.save_pretrained(tmp_path / "a")
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "a")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    loaded = LoraModel.from_pretrained(_load(path, "llama"), "someone/tiny-adapter")
    assert calls == [("someone/tiny-adapter",
                      ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"))]
    torch.testing.assert_close(_logits(loaded, "llama"), _logits(ours, "llama"), atol=ATOL, rtol=RTOL)

    calls.clear()
    base = _load(path, "llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoraModel.from_pretrained(base, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoraModel.from_pretrained(base, "./missing/adapter")
    assert calls == []


# ---- bad input -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_adapter(tiny, tmp_path_factory):
    """A llama adapter (r=8, q_proj + v_proj) with non-zero B."""
    d = tmp_path_factory.mktemp("good") / "adapter"
    ours = get_lora_model(_load(tiny("llama"), "llama"), LoraConfig(r=8))
    _perturb(ours, seed=6)
    ours.save_pretrained(d)
    return d


def test_missing_files(tiny, good_adapter, tmp_path):
    base = _load(tiny("llama"), "llama")
    snap = _snapshot(base)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    weights = (good_adapter / "adapter_model.safetensors").read_bytes()
    (no_config / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(FileNotFoundError, match=r"no_config.*has no adapter_config\.json"):
        LoraModel.from_pretrained(base, no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good_adapter / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no weights file: expected adapter_model\.safetensors "
                                                r"\(or adapter_model\.bin\)"):
        LoraModel.from_pretrained(base, no_weights)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoraModel.from_pretrained(base, tmp_path / "nowhere")
    _assert_unchanged(base, snap)


def test_shape_mismatch_names_modules_and_shapes(good_adapter):
    """An r=8 adapter for hidden size 64 on a Llama with hidden size 128: refused, model unchanged."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    wider = transformers.LlamaForCausalLM(cfg).eval()
    snap = _snapshot(wider)
    with pytest.raises(ValueError) as err:
        LoraModel.from_pretrained(wider, good_adapter)
    msg = str(err.value)
    assert "lora_A of model.layers.0.self_attn.q_proj: adapter [8, 64] vs model [8, 128]" in msg
    assert "lora_B of model.layers.1.self_attn.v_proj: adapter [32, 8] vs model [64, 8]" in msg
    assert "model was not changed" in msg
    _assert_unchanged(wider, snap)


def test_module_name_mismatch(tiny, good_adapter, tmp_path):
    """Keys for a module the config does not adapt, or a config matching nothing: refused by name."""
    base = _load(tiny("llama"), "llama")
    snap = _snapshot(base)
    bad = tmp_path / "renamed"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good_adapter / "adapter_config.json").read_text())
    sd = load_file(str(good_adapter / "adapter_model.safetensors"))
    sd = {k.replace("layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in sd.items()}
    save_file(sd, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LoraModel.from_pretrained(base, bad)
    msg = str(err.value)
    assert "model.layers.7.self_attn.q_proj.lora_A.weight" in msg  # unexpected
    assert "model.layers.0.self_attn.q_proj.lora_B.weight" in msg  # missing
    _assert_unchanged(base, snap)

    gpt2_adapter = tmp_path / "gpt2"
    get_lora_model(_load(tiny("gpt2"), "gpt2"), LoraConfig(r=4)).save_pretrained(gpt2_adapter)
    with pytest.raises(ValueError, match=r"does not fit this LlamaForCausalLM.*c_attn.*matched no module"):
        LoraModel.from_pretrained(base, gpt2_adapter)
    _assert_unchanged(base, snap)


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    """A failure while writing leaves the previous adapter intact and no temporary files behind."""
    path = tiny("llama")
    target = tmp_path / "adapter"
    first = get_lora_model(_load(path, "llama"), LoraConfig(r=4))
    _perturb(first, seed=7)
    first.save_pretrained(target)
    (target / "README.md").write_text("kept")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    second = get_lora_model(_load(path, "llama"), LoraConfig(r=8))
    _perturb(second, seed=8)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(lio, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        second.save_pretrained(target)
    with pytest.raises(OSError, match="No space left"):
        second.save_pretrained(tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dir, no half "fresh"

    monkeypatch.undo()
    second.save_pretrained(target)  # a good save replaces the adapter and keeps the other files
    assert (target / "README.md").read_text() == "kept"
    assert lio.read_config(target).r == 8
    with pytest.raises(NotADirectoryError):
        second.save_pretrained(target / "README.md")


# ---- several adapters (issue 12) -------------------------------------------------------------------
TWO = {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
       "other": dict(r=8, lora_alpha=4, target_modules=["k_proj", "v_proj"])}


def _two_adapters(model, lib, seed):
    """`model` wrapped by lib (lora_core or peft) with TWO's adapters, every trainable tensor noised."""
    first, *rest = TWO.items()
    if lib is peft:
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**first[1]))
    else:
        wrapped = get_lora_model(model, LoraConfig(**first[1]))
    for name, cfg in rest:
        wrapped.add_adapter(name, (peft.LoraConfig if lib is peft else LoraConfig)(**cfg))
    for name in TWO:
        wrapped.set_adapter(name)  # make each trainable in turn, so _perturb reaches it
        _perturb(wrapped, seed=seed + len(name))
    wrapped.set_adapter("default")
    return wrapped


def _per_adapter_logits(model, arch="llama"):
    out = {}
    for name in TWO:
        model.set_adapter(name)
        out[name] = _logits(model, arch)
    return out


def test_two_adapters_both_ways_with_peft(tiny, tmp_path):
    path = tiny("llama")
    ours = _two_adapters(_load(path, "llama"), lora_core, seed=10)
    want = _per_adapter_logits(ours)
    ours.save_pretrained(tmp_path / "ours")
    # peft's layout: "default" at the root, "other" in its own folder
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "other"]
    in_peft = peft.PeftModel.from_pretrained(_load(path, "llama"), tmp_path / "ours")
    in_peft.load_adapter(tmp_path / "ours" / "other", "other")
    for name, logits in _per_adapter_logits(in_peft).items():
        torch.testing.assert_close(logits, want[name], atol=ATOL, rtol=RTOL)

    theirs = _two_adapters(_load(path, "llama"), peft, seed=20)
    want = _per_adapter_logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = LoraModel.from_pretrained(_load(path, "llama"), tmp_path / "theirs")
    in_ours.load_adapter(tmp_path / "theirs" / "other", "other")
    assert not in_ours.training and in_ours.trainable_parameters()[0] == 0
    for name, logits in _per_adapter_logits(in_ours).items():
        torch.testing.assert_close(logits, want[name], atol=ATOL, rtol=RTOL)
    # the same files as peft writes, adapter by adapter
    assert _disk(tmp_path / "ours") == _disk(tmp_path / "theirs")
    assert _disk(tmp_path / "ours" / "other") == _disk(tmp_path / "theirs" / "other")


def test_selected_adapters_and_trainable_load(tiny, tmp_path):
    path = tiny("llama")
    ours = _two_adapters(_load(path, "llama"), lora_core, seed=30)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    ours.save_pretrained(tmp_path / "out", selected_adapters=["other"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other", "tokenizer.json"]
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        ours.save_pretrained(tmp_path / "out2", selected_adapters=["nope"])
    assert not (tmp_path / "out2").exists()

    theirs = peft.get_peft_model(_load(path, "llama"), peft.LoraConfig(**TWO["default"]))
    theirs.load_adapter(str(tmp_path / "out" / "other"), "other", is_trainable=True)
    mine = get_lora_model(_load(path, "llama"), LoraConfig(**TWO["default"]))
    mine.load_adapter(tmp_path / "out" / "other", "other", is_trainable=True)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert mine.training  # is_trainable: left in train mode, as peft
    with pytest.raises(ValueError, match="already exists"):
        mine.load_adapter(tmp_path / "out" / "other", "other")


def test_load_adapter_checks_before_changing_the_model(tiny, tmp_path):
    """A second adapter whose shapes do not fit is refused with the model (and its first adapter)
    exactly as it was."""
    path = tiny("llama")
    other = tmp_path / "wide"
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    get_lora_model(transformers.LlamaForCausalLM(cfg), LoraConfig(r=2)).save_pretrained(other)
    model = get_lora_model(_load(path, "llama"), LoraConfig(r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_A of model.layers.0.self_attn.q_proj: adapter \[2, 128\]"):
        model.load_adapter(other, "wide")
    assert set(model.peft_config) == {"default"}
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- issue 9 items that live in lora_core --------------------------------------------------------------
def test_save_after_merge_and_unload_is_refused(tiny, good_adapter, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(good_adapter, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model = LoraModel.from_pretrained(_load(tiny("llama"), "llama"), target)
    model.merge_and_unload()
    with pytest.raises(ValueError, match="nothing to save"):
        model.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_refused_by_name(tiny, good_adapter, tmp_path, bad):
    d = tmp_path / "bad"
    shutil.copytree(good_adapter, d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key][3, 1] = bad
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = _load(tiny("llama"), "llama")
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=f"NaN or inf: \\['{re.escape(key)}'\\]"):
        LoraModel.from_pretrained(base, d)
    _assert_unchanged(base, snap)


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_lora_alpha_refused(tiny, good_adapter, tmp_path, alpha):
    d = tmp_path / "bad"
    shutil.copytree(good_adapter, d)
    text = (d / "adapter_config.json").read_text()
    (d / "adapter_config.json").write_text(re.sub(r'"lora_alpha": [^,]+', f'"lora_alpha": {alpha}', text))
    with pytest.raises(ValueError, match="lora_alpha=.*finite number"):
        LoraModel.from_pretrained(_load(tiny("llama"), "llama"), d)


def test_non_object_config_is_one_clear_error(tiny, good_adapter, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(good_adapter, d)
    for text in ('[{"r": 8}]', '"r=8"', "8"):
        (d / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match="not an object of LoraConfig fields"):
            LoraModel.from_pretrained(_load(tiny("llama"), "llama"), d)


def test_corrupt_bin_says_corrupt_and_never_weights_only_false(tiny, good_adapter, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text((good_adapter / "adapter_config.json").read_text())
    for garbage in (b"garbage\x00\x01 not a pickle", b"PK\x03\x04 truncated zip"):
        (d / "adapter_model.bin").write_bytes(garbage)
        with pytest.raises(ValueError, match="corrupt") as err:
            LoraModel.from_pretrained(_load(tiny("llama"), "llama"), d)
        assert "weights_only" not in str(err.value) and "re-save" in str(err.value)
