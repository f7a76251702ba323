"""Embedding LoRA (issue 14): peft's `lora_embedding_A` / `lora_embedding_B`, equal to peft.

fp32 throughout. Same seed -> the same draws as peft (randn A, randn B, then A zeros and B ~ N(0, 1)).
Outputs are compared exactly where both sides run the same ops in the same order (the lookup,
one matmul, one scale, one add); gradients within 1e-6 relative (summation order in backward).
"""
from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapter_pairs import build, max_rel
from lora_core import LoraConfig, LoraEmbedding, LoraModel, get_lora_model
from tiny_models import example_inputs

TARGETS = ["embed_tokens", "q_proj"]
PEFT_KEY = "base_model.model.model.embed_tokens.lora_embedding_{}.default"
OUR_KEY = "base_model.model.embed_tokens.adapters.default.lora_embedding_{}"


def _pair(init=False, seed=3, **extra):
    """Ours and peft's tiny Llama with LoRA on embed_tokens and q_proj, built from the same seed."""
    cfg = dict(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=init, **extra)
    torch.manual_seed(seed)
    ours = get_lora_model(build("llama"), LoraConfig(**cfg))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(**cfg))
    return ours, theirs


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_same_seed_same_weights_as_peft(init):
    ours, theirs = _pair(init=init)
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for ab in "AB":
        assert torch.equal(mine[OUR_KEY.format(ab)], ref[PEFT_KEY.format(ab)])
    assert mine[OUR_KEY.format("A")].shape == (4, 128) and mine[OUR_KEY.format("B")].shape == (64, 4)
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()
    layer = ours.base_model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding) and layer.lora_A == {} and set(layer.lora_embedding_A) == {"default"}


def test_forward_and_gradients_equal_peft():
    ours, theirs = _pair(init=False)
    ours.train()
    theirs.train()
    batch = example_inputs("llama")
    a, b = ours(**batch), theirs(**batch)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for ab in "AB":
        assert max_rel(mine[OUR_KEY.format(ab)].grad, ref[PEFT_KEY.format(ab)].grad) <= 1e-6
    base_logits = build("llama")(**batch).logits
    assert (a.logits - base_logits).abs().max() > 1e-2  # the embedding adapter matters


def test_files_both_ways(tmp_path):
    ours, theirs = _pair(init=False)
    batch = example_inputs("llama")
    with torch.no_grad():
        expected = ours(**batch).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    mine_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    lora_keys = {k: v for k, v in peft_file.items() if ".lora_" in k}
    assert set(mine_file) == set(lora_keys)  # peft also writes the whole base embedding; we do not
    for k, v in lora_keys.items():
        assert torch.equal(mine_file[k], v)
    with torch.no_grad():
        by_peft = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")(**batch).logits
        by_ours = LoraModel.from_pretrained(build("llama"), tmp_path / "peft")(**batch).logits
    assert torch.equal(by_peft, expected)
    assert torch.equal(by_ours, expected)


def test_shape_mismatch_named_and_model_untouched(tmp_path):
    ours, _ = _pair(init=False)
    ours.save_pretrained(tmp_path / "a")
    base = build("llama")
    base.resize_token_embeddings(192)
    with pytest.raises(ValueError, match=r"lora_embedding_A of model.embed_tokens: adapter \[4, 128\] vs model \[4, 192\]"):
        LoraModel.from_pretrained(base, tmp_path / "a")
    assert isinstance(base.model.embed_tokens, nn.Embedding) and not isinstance(base.model.embed_tokens, LoraEmbedding)


def test_merge_and_unmerge_equal_peft():
    ours, theirs = _pair(init=False)
    batch = example_inputs("llama")
    with torch.no_grad():
        before = ours(**batch).logits
        ours.merge_adapter()
        theirs.merge_adapter()
        merged = ours(**batch).logits
        assert torch.equal(ours.base_model.model.embed_tokens.base_layer.weight,
                           theirs.base_model.model.model.embed_tokens.base_layer.weight)
        assert torch.equal(merged, theirs(**batch).logits)
        assert max_rel(merged, before) <= 1e-5  # W + delta in fp32 against the unmerged sum
        ours.unmerge_adapter()
        assert max_rel(ours(**batch).logits, before) <= 1e-5


def test_mixed_batch_and_disable_equal_peft():
    ours, theirs = _pair(init=False)
    for model, add in ((ours, lambda n, c: ours.add_adapter(n, LoraConfig(**c))),
                       (theirs, lambda n, c: theirs.add_adapter(n, peft.LoraConfig(**c)))):
        torch.manual_seed(5)
        add("other", dict(target_modules=["embed_tokens"], r=2, init_lora_weights=False))
    ours.eval()
    theirs.eval()
    batch = example_inputs("llama", batch=3)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        a = ours(input_ids=batch["input_ids"], adapter_names=names).logits
        b = theirs(input_ids=batch["input_ids"], adapter_names=names).logits
        assert torch.equal(a, b)
        base = build("llama")(input_ids=batch["input_ids"]).logits
        assert torch.equal(a[2], base[2])
        with ours.disable_adapter():
            assert torch.equal(ours(input_ids=batch["input_ids"]).logits, base)


def test_padding_idx_row_gets_no_gradient():
    """The lookups take the base's padding_idx, so A's column for the pad id gets no gradient (peft's
    F.embedding call); a batch with pad ids still matches peft."""
    import transformers
    from tiny_models import ARCHS
    cfg_cls, kwargs, model_cls = ARCHS["llama"]

    def base():
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs, pad_token_id=0))
    cfg = dict(target_modules=["embed_tokens"], r=4, init_lora_weights=False)
    torch.manual_seed(1)
    ours = get_lora_model(base(), LoraConfig(**cfg))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**cfg))
    ids = torch.tensor([[0, 5, 7, 0], [3, 0, 9, 11]])
    a, b = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    grad_a = ours.base_model.model.embed_tokens.adapters["default"].lora_embedding_A.grad  # [r, V]
    assert grad_a[:, 0].abs().max() == 0 and grad_a[:, 5].abs().max() > 0
    assert max_rel(grad_a, theirs.base_model.model.model.embed_tokens.lora_embedding_A["default"].grad) <= 1e-6


class _Scaled(nn.Embedding):
    """An embedding that scales its output, as Gemma's (embed_scale, a scalar buffer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(8.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = _Scaled(50, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_embed_scale_applied_to_the_adapter_term_as_peft():
    cfg = dict(target_modules=["emb"], r=4, init_lora_weights=False)
    torch.manual_seed(0)
    base = _Tiny()
    state = base.state_dict()
    torch.manual_seed(1)
    ours = get_lora_model(base, LoraConfig(**cfg))
    other = _Tiny()
    other.load_state_dict(state)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(other, peft.LoraConfig(**cfg))
    ids = torch.tensor([[1, 2, 3], [4, 5, 49]])
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))
        ours.merge_adapter()
        assert max_rel(ours(ids), theirs(ids)) <= 1e-5  # the merged delta carries no embed_scale


def test_tied_embedding_merge_refused_peft_merges_anyway():
    """GPT-2 ties wte and lm_head: merging the embedding's delta would change the output head too
    (peft warns, then does it). Refused, with the model unchanged."""
    torch.manual_seed(1)
    model = get_lora_model(build("gpt2"), LoraConfig(target_modules=["wte"], init_lora_weights=False))
    assert model.base_model.transformer.wte.tied_modules == ["lm_head"]
    before = model.base_model.lm_head.weight.clone()
    with pytest.raises(ValueError, match=r"shared with \['lm_head'\].*tie_word_embeddings=False"):
        model.merge_adapter()
    assert torch.equal(model.base_model.lm_head.weight, before)
    assert not model.base_model.transformer.wte.merged


def test_all_linear_never_targets_embeddings():
    model = get_lora_model(build("llama"), LoraConfig(target_modules="all-linear"))
    assert not any(isinstance(m, LoraEmbedding) for m in model.modules())
