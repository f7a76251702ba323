"""PEFT-format adapter files: save ours so peft / transformers read them, and load theirs (or ours).

An adapter directory holds two files:

    adapter_config.json         LoraConfig.to_dict(): peft's fields only, inference_mode true
    adapter_model.safetensors   metadata {"format": "pt"}; adapter_model.bin is read too

Tensor keys on disk (checked against peft 0.21.2's save_pretrained; P = module path in the HF model):

    base_model.model.P.lora_A.weight     [r, in]     every LoRA layer
    base_model.model.P.lora_B.weight     [out, r]
    base_model.model.P.base_layer.bias   [out]       bias="lora_only": biases of the LoRA layers
    base_model.model.<any>.bias                      bias="all": every ".bias" of the model, under
                                                     its module path (P.base_layer.bias for LoRA
                                                     layers; X.original_module.bias and
                                                     X.modules_to_save.bias inside a
                                                     modules_to_save module X)
    base_model.model.X.<name>                        modules_to_save X: the trained copy's tensors

Loading checks every key and shape against the model *before* anything is injected, so an adapter
that does not fit raises ValueError (naming the modules, keys and shapes) and leaves the base model
exactly as it was. Saving writes to a temporary directory beside the target and renames into place,
so a failure never leaves a half-written adapter over a good one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import inject, quant
from .config import LoraConfig
from .inject import ModulesToSave, find_targets
from .model import LoraModel, get_lora_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # peft's prefix: PeftModel.base_model (LoraModel) .model (HF model)

PathLike = Union[str, os.PathLike]


# ---- state dict ------------------------------------------------------------------------------------
def adapter_state_dict(model: LoraModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's on-disk keys (detached views of the live parameters)."""
    cfg = model.lora_config
    hf = model.base_model
    layers = model.lora_layers()
    mts = _modules_to_save(hf)
    out: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        out[f"{path}.lora_A.weight"] = layer.lora_A.weight  # [r, in]
        out[f"{path}.lora_B.weight"] = layer.lora_B.weight  # [out, r]
    if cfg.bias == "all":
        # peft keeps every state-dict key ending in ".bias", wherever it lives.
        for key, t in _tensors(hf):
            if key == "bias" or key.endswith(".bias"):
                out[_to_disk_name(key, mts)] = t
    elif cfg.bias == "lora_only":
        for path, layer in layers.items():
            if getattr(layer.base_layer, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = layer.base_layer.bias
    for path, module in mts.items():
        for key, t in _tensors(module.trainable_module):
            out[f"{path}.{key}"] = t
    return {PREFIX + k: v.detach() for k, v in out.items()}


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


def _modules_to_save(hf: nn.Module) -> dict[str, ModulesToSave]:
    return {n: m for n, m in hf.named_modules() if isinstance(m, ModulesToSave)}


def _to_disk_name(key: str, mts) -> str:
    """Our `X.trainable_module.k` is peft's `X.modules_to_save.<adapter>.k`, written without the
    adapter name as `X.modules_to_save.k`."""
    for path in mts:
        inner = f"{path}.trainable_module."
        if key.startswith(inner):
            return f"{path}.modules_to_save.{key[len(inner):]}"
    return key


# ---- save ------------------------------------------------------------------------------------------
def save_adapter(model: LoraModel, directory: PathLike, is_main_process: bool = True) -> Path:
    """Write `model`'s adapter to `directory` in peft's format; returns the directory.

    Files are written into a temporary directory beside the target, then renamed into place; other
    files already in `directory` (a tokenizer, a README) are kept. On any error the previous adapter
    files, if any, are left as they were.

    is_main_process: as peft's; only the main process writes. Under FSDP every process must call
    this: sharded (DTensor) adapter weights are all-gathered to whole tensors first.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save the adapter to {str(target)!r}: it is a file. "
                                 f"Fix: pass a directory path.")
    config = model.lora_config.to_dict()
    if not config.get("base_model_name_or_path"):
        hf = model.base_model
        config["base_model_name_or_path"] = (getattr(hf, "name_or_path", None)
                                             or getattr(getattr(hf, "config", None), "_name_or_path", None)
                                             or None)
    config["inference_mode"] = True  # what peft writes: a saved adapter loads frozen unless asked
    tensors = _for_safetensors(adapter_state_dict(model))
    if not is_main_process:
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (same filesystem, so the rename is atomic); os.mkdir honours the umask,
    # unlike tempfile.mkdtemp's 0700, so the adapter ends up with the permissions of any new folder.
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        # safetensors (0.8) creates its file 0600; an adapter is made to be shared and served, so
        # give it the mode of any new file (0644 under the usual umask).
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~_umask())
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if not target.exists():
            os.rename(tmp, target)  # the whole adapter appears at once
            return target
        # Keep the directory's other files: replace ours one by one, each replace atomic. Weights
        # first, so the config never describes weights that are not there yet.
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, target / name)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _for_safetensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, whole (FSDP shards gathered), contiguous, no two entries sharing storage (safetensors
    refuses shared tensors)."""
    from torch.distributed.tensor import DTensor

    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in sd.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()  # a collective: every process walks the same keys in the same order
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen:
            t = t.clone()
        seen.add(ident)
        out[k] = t
    return out


# ---- load ------------------------------------------------------------------------------------------
def read_config(directory: PathLike) -> LoraConfig:
    """The LoraConfig in `directory`/adapter_config.json (ours or peft's; a hub repo id works too)."""
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
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Fix: re-save the adapter.") from e
    return LoraConfig.from_dict(raw)


def load_adapter(base_model: nn.Module, directory: PathLike, is_trainable: bool = False) -> LoraModel:
    """Wrap `base_model` in a LoraModel holding the adapter in `directory` (ours or peft's).

    Everything is checked before the model changes: a missing file raises FileNotFoundError, an
    adapter whose module names or tensor shapes do not fit raises ValueError naming them, and in
    both cases `base_model` is left untouched. Tensors are cast to the dtype of the parameter they
    fill (LoRA weights: fp32, as peft). Unless `is_trainable`, every parameter is frozen and the
    model is put in eval mode (peft's inference mode).
    """
    local = _local_dir(directory, need_weights=True)
    config = read_config(local)
    config.inference_mode = not is_trainable
    state = _read_weights(local)
    plan = _plan(base_model, config, state, local)  # raises before any change to base_model

    model = get_lora_model(base_model, config)
    live = dict(_tensors(model.base_model))
    with torch.no_grad():
        for disk_key, model_key in plan.items():
            dst = live[model_key]
            dst.copy_(state[disk_key].to(device=dst.device, dtype=dst.dtype))
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def _plan(base: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], where: Path) -> dict[str, str]:
    """{disk key: key in the LoRA-wrapped model} for every tensor in `state`, computed from `base`
    as it is now (nothing is injected). Raises ValueError listing every key that does not fit."""
    try:
        targets = set(find_targets(base, config))
        mts = inject._modules_to_save_names(base, config)
    except ValueError as e:  # the config itself does not fit this model
        raise ValueError(f"adapter {str(where)!r} does not fit this {type(base).__name__}; the model "
                         f"was not changed. {e}") from e
    expected = _expected_tensors(base, config, targets, mts)  # wrapped key -> (shape, dtype)

    plan: dict[str, str] = {}
    unexpected, bad_shape, quantized = [], [], []
    seen: set[str] = set()  # wrapped keys the adapter provides, fitting or not
    for disk_key, t in state.items():
        if not disk_key.startswith(PREFIX):
            unexpected.append(f"{disk_key} (peft keys start with {PREFIX!r})")
            continue
        key = _from_disk_name(disk_key[len(PREFIX):], mts)
        if key not in expected:
            unexpected.append(disk_key[len(PREFIX):])
            continue
        seen.add(key)
        shape, dtype = expected[key]
        if list(t.shape) != list(shape):
            bad_shape.append(_shape_msg(key, disk_key[len(PREFIX):], list(t.shape), list(shape)))
        elif not dtype.is_floating_point:
            quantized.append(key)
        else:
            plan[disk_key] = key
    required = [f"{p}.lora_{ab}.weight" for p in sorted(targets) for ab in "AB"]
    required += [k for k in expected if any(k.startswith(f"{x}.trainable_module.") for x in mts)]
    missing = [k for k in required if k not in seen]

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
        trained_on = config.base_model_name_or_path or "unknown"
        raise ValueError(
            f"adapter {str(where)!r} does not fit this {type(base).__name__}; the model was not "
            f"changed.\n" + "\n".join(parts) + f"\nFix: load the adapter into the base model it was "
            f"trained on (base_model_name_or_path: {trained_on}) with the same architecture sizes.")
    return plan


def _expected_tensors(base: nn.Module, config: LoraConfig, targets: set[str], mts: list[str]) -> dict:
    """{key in the wrapped model: (shape, dtype)} as `get_lora_model(base, config)` would make it."""
    out = {}
    for path in targets:
        k_in, n_out = quant.in_out_features(base.get_submodule(path))
        r = inject._pattern_value(config.rank_pattern, path, config.r)
        out[f"{path}.lora_A.weight"] = ((r, k_in), torch.float32)
        out[f"{path}.lora_B.weight"] = ((n_out, r), torch.float32)
    for key, t in _tensors(base):
        module_path, _, name = key.rpartition(".")
        spec = (tuple(t.shape), t.dtype)
        owner = next((x for x in mts if key.startswith(f"{x}.")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            out[f"{owner}.original_module.{rest}"] = spec
            out[f"{owner}.trainable_module.{rest}"] = spec
        elif module_path in targets:
            out[f"{module_path}.base_layer.{name}"] = spec
        else:
            out[key] = spec
    return out


def _from_disk_name(key: str, mts: list[str]) -> str:
    """Inverse of `_to_disk_name`, plus peft's modules_to_save form `X.k` -> `X.trainable_module.k`."""
    for path in mts:
        if key.startswith(f"{path}."):
            rest = key[len(path) + 1:]
            if rest.startswith("original_module."):
                return key
            if rest.startswith("modules_to_save."):
                rest = rest[len("modules_to_save."):]
            return f"{path}.trainable_module.{rest}"
    return key


_LORA_KEY = re.compile(r"(?P<path>.+)\.(?P<which>lora_[AB])\.weight")


def _shape_msg(key: str, disk_name: str, got: list, want: list) -> str:
    """"lora_A of <path>: adapter [8, 64] vs model [8, 128]"; other tensors by their disk name."""
    m = _LORA_KEY.fullmatch(key)
    name = f"{m['which']} of {m['path']}" if m else disk_name
    return f"{name}: adapter {got} vs model {want}"


# ---- files -----------------------------------------------------------------------------------------
def _local_dir(directory: PathLike, need_weights: bool) -> Path:
    """`directory` if it is a local directory; a Hugging Face Hub repo id is downloaded (cached).

    The hub is only consulted for something that is not a local path and looks like a repo id
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
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) is not None


def _download(repo_id: str, need_weights: bool) -> Path:
    """Fetch the adapter files of hub repo `repo_id` (only the two or three files an adapter needs)."""
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_NAME] + ([WEIGHTS_NAME, WEIGHTS_NAME_BIN] if need_weights else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: say what was tried
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and fetching it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {e}). Fix: pass an existing adapter directory, or a hub "
            f"repo id you can reach.") from e


def _read_weights(local: Path) -> dict[str, torch.Tensor]:
    st, bn = local / WEIGHTS_NAME, local / WEIGHTS_NAME_BIN
    try:
        if st.is_file():
            return load_file(str(st), device="cpu")
        if bn.is_file():
            # weights_only: a .bin is a pickle; never run code from a downloaded file.
            return torch.load(str(bn), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read the adapter weights in {str(local)!r} ({type(e).__name__}: {e}). "
                         f"Fix: re-save the adapter.") from e
    raise FileNotFoundError(
        f"adapter directory {str(local)!r} has no weights file: expected {WEIGHTS_NAME} (or "
        f"{WEIGHTS_NAME_BIN}) next to {CONFIG_NAME}. Found: {sorted(p.name for p in local.iterdir())}.")
