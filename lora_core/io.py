"""PEFT-format adapter files: save ours so peft / transformers read them, and load theirs (or ours).

An adapter directory holds two files:

    adapter_config.json         LoraConfig.to_dict(): peft's fields only, inference_mode true, and
                                without a task_type peft's auto_mapping (the base model's class)
    adapter_model.safetensors   metadata {"format": "pt"}; adapter_model.bin is read too

Several adapters (peft's layout): the adapter named "default" at the folder root, every other one
in <folder>/<name>/ with its own two files. `PeftModel.from_pretrained(base, folder)` then
`load_adapter(folder/<name>, name)` reads it, and so do we.

Tensor keys on disk (checked against peft 0.21.2's save_pretrained; P = module path in the HF model;
no adapter name in any key):

    base_model.model.P.lora_A.weight     [r, in]     every LoRA layer holding the adapter
    base_model.model.P.lora_B.weight     [out, r]
    base_model.model.P.lora_B.bias       [out]       lora_bias=True
    base_model.model.P.lora_magnitude_vector [out]   use_dora=True (DoRA's magnitude)
    base_model.model.P.base_layer.bias   [out]       bias="lora_only": biases of those LoRA layers
    base_model.model.<any>.bias                      bias="all": every ".bias" of the model, under
                                                     its module path (P.base_layer.bias for LoRA
                                                     layers; X.original_module.bias and
                                                     X.modules_to_save.bias inside a
                                                     modules_to_save module X)
    base_model.model.X.<name>                        modules_to_save X: the adapter's trained copy

The other methods (lora_core.methods) keep the same rule, "P.<tensor>" on disk for the tensor
"P.adapters.<adapter>.<tensor>" in memory, with peft's tensor names: IA3 `P.ia3_l`; AdaLoRA
`P.lora_A`, `P.lora_B`, `P.lora_E` (only the kept triplets once `rank_pattern` is in the config);
adaption prompts `<attention path>.adaption_prompt`, `.adaption_gate`; astraios bottleneck
adapters `P.adapter_down.weight`, `P.adapter_up.weight` (`.adapter_scaling`). Prompt tuning saves
one tensor, `prompt_embeddings`, without the prefix. The json's `peft_type` picks the config class.

In memory the same tensors are `P.adapters.<adapter>.<tensor>` (lora_A.weight, ...) and
`X.modules_to_save.<adapter>.<name>`. Loading checks every key, shape and value (finite) against
the model *before* anything is injected, so an adapter that does not fit raises ValueError (naming
the modules, keys and shapes) and leaves the model exactly as it was. Saving checks everything
first, writes into a temporary directory beside the target and renames into place, so a failure
never leaves a half-written adapter over a good one.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import tasks
from .adapters import saved_tensors
from .inject import ModulesToSave, find_targets, modules_to_save_names, new_adapter
from .layer import LoraLinear
from .methods import adaption_prompt, config_from_dict
from .methods.adaption_prompt import AdaptedAttention
from .model import LoraModel, _check_adapter_name, get_lora_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # peft's prefix: PeftModel.base_model (LoraModel) .model (HF model)
DEFAULT = "default"  # the adapter saved at the folder root
PROMPT_KEY = "prompt_embeddings"  # prompt tuning's one tensor, saved without a prefix (peft)

PathLike = Union[str, os.PathLike]


# ---- state dict ------------------------------------------------------------------------------------
def adapter_state_dict(model: LoraModel, adapter_name: str = DEFAULT) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under peft's on-disk keys (detached views of the live
    parameters); empty when no layer holds it."""
    cfg = model.peft_config[adapter_name]
    hf = model.base_model
    if adapter_name in model.prompt_encoder:
        return {PROMPT_KEY: model.prompt_encoder[adapter_name].embedding.weight.detach()}
    layers = {p: m for p, m in model.lora_layers().items() if adapter_name in m.adapters}
    mts = _modules_to_save(hf)
    out: dict[str, torch.Tensor] = {}
    for path, host in _hosts(hf, adapter_name).items():
        # LoRA: P.lora_A.weight [r, in], P.lora_B.weight [out, r]; other methods their own names
        for key, t in saved_tensors(host.adapters[adapter_name], cfg, path).items():
            out[f"{path}.{key}"] = t
    if cfg.bias == "all":
        # peft keeps every state-dict key ending in ".bias", wherever it lives.
        for key, t in _tensors(hf):
            disk = _to_disk_name(key, mts, adapter_name)
            if disk is not None and (key == "bias" or key.endswith(".bias")):
                out[disk] = t
    elif cfg.bias == "lora_only":
        for path, layer in layers.items():
            if getattr(layer.base_layer, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = layer.base_layer.bias
    for path, module in mts.items():
        if adapter_name in module.modules_to_save:
            for key, t in _tensors(module.modules_to_save[adapter_name]):
                out[f"{path}.{key}"] = t
    return {PREFIX + k: v.detach() for k, v in out.items()}


def _hosts(hf: nn.Module, adapter_name: Optional[str] = None) -> dict[str, nn.Module]:
    """{path: module} of every module holding adapters in an `adapters` registry (LoraLinear, an
    adaption-prompt attention), holding `adapter_name` if given."""
    return {p: m for p, m in hf.named_modules() if isinstance(m, (LoraLinear, AdaptedAttention))
            and (adapter_name is None or adapter_name in m.adapters)}


def _tensors(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, tensor) for every parameter and persistent buffer, tied ones under each name.

    Same keys as `root.state_dict()` minus bitsandbytes' quant-state extras, but without calling
    state_dict(): bitsandbytes' Linear4bit._save_to_state_dict rewrites weight.data in place when
    the weight is in its CPU layout, and saving an adapter must not touch the base weights.
    """
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                yield prefix + name, b


def _plain_tensors(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Like _tensors, but as if the model had no LoRA: a LoraLinear's base layer and a
    ModulesToSave's original module appear under the wrapper's own path, adapters not at all."""
    for name, p in root._parameters.items():
        if p is not None:
            yield prefix + name, p
    for name, b in root._buffers.items():
        if b is not None and name not in root._non_persistent_buffers_set:
            yield prefix + name, b
    for name, child in root.named_children():
        if isinstance(child, (LoraLinear, AdaptedAttention)):
            child = child.base_layer
        elif isinstance(child, ModulesToSave):
            child = child.original_module
        yield from _plain_tensors(child, f"{prefix}{name}.")


def _modules_to_save(hf: nn.Module) -> dict[str, ModulesToSave]:
    return {n: m for n, m in hf.named_modules() if isinstance(m, ModulesToSave)}


def _to_disk_name(key: str, mts, adapter_name: str) -> Optional[str]:
    """Our `X.modules_to_save.<adapter>.k` is peft's `X.modules_to_save.k` on disk; another
    adapter's copy is not part of this adapter (None)."""
    for path in mts:
        inner = f"{path}.modules_to_save."
        if key.startswith(inner):
            owner, _, rest = key[len(inner):].partition(".")
            return f"{inner}{rest}" if owner == adapter_name else None
    return key


# ---- save ------------------------------------------------------------------------------------------
def save_adapters(model: LoraModel, directory: PathLike, selected: Optional[Sequence[str]] = None,
                  initial: Optional[PathLike] = None) -> Path:
    """Write `model`'s adapters to `directory` in peft's layout; returns the directory.

    selected: the adapter names to write (default: all). initial: peft's
    path_initial_model_for_weight_conversion, the folder holding the adapter as it was right after
    a PiSSA / OLoRA init: the one adapter saved is then converted to a rank-2r LoRA adapter for the
    original base (lora_core.init; the initial folder is only read). Everything is checked first:
    the names, that each adapter is on at least one layer, finite tensors, no file in a
    subfolder's place.
    Files are written into a temporary directory beside the target, then renamed into place;
    other files already in `directory` (a tokenizer, a README, other adapters) are kept. On any
    error the previous adapter files, if any, are left as they were.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save the adapter to {str(target)!r}: it is a file. "
                                 f"Fix: pass a directory path.")
    names = list(model.peft_config) if selected is None else list(selected)
    model._check_known(names)
    if not names:
        raise ValueError("selected_adapters is empty: nothing to save")
    if initial is not None and len(names) != 1:
        raise ValueError(f"path_initial_model_for_weight_conversion converts one adapter, but {names} are "
                         f"selected. Fix: pass selected_adapters=[name].")
    payload = {}  # folder relative to target ("" = root) -> (config dict, tensors)
    for name in names:
        tensors = _for_safetensors(adapter_state_dict(model, name))
        if name not in model.prompt_encoder and not _hosts(model.base_model, name):
            raise ValueError(f"adapter {name!r} is on no layer of this model (merge_and_unload() or unload() "
                             f"removed the LoRA layers): there is nothing to save; {str(target)!r} was not "
                             f"touched. Fix: save before merging, or save the merged model itself.")
        config = model.peft_config[name]
        if initial is not None:
            tensors, config = _converted(model, name, tensors, initial, target)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"adapter {name!r} has non-finite values (NaN/inf) in {bad[:3]}; refusing to save "
                             f"it, {str(target)!r} was not touched.")
        sub = "" if name == DEFAULT else name
        if sub and (target / sub).exists() and not (target / sub).is_dir():
            raise NotADirectoryError(f"cannot save adapter {name!r} to {str(target / sub)!r}: it is a file")
        payload[sub] = (_config_for_disk(model, config), tensors)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (same filesystem, so the renames are atomic); os.mkdir honours the umask,
    # unlike tempfile.mkdtemp's 0700, so the adapter ends up with the permissions of any new folder.
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for sub, (config, tensors) in payload.items():
            _write_adapter(tmp / sub if sub else tmp, config, tensors)
        if not target.exists():
            os.rename(tmp, target)  # everything appears at once
            return target
        for sub in sorted(payload, key=bool, reverse=True):  # subfolders first, the root adapter last
            src, dst = (tmp / sub, target / sub) if sub else (tmp, target)
            if sub and not dst.exists():
                os.rename(src, dst)
                continue
            # Keep the folder's other files: replace ours one by one, each replace atomic. Weights
            # first, so the config never describes weights that are not there yet.
            for fname in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(src / fname, dst / fname)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _converted(model: LoraModel, name: str, tensors: dict, initial: PathLike, target: Path):
    """(tensors, config) of adapter `name` converted against the initial adapter in `initial`."""
    from . import init as lora_init

    config = model.peft_config[name]
    problem = (lora_init.conversion_problem(config) if config.peft_type == "LORA" else
               f"it is a {config.peft_type} adapter; only a LoRA adapter (PiSSA / OLoRA init) converts")
    if problem:
        raise ValueError(f"path_initial_model_for_weight_conversion: adapter {name!r} cannot be converted: "
                         f"{problem}. Nothing was written.")
    init_dir = _local_dir(initial, need_weights=True)
    if init_dir.resolve() == target.resolve():
        raise ValueError(f"path_initial_model_for_weight_conversion={str(initial)!r} is the folder being "
                         f"written; it would overwrite the initial adapter. Fix: save elsewhere.")
    first = read_config(init_dir)
    same = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
    diff = [k for k in same if getattr(first, k) != getattr(config, k)]
    if diff:
        raise ValueError(f"the initial adapter in {str(init_dir)!r} has other {diff} than adapter {name!r} "
                         f"({[getattr(first, k) for k in diff]} vs {[getattr(config, k) for k in diff]}). "
                         f"Fix: pass the folder saved right after this adapter's init.")
    lora_init.warn_quantized_conversion(model)
    return lora_init.convert_to_lora(tensors, _read_weights(init_dir)), lora_init.converted_config(config)


def _config_for_disk(model: LoraModel, config) -> dict:
    config = config.to_dict()
    if not config.get("base_model_name_or_path"):
        hf = model.base_model
        config["base_model_name_or_path"] = (getattr(hf, "name_or_path", None)
                                             or getattr(getattr(hf, "config", None), "_name_or_path", None)
                                             or None)
    config["inference_mode"] = True  # what peft writes: a saved adapter loads frozen unless asked
    if config.get("task_type") is None:
        # peft's auto_mapping: without a task type, the class that opens the base (AutoPeftModel)
        cls = type(model.base_model)
        config["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return config


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    # safetensors (0.8) creates its file 0600; an adapter is made to be shared and served, so
    # give it the mode of any new file (0644 under the usual umask).
    os.chmod(folder / WEIGHTS_NAME, 0o666 & ~_umask())
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _for_safetensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing storage (safetensors refuses shared tensors)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen:
            t = t.clone()
        seen.add(ident)
        out[k] = t
    return out


# ---- load ------------------------------------------------------------------------------------------
def read_config(directory: PathLike):
    """The config in `directory`/adapter_config.json (ours or peft's; a hub repo id works too): a
    LoraConfig, or another method's config chosen by the json's peft_type (lora_core.methods)."""
    local = _local_dir(directory, need_weights=False)
    path = local / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter directory {str(local)!r} has no {CONFIG_NAME}. An adapter directory holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}), as written by save_pretrained. "
            f"Found: {sorted(p.name for p in local.iterdir())}.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Fix: re-save the adapter.") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of LoraConfig fields "
                         f"(\"r\", \"lora_alpha\", ...). Fix: re-save the adapter.")
    return config_from_dict(raw)


def load_adapter(base_model: nn.Module, directory: PathLike, adapter_name: str = DEFAULT,
                 is_trainable: bool = False) -> LoraModel:
    """Wrap `base_model` in a LoraModel holding the adapter in `directory` (ours or peft's).

    Everything is checked before the model changes: a missing file raises FileNotFoundError, an
    adapter whose module names, tensor shapes or values do not fit raises ValueError naming them,
    and in both cases `base_model` is left untouched. Tensors are cast to the dtype of the
    parameter they fill (LoRA weights: fp32, as peft). Unless `is_trainable`, every parameter is
    frozen and the model is put in eval mode (peft's inference mode).
    """
    _check_adapter_name(adapter_name)
    local = _local_dir(directory, need_weights=True)
    config = read_config(local)
    config.inference_mode = not is_trainable
    tasks.add_task_heads(config)  # as get_lora_model does, so the plan expects the head's tensors
    state = _read_weights(local)
    plan = _plan(base_model, config, state, local, adapter_name)  # raises before any change to base_model

    config._from_file = True  # the weights come from the file: no init that needs more (a tokenizer)
    model = get_lora_model(base_model, config, adapter_name=adapter_name)
    _fill(model, plan, state, adapter_name)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def load_into(model: LoraModel, directory: PathLike, adapter_name: str, is_trainable: bool = False) -> None:
    """Add the adapter in `directory` to `model` as `adapter_name` (not active; peft's load_adapter).
    Checked as in load_adapter before the model changes; frozen unless is_trainable, and the model
    goes to eval mode unless is_trainable."""
    _check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists. Fix: pick another name, or "
                         f"delete_adapter({adapter_name!r}) first.")
    local = _local_dir(directory, need_weights=True)
    config = read_config(local)
    config.inference_mode = not is_trainable
    tasks.add_task_heads(config)  # as get_lora_model does, so the plan expects the head's tensors
    state = _read_weights(local)
    plan = _plan(model.base_model, config, state, local, adapter_name)
    config._from_file = True
    model.add_adapter(adapter_name, config)  # validates the rest (bias rule) before changing anything
    _fill(model, plan, state, adapter_name)
    if is_trainable:
        model.set_requires_grad(adapter_name, True)
    else:
        model.eval()


def _fill(model: LoraModel, plan: dict[str, str], state: dict[str, torch.Tensor], adapter_name: str) -> None:
    model.peft_config[adapter_name].__dict__.pop("_from_file", None)
    live = dict(_tensors(model.base_model))
    if adapter_name in model.prompt_encoder:
        live[f"prompt_encoder.{adapter_name}.embedding.weight"] = model.prompt_encoder[adapter_name].embedding.weight
    with torch.no_grad():
        for disk_key, model_key in plan.items():
            dst = live[model_key]
            dst.copy_(state[disk_key].to(device=dst.device, dtype=dst.dtype))


def _plan(tree: nn.Module, config, state: dict[str, torch.Tensor], where: Path,
          adapter_name: str) -> dict[str, str]:
    """{disk key: key in the model after adapter `adapter_name` is added} for every tensor in
    `state`, computed from `tree` as it is now (nothing is injected; `tree` may already hold other
    adapters). Raises ValueError listing every key that does not fit."""
    config = config.copy()
    try:
        if hasattr(config, "prepare_for"):
            config.prepare_for(tree)
        if config.peft_type == "PROMPT_TUNING":
            return _plan_prompt(config, state, where, adapter_name)
        if config.peft_type == "ADAPTION_PROMPT":
            targets, mts = set(adaption_prompt.target_paths(tree, config)), []
        else:
            targets = set(find_targets(tree, config))
            mts = modules_to_save_names(tree, config)
    except ValueError as e:  # the config itself does not fit this model
        raise ValueError(f"adapter {str(where)!r} does not fit this {type(tree).__name__}; the model "
                         f"was not changed. {e}") from e
    own = _adapter_tensors(tree, config, targets, adapter_name)  # disk key -> (model key, shape)
    expected = _expected_tensors(tree, targets, mts, adapter_name)  # model key -> (shape, dtype)
    expected.update({key: (shape, torch.float32) for key, shape in own.values()})

    plan: dict[str, str] = {}
    unexpected, bad_shape, quantized = [], [], []
    seen: set[str] = set()  # model keys the adapter provides, fitting or not
    for disk_key, t in state.items():
        if not disk_key.startswith(PREFIX):
            unexpected.append(f"{disk_key} (peft keys start with {PREFIX!r})")
            continue
        name = disk_key[len(PREFIX):]
        key = own[name][0] if name in own else _from_disk_name(name, mts, adapter_name)
        if key not in expected:
            unexpected.append(name)
            continue
        seen.add(key)
        shape, dtype = expected[key]
        if list(t.shape) != list(shape):
            bad_shape.append(f"{_describe(name, own)}: adapter {list(t.shape)} vs model {list(shape)}")
        elif not dtype.is_floating_point:
            quantized.append(key)
        else:
            plan[disk_key] = key
    required = {key: disk for disk, (key, _) in own.items()}
    required.update({k: k.replace(f".modules_to_save.{adapter_name}.", ".") for k in expected
                     if any(k.startswith(f"{x}.modules_to_save.{adapter_name}.") for x in mts)})
    missing = [disk for key, disk in sorted(required.items(), key=lambda kv: kv[1]) if key not in seen]

    if unexpected or bad_shape or quantized or missing:
        parts = []
        if bad_shape:
            parts.append("shapes that do not fit:\n  " + "\n  ".join(bad_shape))
        if unexpected:
            parts.append(f"keys naming modules this model does not have or the config does not adapt "
                         f"({len(unexpected)}):\n  " + "\n  ".join(sorted(unexpected)[:20]))
        if missing:
            parts.append(f"weights the adapter lacks for modules the config adapts ({len(missing)}):\n  "
                         + "\n  ".join(missing[:20]))
        if quantized:
            parts.append("tensors for quantized base weights (cannot be loaded into bitsandbytes storage):"
                         "\n  " + "\n  ".join(quantized[:20]))
        raise _misfit(where, tree, config, parts)
    return plan


def _misfit(where: Path, tree: nn.Module, config, parts: list[str]) -> ValueError:
    trained_on = config.base_model_name_or_path or "unknown"
    return ValueError(
        f"adapter {str(where)!r} does not fit this {type(tree).__name__}; the model was not "
        f"changed.\n" + "\n".join(parts) + f"\nFix: load the adapter into the base model it was "
        f"trained on (base_model_name_or_path: {trained_on}) with the same architecture sizes.")


def _plan_prompt(config, state: dict[str, torch.Tensor], where: Path, adapter_name: str) -> dict[str, str]:
    """Prompt tuning: the file holds `prompt_embeddings` [n * submodules, token_dim], nothing else."""
    want = [config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim]
    parts = []
    if set(state) != {PROMPT_KEY}:
        parts.append(f"a prompt-tuning file holds exactly one tensor, {PROMPT_KEY!r}; found {sorted(state)[:5]}")
    elif list(state[PROMPT_KEY].shape) != want:
        parts.append(f"{PROMPT_KEY}: adapter {list(state[PROMPT_KEY].shape)} vs model {want} (num_virtual_tokens "
                     f"x submodules, token_dim)")
    if parts:
        raise ValueError(f"adapter {str(where)!r} does not fit; the model was not changed.\n" + "\n".join(parts))
    return {PROMPT_KEY: f"prompt_encoder.{adapter_name}.embedding.weight"}


def _adapter_tensors(tree: nn.Module, config, targets: set[str], adapter_name: str) -> dict:
    """{disk key (no prefix): (model key, shape)} of the adapter's own tensors on each target, from
    shape-only (meta-device) adapters built as the injection will build them."""
    out = {}
    for path in sorted(targets):
        module = tree.get_submodule(path)
        if config.peft_type == "ADAPTION_PROMPT":
            adapter = adaption_prompt.AdaptionPrompt(config.adapter_len, tree.config.hidden_size, torch.float32,
                                                     device="meta")
            tensors = dict(adapter.named_parameters())
        else:  # as the injection builds it (an embedding gets its own kind), shapes only
            adapter = new_adapter(config, path, module, torch.float32, torch.device("meta"))
            tensors = saved_tensors(adapter, config, path)
        for name, t in tensors.items():
            out[f"{path}.{name}"] = (f"{path}.adapters.{adapter_name}.{name}", tuple(t.shape))
    return out


def _describe(disk_name: str, own: dict) -> str:
    """"lora_A of <path>" for an adapter tensor, else the disk name."""
    if disk_name in own:
        path, _, rest = own[disk_name][0].partition(".adapters.")
        tensor = rest.partition(".")[2]
        return f"{tensor[:-len('.weight')] if tensor.endswith('.weight') else tensor} of {path}"
    return disk_name


def _expected_tensors(tree: nn.Module, targets: set[str], mts: list[str], adapter_name: str) -> dict:
    """{key in the model once the adapter is added: (shape, dtype)} for the base model's tensors a
    file may give (bias="all", modules_to_save), and the adapter's modules_to_save copies."""
    out = {}
    for key, t in _plain_tensors(tree):
        module_path, _, name = key.rpartition(".")
        spec = (tuple(t.shape), t.dtype)
        owner = next((x for x in mts if key.startswith(f"{x}.")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            out[f"{owner}.original_module.{rest}"] = spec
            out[f"{owner}.modules_to_save.{adapter_name}.{rest}"] = spec
        elif module_path in targets or isinstance(_get(tree, module_path), LoraLinear):
            out[f"{module_path}.base_layer.{name}"] = spec
        elif isinstance(_get(tree, module_path), ModulesToSave):  # another adapter's module to save
            out[f"{module_path}.original_module.{name}"] = spec
        else:
            out[key] = spec
    return out


def _get(tree: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return tree.get_submodule(path)
    except AttributeError:
        return None


def _from_disk_name(key: str, mts: list[str], adapter_name: str) -> str:
    """Disk key (prefix stripped) of a base or modules_to_save tensor -> model key: modules_to_save
    `X.k` or `X.modules_to_save.k` -> `X.modules_to_save.<adapter>.k`; others as they are. (The
    adapter's own tensors are mapped by `_adapter_tensors`.)"""
    for path in mts:
        if key.startswith(f"{path}."):
            rest = key[len(path) + 1:]
            if rest.startswith("original_module."):
                return key
            if rest.startswith("modules_to_save."):
                rest = rest[len("modules_to_save."):]
            return f"{path}.modules_to_save.{adapter_name}.{rest}"
    return key


# ---- files -----------------------------------------------------------------------------------------
def _local_dir(directory: PathLike, need_weights: bool) -> Path:
    """`directory` if it is a local directory; a Hugging Face Hub repo id is downloaded (cached).

    The hub is only consulted for something that is not a local path and is a valid repo id
    (`name` or `owner/name`); anything else that does not exist is a FileNotFoundError.
    """
    path = Path(directory).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(path)!r} is a file; an adapter is a directory holding "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
    text = str(directory)
    if not _looks_like_repo_id(text):
        raise FileNotFoundError(
            f"adapter directory {text!r} does not exist. Fix: pass the directory that "
            f"save_pretrained wrote (it holds {CONFIG_NAME} and {WEIGHTS_NAME}).")
    return _download(text, need_weights)


def _looks_like_repo_id(text: str) -> bool:
    if os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text:
        return False
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) is None:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, need_weights: bool) -> Path:
    """Fetch the adapter files of hub repo `repo_id` (only the two or three files an adapter needs)."""
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_NAME] + ([WEIGHTS_NAME, WEIGHTS_NAME_BIN] if need_weights else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: say what was tried
        raise FileNotFoundError(
            f"adapter directory {repo_id!r} does not exist here, and fetching {repo_id!r} as a Hugging "
            f"Face Hub repo id failed ({type(e).__name__}). Fix: pass an existing adapter directory, "
            f"or a hub repo id you can reach.") from e


def _read_weights(local: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, refused (naming the tensor) if any holds NaN or inf."""
    st, bn = local / WEIGHTS_NAME, local / WEIGHTS_NAME_BIN
    if st.is_file():
        try:
            state = load_file(str(st), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot read the adapter weights {str(st)!r} ({type(e).__name__}: {e}). "
                             f"Fix: re-save the adapter.") from e
    elif bn.is_file():
        try:
            # weights_only: a .bin is a pickle; never run code from a downloaded file.
            state = torch.load(str(bn), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, AttributeError) as e:
            # torch's own message suggests weights_only=False (running the file's code): not repeated
            raise ValueError(f"{str(bn)!r} is corrupt or not a PyTorch state dict of tensors "
                             f"({type(e).__name__}). Fix: re-save the adapter (safetensors is preferred).") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{str(bn)!r} does not hold a dict of tensors. Fix: re-save the adapter.")
    else:
        raise FileNotFoundError(
            f"adapter directory {str(local)!r} has no weights file: expected {WEIGHTS_NAME} (or "
            f"{WEIGHTS_NAME_BIN}) next to {CONFIG_NAME}. Found: {sorted(p.name for p in local.iterdir())}.")
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"adapter weights in {str(local)!r} hold NaN or inf: {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}; refusing to load them, the model was not changed.")
    return state

