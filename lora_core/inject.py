"""Find the target layers of a model and put adapters on them (peft's matching rules).

`find_targets` computes the module paths without touching the model (used to validate a config or
an adapter before anything changes); `inject_lora` adds one named adapter: it wraps new targets in
LoraLinear, adds the adapter to targets already wrapped (a second adapter), and handles `bias` and
`modules_to_save`. Matching sees through our wrappers: a LoraLinear counts as its base layer, and
nothing inside a LoraLinear or ModulesToSave is ever a target.
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

import kernels

from . import init as lora_init
from . import quant
from .adapters import build_adapter
from .config import ALL_LINEAR, LoraConfig, default_target_modules
from .embedding import LoraEmbedding, build_embedding_adapter
from .layer import BASE_ROW, LoraLinear, _device_of, row_groups
from .methods.adaption_prompt import AdaptedAttention


class ModulesToSave(nn.Module):
    """A module trained in full next to an adapter (e.g. a classifier head), one copy per adapter.

    original_module: the frozen base module; modules_to_save: {adapter name: trainable deep copy}
    (peft's names and state-dict layout). The forward uses the copy of the first active adapter
    that has one, else the original (also when `disabled`, set by LoraModel.disable_adapter).
    """

    def __init__(self, module: nn.Module, adapter_name: str = "default"):
        super().__init__()
        self.original_module = module
        self.original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self._active: list[str] = [adapter_name]
        self.disabled = False
        self.row_adapters: Optional[list[str]] = None  # a mixed batch's per-row names, while one runs
        self.add_copy(adapter_name)

    def add_copy(self, adapter_name: str, source: Optional[nn.Module] = None) -> None:
        """A trainable copy for `adapter_name` of `source` (default: the original module)."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module if source is None else source)

    def set_adapter(self, names: Sequence[str]) -> None:
        self._active = [names] if isinstance(names, str) else list(names)

    def module_for(self, adapter_name: str) -> nn.Module:
        return self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else self.original_module

    @property
    def trainable_module(self) -> Optional[nn.Module]:
        """The copy the forward uses (None when no active adapter has one here)."""
        return next((self.modules_to_save[n] for n in self._active if n in self.modules_to_save), None)

    @property
    def active_module(self) -> nn.Module:
        trained = self.trainable_module
        return self.original_module if self.disabled or trained is None else trained

    def forward(self, x, *args, **kwargs):
        rows = self.row_adapters
        if rows is None or self.disabled:
            return self.active_module(x, *args, **kwargs)
        # mixed batch: each group of rows through its adapter's copy (or the original)
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries but the input has {x.shape[0]} rows")
        out = None
        for name, idx in row_groups(rows, x.device).items():  # idx [b]: this name's rows
            module = self.original_module if name == BASE_ROW else self.module_for(name)
            part = module(x.index_select(0, idx), *args, **kwargs)  # [b, ...]
            if out is None:
                out = part.new_empty((x.shape[0],) + tuple(part.shape[1:]))
            out.index_copy_(0, idx, part)
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # transformers reads e.g. `.weight` of the output head (weight tying, resizing)
            return getattr(self.active_module, name)


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) like named_modules(), but LoraLinear and ModulesToSave are leaves: what is
    inside them (base_layer, lora_A, copies) is never a target or a module to save."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, (LoraLinear, ModulesToSave)):
            yield from iter_modules(child, path + ".")


def is_target_type(module: nn.Module) -> bool:
    """A layer LoRA can adapt: a linear layer (nn.Linear, bnb, Conv1D), an nn.Embedding, or one
    already wrapped."""
    return isinstance(module, (LoraLinear, nn.Embedding)) or quant.is_linear(module)


def is_linear_target(module: nn.Module) -> bool:
    """A linear layer, wrapped or not: what "all-linear" and the suggestions in errors name."""
    return (isinstance(module, LoraLinear) and not isinstance(module, LoraEmbedding)) or quant.is_linear(module)


def new_adapter(config: LoraConfig, path: str, module: nn.Module, dtype: torch.dtype,
                device: Optional[torch.device]) -> nn.Module:
    """The adapter `config` puts on `module` (a target at `path`, wrapped or not)."""
    base = module.base_layer if isinstance(module, LoraLinear) else module
    if isinstance(module, LoraEmbedding) or isinstance(base, nn.Embedding):
        return build_embedding_adapter(config, path, base, dtype, device)
    k_in, n_out = quant.in_out_features(base)
    return build_adapter(config, path, k_in, n_out, dtype, device)


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    """config.target_modules with None -> peft's per-architecture default and "all-linear" -> the set
    of every linear layer's path except the output head (peft does the same rewrite)."""
    tm = config.target_modules
    if tm is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = getattr(config, "default_targets", None)  # a method's own table (IA3, AdaLoRA, ...)
        return set(defaults(model_type) if defaults is not None else default_target_modules(model_type))
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        names = {n for n, m in iter_modules(model) if is_linear_target(m)}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            names -= {n for n, m in iter_modules(model) if m is head}
        # a module to save (a task's classifier head) is trained in full, never a LoRA target
        return {n for n in names if not _is_module_to_save(config, n)}
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


def check_no_lora(model: nn.Module) -> None:
    """Refuse a model that already has LoRA layers (wrapping it again would nest adapters)."""
    existing = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, ModulesToSave, AdaptedAttention))]
    if existing:
        raise ValueError(f"the model already has LoRA layers ({existing[:3]}...). Fix: wrap the original "
                         f"base model, add a second adapter with LoraModel.add_adapter(name, config), or "
                         f"call merge_and_unload() on the LoRA model first.")


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` adapts in `model` (LoRA-wrapped already or not); the model is
    not modified. Raises ValueError if a matched module is not a linear layer, or if nothing
    matches (the message lists the linear layers' name suffixes)."""
    targets = resolve_target_modules(model, config)
    found = []
    for key, module in iter_modules(model):
        if not _matches(targets, key):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, key):
            continue
        if _is_module_to_save(config, key):
            continue  # peft never puts an adapter inside a modules_to_save module
        if not isinstance(targets, str) and not _layer_index_ok(config, key):
            continue
        if not is_target_type(module):
            raise ValueError(f"target module {key!r} is a {type(module).__name__}, not a linear layer; "
                             f"LoRA here supports nn.Linear, Conv1D, bitsandbytes Linear4bit / "
                             f"Linear8bitLt and nn.Embedding. Fix: make target_modules more specific.")
        found.append(key)
    if not found:
        raise ValueError(
            f"target_modules={_show(config.target_modules)} matched no module of this "
            f"{type(model).__name__}. Fix: use some of the available linear layers (name suffixes): "
            f"{available_linear_names(model)}, or 'all-linear'.")
    return found


def available_linear_names(model: nn.Module) -> list[str]:
    """Last name component of every linear layer, sorted (what target_modules can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in iter_modules(model) if is_linear_target(m)})


def _show(tm):
    return sorted(tm) if isinstance(tm, set) else repr(tm)


def pattern_value(patterns: dict, key: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first pattern p with `(.*\\.)?(p)$` matching."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """peft's rule: every module whose path ends with a listed name (outermost match only)."""
    if not config.modules_to_save:
        return []
    names = []
    for key, _ in iter_modules(model):
        if any(key.endswith(m) for m in config.modules_to_save):
            if not any(key.startswith(prev + ".") for prev in names):
                names.append(key)
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save} matched no module. Fix: name modules "
                         f"of the model, e.g. its head.")
    return names


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                lora_dtype: torch.dtype = torch.float32, backend: str = "auto",
                targets: Optional[list[str]] = None, active: Optional[Sequence[str]] = None,
                copy_from: Optional[dict[str, nn.Module]] = None) -> list[str]:
    """Put adapter `adapter_name` of `config` on its targets in `model`, in place; returns their paths.

    A target not yet wrapped becomes a LoraLinear holding only this adapter; a LoraLinear gains it.
    Every layer is told the model's `active` adapters (default: [adapter_name]). Base parameters
    and everything else but adapters are frozen; the new adapter trains iff it is in `active` and
    not config.inference_mode, with the biases `config.bias` names. modules_to_save get a copy for this adapter (of `copy_from[path]` if
    given, else of the original module). Validation and every new module are built before the
    first change, so a bad config leaves the model untouched.
    """
    names = find_targets(model, config) if targets is None else targets
    active = [adapter_name] if active is None else list(active)
    conv1d = getattr(quant, "Conv1D", ())
    for name in names:  # what an init needs of each base layer, before anything is built
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        lora_init.check_layer(config, name, base)
    # Build every new adapter and layer first, then swap: a failure while building changes nothing.
    # Data-dependent inits (PiSSA, OLoRA, LoftQ) compute A and B here, layer by layer as peft does
    # (so pissa_niter's random draws come in peft's order), and rewrite the bases after the swap.
    new_layers, new_adapters, flipped, rewrites = {}, {}, [], []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            if adapter_name in module.adapters:
                raise ValueError(f"layer {name!r} already holds an adapter named {adapter_name!r}")
            new_adapters[name] = new_adapter(config, name, module, lora_dtype, _device_of(module.base_layer))
            if not isinstance(module, LoraEmbedding):
                rewrites.append(lora_init.prepare(new_adapters[name], config, module.base_layer))
            continue
        if isinstance(module, nn.Embedding):
            tied = [n for n, m in iter_modules(model) if m is not module
                    and getattr(m, "weight", None) is module.weight]
            new_layers[name] = LoraEmbedding(module, new_adapter(config, name, module, lora_dtype, _device_of(module)),
                                             adapter_name=adapter_name, backend=backend, tied_modules=tied)
            continue
        is_conv1d = isinstance(conv1d, type) and isinstance(module, conv1d)
        fan_in_fan_out = config.fan_in_fan_out
        if is_conv1d != bool(fan_in_fan_out):  # peft overrides the setting too, with a warning
            flipped.append(name)
            fan_in_fan_out = is_conv1d
        adapter = new_adapter(config, name, module, lora_dtype, _device_of(module))
        rewrites.append(lora_init.prepare(adapter, config, module))
        new_layers[name] = LoraLinear(module, fan_in_fan_out=fan_in_fan_out, backend=backend,
                                      adapter_name=adapter_name, adapter=adapter)
    if flipped:
        warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {flipped[0]} (and "
                      f"{len(flipped) - 1} more): Conv1D stores W as [in, out], nn.Linear as [out, in]; "
                      f"using fan_in_fan_out={not config.fan_in_fan_out} for them.")
    save_names = modules_to_save_names(model, config)

    for name, layer in new_layers.items():
        layer.base_layer.requires_grad_(False)
        _set_submodule(model, name, layer)
    for name, adapter in new_adapters.items():
        model.get_submodule(name).add_adapter(adapter_name, adapter)
    for rewrite in rewrites:  # the residual W - scaling * B @ A (PiSSA, OLoRA) or LoftQ's Q
        if rewrite is not None:
            rewrite.apply()
    for name in names:  # DoRA's magnitude from the (rewritten) base: ||W + scaling * B @ A|| per row
        layer = model.get_submodule(name)
        adapter = layer.adapters[adapter_name]
        if hasattr(adapter, "init_magnitude"):
            adapter.init_magnitude(kernels.dequantize(layer._base_record()))
    for name in save_names:
        module = model.get_submodule(name)
        source = (copy_from or {}).get(name)
        if isinstance(module, ModulesToSave):
            module.add_copy(adapter_name, source)
        else:
            module.requires_grad_(False)
            wrapper = ModulesToSave(module, adapter_name)
            if source is not None:
                wrapper.add_copy(adapter_name, source)
            _set_submodule(model, name, wrapper)
    for m in model.modules():
        if isinstance(m, (LoraLinear, ModulesToSave)):
            m.set_adapter(active)
    quant.disable_cpu_repack(model)  # bnb's eval-mode CPU repacking must not touch weights we read

    # Everything but adapters and trained copies is frozen; this adapter trains if it is active
    # (and the config is not in inference mode), with the biases its `bias` setting names.
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    train = adapter_name in active and not config.inference_mode
    for p in adapter_parameters(model, adapter_name):
        p.requires_grad_(train)
    for p in bias_parameters(model, config.bias, adapter_name):
        p.requires_grad_(train)
    return names


def adapter_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
    """The parameters of adapter `adapter_name` (all adapters when None): its LoRA weights on
    every layer and its modules_to_save copies."""
    out = []
    for m in model.modules():
        if isinstance(m, (LoraLinear, AdaptedAttention)):
            owned = m.adapters
        elif isinstance(m, ModulesToSave):
            owned = m.modules_to_save
        else:
            continue
        for name, sub in owned.items():
            if adapter_name is None or name == adapter_name:
                fixed = getattr(sub, "fixed_parameters", ())  # e.g. AdaLoRA's ranknum: never trained
                out += [p for n, p in sub.named_parameters() if n not in fixed]
    return out


def bias_parameters(model: nn.Module, bias: str, adapter_name: str) -> list[nn.Parameter]:
    """The biases an adapter with this `bias` setting trains (peft's rule): "all": every ".bias"
    parameter of the model; "lora_only": the base biases of the layers holding the adapter."""
    if bias == "all":
        return [p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if bias == "lora_only":
        return [m.base_layer.bias for m in model.modules() if isinstance(m, LoraLinear)
                and adapter_name in m.adapters and getattr(m.base_layer, "bias", None) is not None]
    return []


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
