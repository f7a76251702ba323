"""LoraModel: the wrapper users hold, like peft's PeftModel, with any number of named adapters.

    model = get_lora_model(base, LoraConfig(r=8))                 # adapter "default", active
    model.add_adapter("other", LoraConfig(r=16, target_modules=["k_proj"]))
    model.set_adapter("other")                                    # what the forward applies and trains
    model(**batch, adapter_names=["default", "other", "__base__"])  # a mixed batch (eval mode)

The same entry points take the other PEFT methods' configs (lora_core.methods): IA3, AdaLoRA and
astraios bottleneck adapters live on LoraLinear layers like LoRA; adaption prompts in wrapped
attention modules; prompt tuning's prompts in `prompt_encoder` here (forward and generate prepend
them). One model holds adapters of one method (peft's rule).

`peft_config` maps each adapter name to its LoraConfig (peft's attribute); `active_adapter(s)`
names what the forward applies. Adapters may differ in r, alpha, targets and options: a module
targeted only by one adapter holds only that one (see `lora_core.layer`).

Our state_dict keys are `base_model.<module path>...` (peft's are `base_model.model.<path>...`;
`io` maps between them). Attribute access goes to the wrapped Hugging Face model when we have no
such attribute, so `model.config`, `model.gradient_checkpointing_enable()` work unchanged; but
every method peft's PeftModel / LoraModel or transformers' PeftAdapterMixin has is either ours
or refused here by name (`REFUSED`), never forwarded: the wrapped model's own `load_adapter`,
`add_adapter`, ... would act on the transformers model behind our back. Keywords peft's forward
takes (`adapter_names`) are ours, never left to the model's **kwargs.

A mixed batch's per-row names are set on every LoraLinear / ModulesToSave for the duration of the
call (as peft's forward hooks do), so one model runs one mixed-batch call at a time.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

import kernels

from . import quant, tasks
from .config import LoraConfig
from .inject import (ModulesToSave, adapter_parameters, bias_parameters, check_no_lora, find_targets,
                     inject_lora, resolve_target_modules)
from .layer import BASE_ROW, LoraLinear, resolve_backend
from .methods import adalora, adaption_prompt, as_config, is_prompt_method, prompt_tuning
from .methods.adaption_prompt import AdaptedAttention
from .methods.prompt_tuning import PromptEmbedding

_TUNER = ("a peft tuner internal; lorafuse has no separate tuner object (the LoraModel is both "
          "PeftModel and tuner)")
# peft / transformers names we do not implement -> why, and what to do instead. LoraModel.__getattr__
# raises AttributeError with this text instead of forwarding the name to the wrapped HF model.
REFUSED: dict[str, str] = {
    "prepare_model_for_gradient_checkpointing": "Fix: call model.gradient_checkpointing_enable() and "
                                                "model.enable_input_require_grads(), or use "
                                                "lora_core.prepare_model_for_kbit_training(base)",
    "enable_peft_hotswap": "adapter hotswapping is not implemented. Fix: load_adapter() under a new "
                           "name, then set_adapter() and delete_adapter() the old one",
    "inject_adapter": "Fix: use add_adapter(adapter_name, config)",
    "get_model_config": _TUNER + ". Fix: model.config.to_dict()",
    "prefix": _TUNER,
    "target_module_mapping": _TUNER + ". See lora_core.config.DEFAULT_TARGET_MODULES",
    "tuner_layer_cls": _TUNER + ". The layer class is lora_core.LoraLinear",
    "uses_shared_state": _TUNER,
}
# keywords of peft's forward / generate for methods we lack: refused rather than passed on
REFUSED_KWARGS = {"alora_offsets": "aLoRA is not implemented in lorafuse",
                  "task_ids": "task_ids belongs to peft's Poly / multitask prompt tuning, not implemented"}


class LoraModel(nn.Module):
    """A Hugging Face model with LoRA adapters injected. Build it with `get_lora_model`.

    lora_dtype: dtype of every adapter's weights (fp32 by default, as peft). backend: the backend of
    every LoraLinear ("auto" | "torch" | "triton"; `set_backend` changes it; `kernel=` is its old,
    deprecated name).
    """

    def __init__(self, model: nn.Module, config: LoraConfig, lora_dtype: torch.dtype = torch.float32,
                 backend: str = "auto", adapter_name: str = "default", kernel: Optional[str] = None):
        super().__init__()
        if isinstance(model, LoraModel):
            raise ValueError("the model is already a LoraModel. Fix: add another adapter with "
                             "add_adapter(name, config), or pass the original base model.")
        backend = resolve_backend(backend, kernel, "LoraModel")
        _check_adapter_name(adapter_name)
        check_no_lora(model)
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()  # prompt-tuning adapters (peft's name); empty otherwise
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = [adapter_name]
        self._lora_dtype = lora_dtype
        self._backend = backend
        self._inject(adapter_name, config)

    def _inject(self, name: str, config: LoraConfig, copy_from: Optional[dict] = None,
                targets: Optional[list[str]] = None) -> None:
        config = _as_lora_config(config).copy()
        config.validate()  # fields may have been edited since construction
        if hasattr(config, "prepare_for"):  # what a method reads from the model (sizes, defaults)
            config.prepare_for(self.base_model)
        methods = {c.peft_type for c in self.peft_config.values()}
        if methods and methods != {config.peft_type}:
            raise ValueError(f"this model holds {sorted(methods)} adapters; a {config.peft_type} adapter cannot be "
                             f"added to them (peft refuses to combine PEFT types too). Fix: wrap another copy "
                             f"of the base model.")
        if is_prompt_method(config) and config.task_type in tasks.TASK_HEADS:
            raise ValueError(f"task_type={config.task_type!r} with {config.peft_type}: the task's new head must "
                             f"train in full (peft puts it in modules_to_save), which lorafuse's prompt methods do "
                             f"not do. Fix: use LoRA, IA3 or AdaLoRA for this task.")
        if is_prompt_method(config):
            self._inject_prompt(name, config)
            self._record(name, config)
            return
        tasks.add_task_heads(config)  # the task's head trains in full and is never a target
        tasks.check_task_heads(self.base_model, config)
        # Record what was resolved, as peft does (None -> the architecture's default list,
        # "all-linear" -> every linear layer's path), so adapter_config.json names what was adapted.
        resolved = resolve_target_modules(self.base_model, config)
        targets = find_targets(self.base_model, config) if targets is None else targets  # raises first
        inject_lora(self.base_model, config, name, lora_dtype=self._lora_dtype, backend=self._backend,
                    targets=targets, active=self._active, copy_from=copy_from)
        config.target_modules = resolved
        if hasattr(config, "targets_resolved"):  # a method whose other fields follow (IA3's feed-forward)
            config.targets_resolved(targets)
        self._record(name, config)

    def _record(self, name: str, config) -> None:
        if config.base_model_name_or_path is None:
            hf_config = getattr(self.base_model, "config", None)
            config.base_model_name_or_path = getattr(hf_config, "_name_or_path", None) or None
        self.peft_config[name] = config

    def _inject_prompt(self, name: str, config) -> None:
        """Adaption prompts go into attention modules; a prompt-tuning prompt lives on this model.
        As for LoRA, everything but adapters is frozen and the new one trains iff it is active."""
        if config.peft_type == "ADAPTION_PROMPT":
            adaption_prompt.inject(self.base_model, name, config, self._active)
        else:
            if name in self.prompt_encoder:
                raise ValueError(f"a prompt named {name!r} already exists")
            encoder = PromptEmbedding(config, prompt_tuning.word_embeddings(self.base_model),
                                      initialise=not getattr(config, "_from_file", False))
            device = prompt_tuning.word_embeddings(self.base_model).weight.device
            self.prompt_encoder[name] = encoder.to(device)
        keep = {id(p) for p in self._adapter_params()}
        for p in self.base_model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        for p in self._adapter_params(name):
            p.requires_grad_(name in self._active and not config.inference_mode)

    def _adapter_params(self, name: Optional[str] = None) -> list[nn.Parameter]:
        """Adapter `name`'s parameters (all adapters' when None), on layers and on this model."""
        own = [m for n, m in self.prompt_encoder.items() if name is None or n == name]
        return adapter_parameters(self.base_model, name) + [p for m in own for p in m.parameters()]

    # ---- forwarding ------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The wrapped model's forward. adapter_names: one adapter name (or "__base__") per row of
        the batch, for a mixed batch (eval mode only, as peft)."""
        _refuse_kwargs(kwargs)
        prompt = self._active_prompt()
        if prompt is not None:
            if adapter_names is not None:
                raise ValueError("adapter_names (a mixed batch) is not implemented for prompt tuning")
            return prompt_tuning.forward(prompt, self.base_model, *args, **kwargs)
        with self._mixed_batch(adapter_names):
            outputs = self.base_model(*args, **kwargs)
        return self._add_orth_regulariser(outputs)

    def generate(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The wrapped model's generate; adapter_names as in forward (repeated per beam when
        num_beams > 1; an encoder sees the original rows)."""
        _refuse_kwargs(kwargs)
        prompt = self._active_prompt()
        if prompt is not None:
            if adapter_names is not None:
                raise ValueError("adapter_names (a mixed batch) is not implemented for prompt tuning")
            return prompt_tuning.generate(prompt, self.base_model, *args, **kwargs)
        with self._mixed_batch(adapter_names, num_beams=kwargs.get("num_beams")):
            return self.base_model.generate(*args, **kwargs)

    def _active_prompt(self) -> Optional[PromptEmbedding]:
        """The active prompt-tuning prompt (None for other methods, or while adapters are disabled)."""
        names = [n for n in self._active if n in self.prompt_encoder]
        if not names:
            return None
        if len(self._active) > 1:
            raise ValueError(f"several active adapters {self._active} with prompt tuning: one prompt at a time. "
                             f"Fix: set_adapter(one name).")
        encoder = self.prompt_encoder[names[0]]
        return None if encoder.disabled else encoder

    def _add_orth_regulariser(self, outputs):
        """AdaLoRA: the loss gets peft's orthogonality term (see lora_core.methods.adalora) in
        training mode. Unlike peft, not in eval mode: an eval loss stays the task loss, comparable
        with other methods' (peft adds it to every loss it returns)."""
        loss = getattr(outputs, "loss", None)
        reg = self.training_regulariser() if isinstance(loss, torch.Tensor) else None
        if reg is not None:
            outputs.loss = loss + reg
        return outputs

    def training_regulariser(self) -> Optional[torch.Tensor]:
        """What the method adds to the training loss (AdaLoRA's orth_reg_weight * orthogonality term,
        in training mode with a trainable AdaLoRA adapter active), else None. A loop that computes
        its own loss from the logits adds this itself."""
        config = self.peft_config.get(self._active[0]) if len(self._active) == 1 else None
        if not self.training or not isinstance(config, adalora.AdaLoraConfig) or config.inference_mode:
            return None
        layers = adalora.adalora_layers(self, self._active[0])
        return config.orth_reg_weight * adalora.orth_regulariser(layers)

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA: update the importance scores and prune ranks per the budget schedule (peft's
        AdaLoraModel.update_and_allocate). Call it every step after optimizer.step(), before
        zero_grad(). Works on the active adapter, which must be AdaLoRA and trainable."""
        name = self._active[0] if len(self._active) == 1 else None
        config = self.peft_config.get(name)
        if not isinstance(config, adalora.AdaLoraConfig) or config.inference_mode:
            raise ValueError(f"update_and_allocate() is for a trainable AdaLoRA adapter; the active adapter "
                             f"{self._active} is {getattr(config, 'peft_type', 'not one adapter')}"
                             f"{' (inference mode)' if config is not None and config.inference_mode else ''}")
        adalora.update_and_allocate(self, name, global_step)

    def get_prompt(self, batch_size: int, task_ids=None) -> torch.Tensor:
        """Prompt tuning: the active prompt, [batch_size, num_virtual_tokens * submodules, token_dim]."""
        if task_ids is not None:
            raise TypeError(f"task_ids=...: {REFUSED_KWARGS['task_ids']}")
        names = [n for n in self._active if n in self.prompt_encoder]
        if not names:
            raise ValueError(f"get_prompt(): the active adapter {self._active} is not a prompt-tuning adapter")
        return self.prompt_encoder[names[0]](batch_size)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """Prompt tuning: the prompt as saved ([total virtual tokens, token_dim], detached, CPU)."""
        if adapter_name not in self.prompt_encoder:
            raise ValueError(f"{adapter_name!r} is not a prompt-tuning adapter of this model")
        return self.prompt_encoder[adapter_name].embedding.weight.detach().cpu()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not registered yet (during __init__): avoid infinite recursion
                raise
            if name in REFUSED:
                raise AttributeError(f"LoraModel.{name}: not available in lorafuse (peft has it; it is not "
                                     f"passed on to the wrapped model): {REFUSED[name]}.") from None
            return getattr(self.base_model, name)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names, num_beams=None) -> Iterator[None]:
        """While the block runs, every LoraLinear / ModulesToSave knows each row's adapter."""
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names (a mixed batch) is for inference: call model.eval() first "
                             "(peft refuses it in training mode too).")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ROW} - set(self.peft_config))
        if unknown:
            raise ValueError(f"adapter_names names unknown adapter(s) {unknown}; this model has "
                             f"{list(self.peft_config)} (and '{BASE_ROW}' for the base model)")
        merged = sorted({n for layer in self.lora_layers().values() for n in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapter_names given while {merged} are merged into the base weights; "
                             f"call unmerge_adapter() first")
        rows = names
        encoder_parts: set[int] = set()
        if isinstance(num_beams, int) and num_beams > 1:
            # generate repeats each input row num_beams times; an encoder runs on the original rows
            rows = [n for n in names for _ in range(num_beams)]
            encoder = _encoder(self.base_model)
            encoder_parts = {id(m) for m in encoder.modules()} if encoder is not None else set()
        layers = [m for m in self.base_model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]
        for m in layers:
            m.row_adapters = names if id(m) in encoder_parts else rows
        try:
            yield
        finally:
            for m in layers:
                m.row_adapters = None

    # ---- inspection ------------------------------------------------------------------------------
    def lora_layers(self) -> dict[str, LoraLinear]:
        """{module path inside the HF model: LoraLinear}."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, LoraLinear)}

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (with our layers in it)."""
        return self.base_model

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self._active[0]]

    @property
    def lora_config(self) -> LoraConfig:
        """The active adapter's config (peft: active_peft_config)."""
        return self.active_peft_config

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        names = {m for c in self.peft_config.values() for m in (c.modules_to_save or [])}
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        return bool(self._active) and not all(layer.disabled for layer in self.lora_layers().values())

    @property
    def base_model_torch_dtype(self):
        return getattr(self.base_model, "dtype", None)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True for a LoRA adapter (it is one already); the other methods have no LoRA form here."""
        self._check_known([adapter_name])
        return self.peft_config[adapter_name].peft_type == "LORA"

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

    get_nb_trainable_parameters = trainable_parameters  # peft's name

    def print_trainable_parameters(self) -> None:
        """Print peft's line: `trainable params: T || all params: A || trainable%: P`."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self):
        """peft's TunerLayerStatus per adapter layer (which adapters it holds, active, merged)."""
        from . import status
        self._refuse_status()
        return status.layer_status(self)

    def get_model_status(self):
        """peft's TunerModelStatus for the whole model."""
        from . import status
        self._refuse_status()
        return status.model_status(self)

    def _refuse_status(self) -> None:
        prompt = sorted({c.peft_type for c in self.peft_config.values() if is_prompt_method(c)})
        if prompt:
            raise TypeError(f"layer / model status describe adapter layers; {prompt} adapters have none "
                            f"(peft refuses them too)")

    # ---- adapters --------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter (initialised per its config, frozen, not active: see set_adapter).

        Checked before the model changes: a new, valid name, a config whose targets exist, at most
        one adapter with bias != "none" (peft's rule). Existing parameters keep their requires_grad.
        """
        if not isinstance(adapter_name, str):
            raise TypeError(f"add_adapter(adapter_name, peft_config): peft's argument order; got "
                            f"adapter_name={adapter_name!r}")
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists. Fix: pick another name, "
                             f"or delete_adapter({adapter_name!r}) first.")
        config = _as_lora_config(peft_config)
        with_bias = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if config.bias != "none" and with_bias:
            raise ValueError(f"adapter {with_bias[0]!r} already trains biases (bias={self.peft_config[with_bias[0]].bias!r}); "
                             f"only one adapter may have bias != 'none' (as in peft). Fix: bias='none'.")
        before = [(p, p.requires_grad) for p in self.parameters()]
        self._inject(adapter_name, config)
        for p, flag in before:  # as peft: adding an adapter does not change what trains
            p.requires_grad_(flag)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make `adapter_name` (or a list) the active adapter(s): what the forward applies and, unless
        inference_mode, what trains (every other adapter is frozen). Merged layers are unmerged
        first, with a warning, as in peft."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        for m in self.base_model.modules():
            if isinstance(m, ModulesToSave) and sum(n in m.modules_to_save for n in names) > 1:
                raise ValueError(f"adapters {[n for n in names if n in m.modules_to_save]} each have their own "
                                 f"copy of a modules_to_save module; only one of them can be active")
        layers = self.lora_layers()
        if any(layer.merged for layer in layers.values()):
            warnings.warn("set_adapter(): unmerging the merged adapters first.")
            self.unmerge_adapter()
        self._active = names
        for m in self.base_model.modules():
            if isinstance(m, (LoraLinear, ModulesToSave, AdaptedAttention)):
                m.set_adapter(names)
        for name, config in self.peft_config.items():
            train = name in names and not inference_mode
            for p in bias_parameters(self.base_model, config.bias, name):
                p.requires_grad_(train)
        for name in self.peft_config:
            for p in self._adapter_params(name):
                p.requires_grad_(name in names and not inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights on or off (peft's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        for name in names:
            for p in self._adapter_params(name):
                p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (refused while merged). If it was active, the other
        active ones stay; if none is left, the first remaining adapter by name becomes active."""
        self._check_known([adapter_name])
        merged = [p for p, layer in self.lora_layers().items() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {len(merged)} layer(s) ({merged[0]}, ...); "
                             f"call unmerge_adapter() before deleting it")
        for m in self.base_model.modules():
            if isinstance(m, LoraLinear):
                m.delete_adapter(adapter_name)
            elif isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
                del m.modules_to_save[adapter_name]
            elif isinstance(m, AdaptedAttention) and adapter_name in m.adapters:
                del m.adapters[adapter_name]
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.__dict__.get("_rank_allocators", {}).pop(adapter_name, None)
        del self.peft_config[adapter_name]
        active = [n for n in self._active if n != adapter_name]
        if not active and self.peft_config:
            active = [sorted(self.peft_config)[0]]
            if adapter_name in self._active:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active "
                              f"adapter to {active[0]}.")
        if active:
            self.set_adapter(active)
        else:
            self._active = []
            for m in self.base_model.modules():
                if isinstance(m, (LoraLinear, ModulesToSave, AdaptedAttention)):
                    m.set_adapter([])

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter combining `adapters` with `weights` (peft's method, numbers and
        combination types; see lora_core.combine)."""
        from . import combine
        other = sorted({self.peft_config[a].peft_type for a in adapters if a in self.peft_config} - {"LORA"})
        if other:
            raise TypeError(f"add_weighted_adapter combines LoRA adapters; {other} adapters are not supported "
                            f"(peft refuses them too)")
        combine.add_weighted_adapter(self, list(adapters), list(weights), adapter_name, combination_type,
                                     svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                                     svd_driver=svd_driver, density=density,
                                     majority_sign_method=majority_sign_method)

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")

    # ---- adapter switches ------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model gives the base model's outputs (LoRA and modules_to_save off);
        the previous state comes back on exit, also after an exception."""
        if any(layer.merged for layer in self.lora_layers().values()):
            raise RuntimeError("disable_adapter() on a merged model would still include the delta. "
                               "Fix: call unmerge_adapter() first.")
        switches = self._switches()
        before = [m.disabled for m in switches]
        try:
            for m in switches:
                m.disabled = True
            yield
        finally:
            for m, state in zip(switches, before):
                m.disabled = state

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until enable_adapter_layers() (disable_adapter() is the block form)."""
        for m in self._switches():
            m.disabled = True

    def enable_adapter_layers(self) -> None:
        for m in self._switches():
            m.disabled = False

    disable_adapters = disable_adapter_layers  # transformers' PeftAdapterMixin names
    enable_adapters = enable_adapter_layers

    def _switches(self) -> list[nn.Module]:
        kinds = (LoraLinear, ModulesToSave, AdaptedAttention)
        return [m for m in self.base_model.modules() if isinstance(m, kinds)] + list(self.prompt_encoder.values())

    def set_backend(self, name: str) -> None:
        """Backend of every LoraLinear (and of layers added later): "torch" | "triton" | "auto"."""
        self._backend = resolve_backend(name, None, "set_backend")
        for layer in self.lora_layers().values():
            layer.backend = name

    def set_kernel(self, name: str) -> None:
        """Deprecated name of `set_backend`."""
        warnings.warn("set_kernel is deprecated: use set_backend", FutureWarning, stacklevel=2)
        self.set_backend(name)

    def backend_report(self) -> list[dict]:
        """What `kernels.lora_linear` ran for this model's LoRA layers in this process: the entries of
        `kernels.backend_report()` (pass, call shape, backend, strategy, why, calls, predicted times)
        whose (N, K) is one of this model's layers', each with "layers": the names of those layers."""
        by_shape: dict = {}
        for name, layer in self.lora_layers().items():
            by_shape.setdefault((layer.out_features, layer.in_features), []).append(name)
        return [{**e, "layers": by_shape[(e["N"], e["K"])]} for e in kernels.backend_report()
                if (e["N"], e["K"]) in by_shape]

    # ---- merge -----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> dict[str, float]:
        """Merge the named adapters (default: the active ones) into the base weights; returns
        {path: max weight error} (0 up to rounding for dense bases, the re-quantization error for
        4-bit / int8 bases). Adapters already merged are skipped with a warning. Every delta is
        checked finite before any layer changes (peft's safe_merge, always on)."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, got {adapter_names!r}")
        names = list(self._active if adapter_names is None else adapter_names)
        self._check_known(names)
        prompt = sorted({self.peft_config[n].peft_type for n in names if is_prompt_method(self.peft_config[n])})
        if prompt:
            raise ValueError(f"{prompt} adapters add tokens or attention terms, not a weight change: there is "
                             f"nothing to merge into the base weights. Fix: keep the adapter unmerged.")
        layers = self.lora_layers()
        todo = {p: [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
                for p, layer in layers.items()}
        todo = {p: ns for p, ns in todo.items() if ns}
        already = sorted({n for layer in layers.values() for n in layer.merged_adapters if n in names})
        if already:
            warnings.warn(f"merge_adapter(): {already} already merged; "
                          f"{'nothing more to merge' if not todo else 'merging the rest'} (no double add).")
        bad = [p for p, ns in todo.items() if not layers[p].mergeable(ns)]
        if bad:  # checked for every layer first, so a bad one leaves the whole model unmerged
            raise ValueError(f"LoRA delta of {bad} has non-finite values; refusing to merge, nothing "
                             f"changed. Fix: check those layers' lora_A / lora_B for NaN/inf.")
        return {p: layers[p].merge(ns) for p, ns in todo.items()}

    def unmerge_adapter(self) -> dict[str, float]:
        """Subtract every merged delta again (lossy for quantized bases: see LoraLinear.unmerge)."""
        return {n: layer.unmerge() for n, layer in self.lora_layers().items() if layer.merged}

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Merge (the named or active adapters), then put the plain base layers back
        (modules_to_save: the active adapter's copy); returns the Hugging Face model. This
        LoraModel holds no adapter afterwards (save_pretrained refuses)."""
        self.merge_adapter(adapter_names)
        # bitsandbytes' eval-mode CPU path stays off on 4-bit layers, so the returned model gives
        # the merged LoraModel's outputs exactly (that path computes in bf16)
        return self._unload()

    def unload(self) -> nn.Module:
        """Put the plain base layers back without merging (modules_to_save: the active adapter's
        trained copy, as peft); returns the Hugging Face model, whose LoRA layers then compute as
        the base model did before wrapping (bit for bit). Refused while adapters are merged (their
        deltas would stay in the weights; peft returns those weights silently)."""
        merged = sorted({n for layer in self.lora_layers().values() for n in layer.merged_adapters})
        if merged:
            raise ValueError(f"unload() while {merged} are merged into the base weights would keep their deltas "
                             f"there. Fix: unmerge_adapter() first for the base model, or merge_and_unload() for "
                             f"the merged one.")
        model = self._unload()
        quant.restore_cpu_repack(model)  # bitsandbytes' own CPU setting, as before wrapping
        return model

    def _unload(self) -> nn.Module:
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, (LoraLinear, AdaptedAttention)):
                _replace(self.base_model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                kept = module.trainable_module
                _replace(self.base_model, name, module.original_module if kept is None else kept)
        return self.base_model

    # ---- PEFT-format files (lora_core.io) --------------------------------------------------------
    def save_pretrained(self, save_directory, selected_adapters: Optional[Sequence[str]] = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion=None) -> None:
        """Write the adapters in peft's layout: "default" at the folder root, every other adapter
        in save_directory/<name>/ (adapter_config.json + adapter_model.safetensors each).
        selected_adapters: which ones (default: all). path_initial_model_for_weight_conversion:
        the folder this adapter was saved to right after its PiSSA / OLoRA init; the adapter is
        then written as a rank-2r LoRA adapter that applies to the original, unmodified base
        (peft's conversion; see lora_core.init). Nothing is written if any check fails."""
        from . import io
        if not safe_serialization:
            raise ValueError("safe_serialization=False (adapter_model.bin) is not written by lorafuse; "
                             "safetensors files load everywhere peft's .bin files do")
        if is_main_process:
            io.save_adapters(self, save_directory, selected_adapters,
                             initial=path_initial_model_for_weight_conversion)

    def subtract_mutated_init(self, output_state_dict: dict, adapter_name: str, kwargs=None) -> dict:
        """peft's conversion of a PiSSA / OLoRA adapter to plain LoRA: `output_state_dict` (the
        trained adapter, peft's keys) against adapter `adapter_name` of this model holding its
        initial values; returns the rank-2r state dict (other tensors kept; see lora_core.init)."""
        from . import init as lora_init
        self._check_known([adapter_name])
        return lora_init.convert_to_lora(output_state_dict, self.get_adapter_state_dict(adapter_name))

    def loftq_errors(self, adapter_name: Optional[str] = None) -> dict:
        """{layer path: LoftQErrors} of a LoftQ-initialised adapter (default: the active one): the
        Frobenius error of the base quantized alone, ||W - Q||, and ||W - (Q + scaling * B A)|| after
        each alternating iteration. Empty for other inits."""
        name = self._active[0] if adapter_name is None else adapter_name
        self._check_known([name])
        return {p: layer.adapters[name].loftq_errors for p, layer in self.lora_layers().items()
                if name in layer.adapters and hasattr(layer.adapters[name], "loftq_errors")}

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = "Upload adapter",
                    commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
                    revision: Optional[str] = None, create_pr: bool = False, max_shard_size=None,
                    tags: Optional[Sequence[str]] = None, selected_adapters: Optional[Sequence[str]] = None):
        """Upload the adapter(s) only, in one commit: adapter_config.json, adapter_model.safetensors
        (every other adapter in <name>/) and a model card README.md unless the repo has one. Never
        the base model (the wrapped model's own push_to_hub would upload all of it). Returns
        huggingface_hub's CommitInfo. max_shard_size is accepted for peft's signature and unused:
        an adapter file is never sharded. See lora_core.hub."""
        from . import hub
        return hub.push_to_hub(self, repo_id, commit_message=commit_message,
                               commit_description=commit_description, private=private, token=token,
                               revision=revision, create_pr=create_pr, selected_adapters=selected_adapters,
                               tags=tags)

    def create_or_update_model_card(self, output_dir) -> None:
        """Write or update README.md in `output_dir` with the hub metadata of this adapter (peft's method)."""
        from . import hub
        hub.create_or_update_model_card(self, output_dir)

    def get_adapter_state_dict(self, adapter_name: Optional[str] = None, state_dict=None) -> dict:
        """The tensors save_pretrained writes for `adapter_name` (default: the active one), under
        peft's on-disk keys (`base_model.model.<path>.lora_A.weight`, ...)."""
        from . import io
        if state_dict is not None:
            raise ValueError("get_adapter_state_dict(state_dict=...) is not supported: the tensors come "
                             "from the live model")
        name = self._active[0] if adapter_name is None else adapter_name
        self._check_known([name])
        return io.adapter_state_dict(self, name)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in `model_id` (a directory, ours or peft's, or a hub repo id) under
        `adapter_name`, not active (see set_adapter). Everything is checked before the model
        changes. Frozen unless is_trainable; puts the model in eval mode unless is_trainable."""
        from . import io
        io.load_into(self, model_id, adapter_name, is_trainable=is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False) -> "LoraModel":
        """Wrap `model` with the adapter in `model_id` (ours or peft's folder, or a hub repo id).
        For a folder holding several adapters (peft's layout) this loads the root one; add the
        others with load_adapter(folder/<name>, name)."""
        from . import io
        return io.load_adapter(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable)


def get_lora_model(model: nn.Module, config: LoraConfig, lora_dtype: torch.dtype = torch.float32,
                   backend: str = "auto", adapter_name: str = "default",
                   kernel: Optional[str] = None) -> LoraModel:
    """Inject LoRA layers into `model` (in place) per `config` and wrap it in a LoraModel.

    lora_dtype: dtype of the LoRA weights (fp32 by default, as peft). Raises ValueError, with the
    model unchanged, if the config matches nothing or the model already has LoRA layers.
    """
    backend = resolve_backend(backend, kernel, "get_lora_model")
    return LoraModel(model, config, lora_dtype=lora_dtype, backend=backend, adapter_name=adapter_name)


def _check_adapter_name(name) -> None:
    """An adapter name is also a folder name (save_pretrained writes dir/<name>/)."""
    if not isinstance(name, str) or not name or name == BASE_ROW or re.search(r"[./\\\x00]", name):
        raise ValueError(f"adapter name {name!r} is not usable: it must be a non-empty string without "
                         f"'.' (a module name), '/' or '\\' (save_pretrained makes it a folder name), "
                         f"and not '{BASE_ROW}' (the base model in a mixed batch).")


def _as_lora_config(config):
    """Our config (LoraConfig or another method's, see lora_core.methods); a peft config is read
    through its dict (the same fields)."""
    return as_config(config)


def _refuse_kwargs(kwargs: dict) -> None:
    for key, why in REFUSED_KWARGS.items():
        if key in kwargs:
            raise TypeError(f"{key}=...: {why}; refused here rather than passed to the wrapped model.")


def _encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model, else None (transformers 5 returns the model itself)."""
    get = getattr(model, "get_encoder", None)
    if get is None:
        return None
    encoder = get()
    return None if encoder is model else encoder


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
