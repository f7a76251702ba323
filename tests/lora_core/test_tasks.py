"""Task types (issue 14): the task's head trains in full through modules_to_save, is never
LoRA-wrapped (also under "all-linear"), and the trainable parameters equal peft's.

Where peft 0.21 works (SEQ_CLS always; TOKEN_CLS / QUESTION_ANS with explicit targets) the counts and
outputs must equal peft's. Where it fails (TOKEN_CLS / QUESTION_ANS with "all-linear": it wraps the
head in LoRA, then refuses to make it a module to save) the reference is peft given what
"all-linear" means: every linear layer but the head, listed explicitly.
"""
from __future__ import annotations

import peft
import pytest
import torch

from lora_core import LoraConfig, LoraLinear, LoraModel, ModulesToSave, get_lora_model
from task_models import build_task_model, save_task_model, task_inputs

HEAD = {("llama", "SEQ_CLS"): "score", ("llama", "TOKEN_CLS"): "score", ("llama", "QUESTION_ANS"): "qa_outputs",
        ("bert", "SEQ_CLS"): "classifier", ("bert", "TOKEN_CLS"): "classifier"}
EXPLICIT = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
CASES = [(arch, task, tm) for (arch, task) in HEAD for tm in ("explicit", "all-linear")]


def _targets(arch, tm):
    return EXPLICIT[arch] if tm == "explicit" else "all-linear"


def _outputs(out) -> torch.Tensor:
    if hasattr(out, "start_logits"):
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def _peft_reference(arch, task, tm):
    """peft's model for the case; for all-linear where peft fails, peft given the explicit list of
    every linear layer but the head (what all-linear must mean)."""
    kwargs = dict(task_type=task, target_modules=_targets(arch, tm), r=4, lora_alpha=8)
    try:
        return peft.get_peft_model(build_task_model(arch, task), peft.LoraConfig(**kwargs)), True
    except TypeError:  # peft 0.21: "modules_to_save cannot be applied to modules of type lora.Linear"
        model = build_task_model(arch, task)
        head = HEAD[(arch, task)]
        linear = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head)
        kwargs["target_modules"] = linear
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs)), False


@pytest.mark.parametrize("arch,task,tm", CASES, ids=[f"{a}-{t}-{tm}" for a, t, tm in CASES])
def test_head_trains_in_full_and_counts_equal_peft(arch, task, tm):
    ours = get_lora_model(build_task_model(arch, task), LoraConfig(task_type=task, target_modules=_targets(arch, tm),
                                                                   r=4, lora_alpha=8))
    theirs, _ = _peft_reference(arch, task, tm)
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()

    head = HEAD[(arch, task)]
    wrapper = ours.base_model.get_submodule(head)
    assert isinstance(wrapper, ModulesToSave) and not isinstance(wrapper.original_module, LoraLinear)
    assert not any(p.endswith(head) or f"{head}." in p for p in ours.lora_layers())
    copy = wrapper.modules_to_save["default"]
    assert all(p.requires_grad for p in copy.parameters())  # in full
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert head not in (ours.peft_config["default"].target_modules or ())  # the json names what LoRA adapted


@pytest.mark.parametrize("arch,task", [("llama", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("llama", "QUESTION_ANS")])
def test_outputs_and_file_equal_peft(arch, task, tmp_path):
    """Same weights in both (peft's random init copied into ours, the head copy perturbed): equal
    outputs, and each side's adapter file gives the other the same outputs."""
    cfg = dict(task_type=task, target_modules=EXPLICIT[arch], r=4, lora_alpha=8, init_lora_weights=False)
    ours = get_lora_model(build_task_model(arch, task), LoraConfig(**cfg))
    theirs = peft.get_peft_model(build_task_model(arch, task), peft.LoraConfig(**cfg))
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.items():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
                ours_name = ("base_model." + name[len("base_model.model."):]).replace(
                    ".lora_A.default.", ".adapters.default.lora_A.").replace(
                    ".lora_B.default.", ".adapters.default.lora_B.")
                mine[ours_name].copy_(p)
    batch = task_inputs()
    with torch.no_grad():
        a, b = _outputs(ours(**batch)), _outputs(theirs(**batch))
        base = _outputs(build_task_model(arch, task)(**batch))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32, same math; summation order only
    assert (a - base).abs().max() > 1e-2  # the head copy and LoRA both matter

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    peft_cls = peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]
    with torch.no_grad():
        by_peft = _outputs(peft_cls.from_pretrained(build_task_model(arch, task), tmp_path / "ours")(**batch))
        by_ours = _outputs(LoraModel.from_pretrained(build_task_model(arch, task), tmp_path / "peft")(**batch))
    torch.testing.assert_close(by_peft, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_ours, b, rtol=1e-5, atol=1e-5)


def test_head_gets_gradients_and_learns():
    model = get_lora_model(build_task_model("llama", "SEQ_CLS"),
                           LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=4))
    model.train()
    out = model(**task_inputs(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    head = model.base_model.score.modules_to_save["default"].weight
    assert head.grad is not None and head.grad.abs().sum() > 0


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"])
def test_tasks_without_a_head_add_nothing(task):
    ours = get_lora_model(build_task_model("llama", "SEQ_CLS"),
                          LoraConfig(task_type=task, target_modules=["q_proj", "v_proj"]))
    assert ours.peft_config["default"].modules_to_save is None
    assert not any(isinstance(m, ModulesToSave) for m in ours.modules())


def test_user_modules_to_save_kept_and_not_repeated(tmp_path):
    cfg = LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], modules_to_save=["score", "norm"])
    model = get_lora_model(build_task_model("llama", "SEQ_CLS"), cfg)
    assert model.peft_config["default"].modules_to_save == ["score", "norm", "classifier"]
    model.save_pretrained(tmp_path / "a")
    again = LoraModel.from_pretrained(build_task_model("llama", "SEQ_CLS"), tmp_path / "a")
    assert again.peft_config["default"].modules_to_save == ["score", "norm", "classifier"]


def test_task_without_its_head_is_refused():
    from tiny_models import ARCHS  # a causal LM: no classifier / score head
    import transformers
    cfg_cls, kwargs, model_cls = ARCHS["llama"]
    base = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS'.*no module named 'classifier' or 'score'"
                                         r".*AutoModelForSequenceClassification"):
        get_lora_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in base.modules())  # untouched


def test_other_methods_take_the_task_heads_as_peft():
    """IA3 with SEQ_CLS: the head trains in full, the counts equal peft's; a prompt method, which
    here cannot train a head, is refused for a task with one."""
    import lora_core
    kwargs = dict(task_type="SEQ_CLS", target_modules=["k_proj", "v_proj", "down_proj"],
                  feedforward_modules=["down_proj"])
    ours = get_lora_model(build_task_model("llama", "SEQ_CLS"), lora_core.IA3Config(**kwargs))
    theirs = peft.get_peft_model(build_task_model("llama", "SEQ_CLS"), peft.IA3Config(**kwargs))
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert isinstance(ours.base_model.score, ModulesToSave)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' with PROMPT_TUNING.*must train in full"):
        get_lora_model(build_task_model("llama", "SEQ_CLS"),
                       lora_core.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
