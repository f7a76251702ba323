"""Find the target layers of a model and swap in LoraLinear (peft's matching rules).

`find_targets` computes the module paths without touching the model (used to validate a config or
an adapter before anything changes); `inject_lora` does the swap, freezes the base, handles `bias`
and `modules_to_save`, and returns the names it replaced.
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Optional

import torch
from torch import nn

from . import quant
from .config import ALL_LINEAR, LoraConfig, default_target_modules
from .layer import LoraLinear


class ModulesToSave(nn.Module):
    """A module trained in full next to the adapter (e.g. a classifier head).

    original_module: the frozen base module; trainable_module: a trainable deep copy, used in the
    forward unless `disabled` (set by LoraModel.disable_adapter, giving the base output).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trainable_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trainable_module.requires_grad_(True)
        self.disabled = False

    @property
    def active_module(self) -> nn.Module:
        return self.original_module if self.disabled else self.trainable_module

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # transformers reads e.g. `.weight` of the output head (weight tying, resizing)
            return getattr(super().__getattr__("trainable_module"), name)


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    """config.target_modules with None -> peft's per-architecture default and "all-linear" -> the set
    of every linear layer's path except the output head (peft does the same rewrite)."""
    tm = config.target_modules
    if tm is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return set(default_target_modules(model_type))
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        names = {n for n, m in model.named_modules() if quant.is_linear(m)}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            names -= {n for n, m in model.named_modules() if m is head}
        return names
    return tm


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    """peft's layers_to_transform rule: the first `<pattern>.<idx>.` in the path must be listed."""
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and len(wanted) == 0):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def _matches(names, key: str) -> bool:
    """A set of names matches a path if it is listed whole or as a dotted suffix; a string is a regex
    that must match the whole path."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _is_module_to_save(config: LoraConfig, key: str) -> bool:
    return bool(config.modules_to_save) and any(
        re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` adapts in `model`; the model is not modified.

    Raises ValueError if the model already has LoRA layers, if a matched module is not a linear
    layer, or if nothing matches (the message lists the linear layers' name suffixes).
    """
    existing = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, ModulesToSave))]
    if existing:
        raise ValueError(f"the model already has LoRA layers ({existing[:3]}...). Fix: wrap the original "
                         f"base model, or call merge_and_unload() on the LoRA model first.")
    targets = resolve_target_modules(model, config)
    found = []
    for key, module in model.named_modules():
        if not key or not _matches(targets, key):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, key):
            continue
        if _is_module_to_save(config, key):
            continue  # peft never puts an adapter inside a modules_to_save module
        if not isinstance(targets, str) and not _layer_index_ok(config, key):
            continue
        if not quant.is_linear(module):
            raise ValueError(f"target module {key!r} is a {type(module).__name__}, not a linear layer; "
                             f"LoRA here supports nn.Linear, Conv1D and bitsandbytes Linear4bit / "
                             f"Linear8bitLt. Fix: make target_modules more specific.")
        found.append(key)
    if not found:
        raise ValueError(
            f"target_modules={_show(config.target_modules)} matched no module of this "
            f"{type(model).__name__}. Fix: use some of the available linear layers (name suffixes): "
            f"{available_linear_names(model)}, or 'all-linear'.")
    return found


def available_linear_names(model: nn.Module) -> list[str]:
    """Last name component of every linear layer, sorted (what target_modules can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and quant.is_linear(m)})


def _show(tm):
    return sorted(tm) if isinstance(tm, set) else repr(tm)


def _pattern_value(patterns: dict, key: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first pattern p with `(.*\\.)?(p)$` matching."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def inject_lora(model: nn.Module, config: LoraConfig, lora_dtype: torch.dtype = torch.float32,
                kernel: str = "auto", targets: Optional[list[str]] = None) -> list[str]:
    """Swap every target of `config` in `model` for a LoraLinear, in place; returns their paths.

    All base parameters are frozen; LoRA weights train unless config.inference_mode; base biases
    train per config.bias; modules_to_save are wrapped in ModulesToSave. Validation happens before
    the first change (find_targets), so a bad config leaves the model untouched.
    """
    names = find_targets(model, config) if targets is None else targets
    conv1d = getattr(quant, "Conv1D", ())
    # Build every new layer first, then swap: a failure while building changes nothing.
    new_layers, flipped = {}, []
    for name in names:
        base = model.get_submodule(name)
        is_conv1d = isinstance(conv1d, type) and isinstance(base, conv1d)
        fan_in_fan_out = config.fan_in_fan_out
        if is_conv1d != bool(fan_in_fan_out):  # peft overrides the setting too, with a warning
            flipped.append(name)
            fan_in_fan_out = is_conv1d
        new_layers[name] = LoraLinear(
            base, r=_pattern_value(config.rank_pattern, name, config.r),
            lora_alpha=_pattern_value(config.alpha_pattern, name, config.lora_alpha),
            lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora, fan_in_fan_out=fan_in_fan_out, lora_dtype=lora_dtype,
            kernel=kernel)
    if flipped:
        warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {flipped[0]} (and "
                      f"{len(flipped) - 1} more): Conv1D stores W as [in, out], nn.Linear as [out, in]; "
                      f"using fan_in_fan_out={not config.fan_in_fan_out} for them.")
    save_names = _modules_to_save_names(model, config)

    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
    for name in save_names:
        _set_submodule(model, name, ModulesToSave(model.get_submodule(name)))
    quant.disable_cpu_repack(model)  # bnb's eval-mode CPU repacking must not touch weights we read

    train = not config.inference_mode
    for layer in new_layers.values():
        layer.lora_A.weight.requires_grad_(train)
        layer.lora_B.weight.requires_grad_(train)
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            module.trainable_module.requires_grad_(train)
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(train)
    elif config.bias == "lora_only":
        for layer in new_layers.values():
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(train)
    return names


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """peft's rule: every module whose path ends with a listed name (outermost match only)."""
    if not config.modules_to_save:
        return []
    names = []
    for key, _ in model.named_modules():
        if key and any(key.endswith(m) for m in config.modules_to_save):
            if not any(key.startswith(prev + ".") for prev in names):
                names.append(key)
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save} matched no module. Fix: name modules "
                         f"of the model, e.g. its head.")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
