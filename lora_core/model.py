"""LoraModel: the wrapper users hold, like peft's PeftModel.

Our state_dict keys are `base_model.<module path>...` (peft's are `base_model.model.<path>...`;
`io` maps between them). Unknown attributes and calls go to the wrapped Hugging Face model, so
`model(**batch)`, `model.generate(...)`, `model.config` work unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .config import LoraConfig
from .inject import ModulesToSave, inject_lora, resolve_target_modules
from .layer import LoraLinear, _check_kernel


class LoraModel(nn.Module):
    """A Hugging Face model with LoRA layers injected. Build it with `get_lora_model`."""

    def __init__(self, model: nn.Module, config: LoraConfig, lora_dtype: torch.dtype = torch.float32,
                 kernel: str = "auto"):
        super().__init__()
        if isinstance(model, LoraModel):
            raise ValueError("the model is already a LoraModel. Fix: pass its .base_model after "
                             "merge_and_unload(), or the original base model.")
        _check_kernel(kernel)
        config = config.copy()
        config.validate()  # fields may have been edited since construction
        # Record what was resolved, as peft does (None -> the architecture's default list,
        # "all-linear" -> every linear layer's path), so adapter_config.json names what was adapted.
        # Resolved before injecting: afterwards lora_A / lora_B would count as linear layers.
        resolved = resolve_target_modules(model, config)
        inject_lora(model, config, lora_dtype=lora_dtype, kernel=kernel)
        config.target_modules = resolved
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self.base_model = model
        self.lora_config = config

    # ---- forwarding ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not registered yet (during __init__): avoid infinite recursion
                raise
            return getattr(self.base_model, name)

    # ---- inspection ------------------------------------------------------------------------------
    def lora_layers(self) -> dict[str, LoraLinear]:
        """{module path inside the HF model: LoraLinear}."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, LoraLinear)}

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) counted as peft 0.21 counts: each shared parameter once, and a bnb 4-bit
        parameter as 2 * bytes-per-element values per stored element (two 4-bit values per byte)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":
                n = n * 2 * p.element_size()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print peft's line: `trainable params: T || all params: A || trainable%: P`."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---- adapter switches ------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model gives the base model's outputs (LoRA and modules_to_save off);
        the previous state comes back on exit, also after an exception."""
        if any(layer.merged for layer in self.lora_layers().values()):
            raise RuntimeError("disable_adapter() on a merged model would still include the delta. "
                               "Fix: call unmerge_adapter() first.")
        switches = [m for m in self.base_model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]
        before = [m.disabled for m in switches]
        try:
            for m in switches:
                m.disabled = True
            yield
        finally:
            for m, state in zip(switches, before):
                m.disabled = state

    def set_kernel(self, name: str) -> None:
        """Backend of every LoraLinear: "torch" | "triton" | "auto"."""
        _check_kernel(name)
        for layer in self.lora_layers().values():
            layer.kernel = name

    # ---- merge -----------------------------------------------------------------------------------
    def merge_adapter(self) -> dict[str, float]:
        """Merge every LoRA layer into its base weight; returns {path: max weight error} (0 up to
        rounding for dense bases, the re-quantization error for 4-bit / int8 bases)."""
        todo = {n: layer for n, layer in self.lora_layers().items() if not layer.merged}
        bad = [n for n, layer in todo.items() if not torch.isfinite(layer.delta_weight()).all()]
        if bad:  # checked for every layer first, so a bad one leaves the whole model unmerged
            raise ValueError(f"LoRA delta of {bad} has non-finite values; refusing to merge, nothing "
                             f"changed. Fix: check those layers' lora_A / lora_B for NaN/inf.")
        return {n: layer.merge() for n, layer in todo.items()}

    def unmerge_adapter(self) -> dict[str, float]:
        """Subtract the deltas again (lossy for quantized bases: see LoraLinear.unmerge)."""
        return {n: layer.unmerge() for n, layer in self.lora_layers().items() if layer.merged}

    def merge_and_unload(self) -> nn.Module:
        """Merge, then put the plain base layers back (modules_to_save: the trained copy); returns
        the Hugging Face model. This LoraModel must not be used afterwards."""
        self.merge_adapter()
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, LoraLinear):
                _replace(self.base_model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                _replace(self.base_model, name, module.trainable_module)
        return self.base_model

    # ---- PEFT-format files (lora_core.io) --------------------------------------------------------
    def save_pretrained(self, save_directory, is_main_process: bool = True) -> None:
        """Write adapter_config.json + adapter_model.safetensors in peft's format.

        is_main_process: as peft's; only the main process writes. Under FSDP call it on every process
        (the sharded adapter weights are gathered first)."""
        from . import io
        io.save_adapter(self, save_directory, is_main_process=is_main_process)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir, is_trainable: bool = False) -> "LoraModel":
        """Wrap `base_model` with the adapter in `adapter_dir` (ours or peft's)."""
        from . import io
        return io.load_adapter(base_model, adapter_dir, is_trainable=is_trainable)


def get_lora_model(model: nn.Module, config: LoraConfig, lora_dtype: torch.dtype = torch.float32,
                   kernel: str = "auto") -> LoraModel:
    """Inject LoRA layers into `model` (in place) per `config` and wrap it in a LoraModel.

    lora_dtype: dtype of the LoRA weights (fp32 by default, as peft). Raises ValueError, with the
    model unchanged, if the config matches nothing or the model already has LoRA layers.
    """
    return LoraModel(model, config, lora_dtype=lora_dtype, kernel=kernel)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
