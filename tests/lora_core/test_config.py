"""LoraConfig mirrors peft's LoraConfig: defaults, adapter_config.json both ways, default targets."""
import json

import peft
import pytest
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

from lora_core import LoraConfig
from lora_core.config import DEFAULT_TARGET_MODULES, default_target_modules


def _peft_json(tmp_path, **kwargs) -> dict:
    """adapter_config.json exactly as peft 0.21 writes it."""
    peft.LoraConfig(**kwargs).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def _normalize(d: dict) -> dict:
    # peft writes sets as lists in arbitrary order; compare those as sets
    return {k: (sorted(v) if k in ("target_modules", "exclude_modules") and isinstance(v, list) else v)
            for k, v in d.items()}


def test_defaults_equal_peft():
    ours, theirs = LoraConfig().to_dict(), peft.LoraConfig().to_dict()
    theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()}
    theirs.pop("peft_version")  # peft stamps its own version; we keep one only when we read it
    ours.pop("peft_version")
    assert ours == theirs


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="lora_only",
         task_type="CAUSAL_LM", base_model_name_or_path="x/y", modules_to_save=["lm_head"]),
    dict(target_modules=r".*\.(q|v)", use_rslora=True, init_lora_weights="gaussian", inference_mode=True,
         rank_pattern={"q": 4}, alpha_pattern={"v": 2}),
    dict(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h", exclude_modules=["x"],
         fan_in_fan_out=True, init_lora_weights=False),
    # the variants (issue 13): DoRA, lora_bias, the inits, LoftQ's sub-config
    dict(use_dora=True, init_lora_weights="pissa_niter_4"), dict(lora_bias=True),
    dict(init_lora_weights="olora"), dict(init_lora_weights="orthogonal", r=4), dict(init_lora_weights="pissa"),
    dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 2}),
])
def test_json_round_trip_with_peft(tmp_path, kwargs, monkeypatch):
    if kwargs.get("init_lora_weights") == "loftq":
        # peft's LoraConfig refuses "loftq" unless scipy is importable (which its LoftQ code does not
        # use, and which this project does not need): let its check pass
        import importlib.util
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "scipy"
                            else find_spec(name, *a))
    written = _peft_json(tmp_path, **kwargs)
    ours = LoraConfig.from_dict(written)
    # what we write has exactly peft's keys and values (so older and newer peft can read it)
    assert _normalize(ours.to_dict()) == _normalize(written)
    # and peft reads ours back to the same config
    back = peft.LoraConfig.from_peft_type(**json.loads(json.dumps(ours.to_dict())))
    assert _normalize(back.to_dict()) == _normalize(peft.LoraConfig(**kwargs).to_dict() | {
        "peft_version": written["peft_version"]})


def test_sets_written_as_lists():
    d = LoraConfig(target_modules=["v", "q"]).to_dict()
    assert d["target_modules"] == ["q", "v"]
    json.dumps(d)  # serializable as is


def test_unsupported_feature_refused():
    d = LoraConfig().to_dict() | {"use_qalora": True}
    with pytest.raises(ValueError, match="use_qalora"):
        LoraConfig.from_dict(d)


def test_unknown_key_from_newer_peft_is_ignored_with_warning():
    with pytest.warns(UserWarning, match="some_future_field"):
        cfg = LoraConfig.from_dict(LoraConfig().to_dict() | {"some_future_field": 3})
    assert "some_future_field" not in cfg.to_dict()


def test_older_peft_json_missing_fields():
    cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]})
    assert cfg.r == 4 and cfg.target_modules == {"q"} and cfg.bias == "none"


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt2", "bloom", "opt", "gpt_neox",
                                        "t5", "mt5", "bert"])
def test_default_targets_equal_peft(model_type):
    assert default_target_modules(model_type) == PEFT_TARGETS[model_type]


def test_every_default_we_have_is_peft_s():
    for model_type, targets in DEFAULT_TARGET_MODULES.items():
        assert PEFT_TARGETS[model_type] == targets, model_type


def test_unknown_model_type_needs_explicit_targets():
    with pytest.raises(ValueError, match="target_modules explicitly"):
        default_target_modules("no_such_arch")


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r="), (dict(r=-2), "r="), (dict(r=2.5), "r="),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(bias="some"), "bias"), (dict(init_lora_weights="pissa_niter_x"), "init_lora_weights"),
    (dict(init_lora_weights="corda"), "init_lora_weights"),
    (dict(target_modules="q", layers_to_transform=[0]), "layers_to_transform"),
    (dict(layers_pattern="h"), "layers_to_transform"),
    (dict(rank_pattern={"q": 0}), "rank_pattern"), (dict(task_type="nope"), "task_type"),
])
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_lora_weights="orthogonal", r=5), "even rank"),
    (dict(init_lora_weights="orthogonal", rank_pattern={"q": 3}), "even rank"),
    (dict(init_lora_weights="loftq"), "needs loftq_config"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 2}), "loftq_bits must be 4"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}), "loftq_iter"),
    (dict(lora_bias=True, use_dora=True), "not supported with use_dora"),
    (dict(lora_bias=True, init_lora_weights="pissa"), "init_lora_weights True or False"),
    (dict(use_dora="yes"), "use_dora"),
])
def test_variant_rules(kwargs, match):
    """peft's rules for the variants; peft itself raises some only when the layers are built."""
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_loftq_config_object_and_ignored_sub_config():
    from lora_core import LoftQConfig
    assert LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=3)).loftq_config == {
        "loftq_bits": 4, "loftq_iter": 3}
    with pytest.warns(UserWarning, match="ignored"):
        assert LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}

