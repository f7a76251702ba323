"""get_layer_status / get_model_status: which adapters each layer holds, which are active and merged.

The dataclasses have peft 0.21's field names (peft.peft_model.TunerLayerStatus / TunerModelStatus),
so code that reads peft's status reads ours. Values are ours where they must be: `name` is the path
inside the Hugging Face model (peft's starts with "model."), `module_type` our class name, and
`quantization_backend` names the bitsandbytes format (peft's LoRA layers report None).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Union

from . import quant
from .inject import ModulesToSave
from .layer import LoraLinear

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _all_or_none(flags) -> Union[bool, Irregular]:
    flags = list(flags)
    if all(f is True for f in flags):
        return True
    if all(f is False for f in flags):
        return False
    return "irregular"


def _backend(layer) -> Union[str, None]:
    if quant._is_4bit(layer):
        return "bitsandbytes 4bit"
    if quant._is_int8(layer):
        return "bitsandbytes 8bit"
    return None


def layer_status(model) -> list[TunerLayerStatus]:
    """One entry per LoraLinear and ModulesToSave of `model` (a LoraModel), in module order."""
    out = []
    for name, m in model.base_model.named_modules():
        if isinstance(m, LoraLinear):
            owned, merged, backend = m.adapters, list(m.merged_adapters), _backend(m.base_layer)
        elif isinstance(m, ModulesToSave):
            owned, merged, backend = m.modules_to_save, [], None
        else:
            continue
        params = {n: list(sub.parameters()) for n, sub in owned.items()}
        out.append(TunerLayerStatus(
            name=name, module_type=type(m).__name__, enabled=not m.disabled,
            active_adapters=list(m._active), merged_adapters=merged,
            requires_grad={n: _all_or_none(p.requires_grad for p in ps) for n, ps in params.items()},
            available_adapters=sorted(owned), devices={n: sorted({p.device.type for p in ps})
                                                        for n, ps in params.items()},
            quantization_backend=backend))
    if not out:
        raise ValueError("no adapter layers in this model (merge_and_unload() or unload() removed them)")
    return out


def model_status(model) -> TunerModelStatus:
    """The model-wide summary; a field the layers disagree on is "irregular" (as peft reports)."""
    layers = layer_status(model)
    trainable, total = model.trainable_parameters()
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_any = {n for s in layers for n in s.merged_adapters}
    # merged: adapters merged on some layer; "irregular" if a layer holds one of them unmerged
    merged: Union[list[str], Irregular] = sorted(merged_any)
    if any(merged_any & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
        merged = "irregular"
    grads, devices = collections.defaultdict(list), collections.defaultdict(set)
    for s in layers:
        for n, flag in s.requires_grad.items():
            grads[n].append(flag)
        for n, devs in s.devices.items():
            devices[n].update(devs)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=type(model.base_model).__name__, adapter_model_type=type(model).__name__,
        peft_types={n: c.peft_type for n, c in model.peft_config.items()}, trainable_params=trainable, total_params=total,
        num_adapter_layers=len(layers), enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular", merged_adapters=merged,
        requires_grad={n: _all_or_none(v) for n, v in grads.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={n: sorted(v) for n, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular")
