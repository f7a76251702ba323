"""The PEFT methods beside LoRA, one module each, and the one place a config is read by its peft_type.

    ia3.py              IA3Config, IA3Adapter          learned per-feature scale (ia3_l)
    adalora.py          AdaLoraConfig, AdaLoraAdapter  SVD-form LoRA with rank allocation
    bottleneck.py       BottleneckConfig, ...Adapter   astraios' bottleneck adapters (parallel / serial)
    adaption_prompt.py  AdaptionPromptConfig           Llama-Adapter: prompts + zero-init gates in attention
    prompt_tuning.py    PromptTuningConfig             virtual tokens prepended to the input

The per-layer methods (IA3, AdaLoRA, bottleneck) are adapter classes in `lora_core.adapters.METHODS`,
held by `LoraLinear` like LoRA; the two prompt methods act at model level (`LoraModel` holds them).
`config_from_dict` is what `io.read_config` and `LoraModel.from_pretrained` use: it picks the config
class from the json's `peft_type`.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

from ..config import TASK_TYPES, LoraConfig


class MethodConfig:
    """Shared behaviour of the non-LoRA configs (dataclasses with peft's field names).

    Settings the injection code reads but a method does not have take these class-level defaults
    (they are not dataclass fields, so they never reach adapter_config.json).
    """

    layers_to_transform = None
    layers_pattern = None
    bias = "none"
    fan_in_fan_out = False
    rank_pattern: dict = {}  # read only (no per-module rank overrides outside LoRA)
    # json keys peft writes for this method that we read and ignore (never written by us)
    IGNORED_KEYS: tuple = ()

    def _check_common(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r}: unknown. Fix: use None or one of {list(TASK_TYPES)}.")
        mts = getattr(self, "modules_to_save", None)
        if mts is not None and (isinstance(mts, str) or not all(isinstance(m, str) for m in mts)):
            raise ValueError(f"modules_to_save={mts!r}: must be a list of module names.")

    def to_dict(self) -> dict:
        """The dict written to adapter_config.json (sets as sorted lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = copy.deepcopy(getattr(self, f.name))
            out[f.name] = sorted(value) if isinstance(value, set) else value
        return out

    @classmethod
    def from_dict(cls, d: dict):
        """Read an adapter_config.json dict (peft's or ours). Keys we do not know are ignored, with
        a warning when they carry a value."""
        ours = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in ours:
                kwargs[key] = value
            elif key not in cls.IGNORED_KEYS and value not in (None, False, {}, []):
                warnings.warn(f"adapter config key {key!r}={value!r} is unknown to lorafuse's "
                              f"{cls.__name__}; ignored.")
        kwargs["peft_type"] = cls.peft_type  # the dataclass default
        return cls(**kwargs)

    def copy(self):
        return copy.deepcopy(self)


def config_classes() -> dict[str, type]:
    """peft_type -> our config class."""
    from .adalora import AdaLoraConfig
    from .adaption_prompt import AdaptionPromptConfig
    from .bottleneck import BottleneckConfig
    from .ia3 import IA3Config
    from .prompt_tuning import PromptTuningConfig
    return {"LORA": LoraConfig, "IA3": IA3Config, "ADALORA": AdaLoraConfig, "BOTTLENECK": BottleneckConfig,
            "ADAPTION_PROMPT": AdaptionPromptConfig, "PROMPT_TUNING": PromptTuningConfig}


def config_from_dict(d: dict):
    """The config object for an adapter_config.json dict, chosen by its `peft_type` (LORA if absent)."""
    peft_type = d.get("peft_type") or "LORA"
    classes = config_classes()
    if peft_type not in classes:
        raise ValueError(f"peft_type={peft_type!r}: lorafuse does not implement this PEFT method. "
                         f"Supported: {sorted(classes)}. Fix: use peft for this adapter.")
    return classes[peft_type].from_dict(d)


def as_config(config):
    """Our config for `config`: ours as is; a peft config (any supported method) through its dict."""
    classes = tuple(config_classes().values())
    if isinstance(config, classes):
        return config
    if hasattr(config, "to_dict") and hasattr(config, "peft_type"):
        d = config.to_dict()
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        d["peft_type"] = str(peft_type)
        return config_from_dict(d)
    raise TypeError(f"expected a lorafuse config (LoraConfig, IA3Config, AdaLoraConfig, BottleneckConfig, "
                    f"AdaptionPromptConfig, PromptTuningConfig) or a peft one, got {type(config).__name__}")


def is_prompt_method(config) -> bool:
    """Adaption prompt and prompt tuning act on the model, not on linear layers."""
    return getattr(config, "peft_type", "LORA") in ("ADAPTION_PROMPT", "PROMPT_TUNING")
