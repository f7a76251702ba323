"""Share an adapter on the Hugging Face Hub: the adapter files only, never the base model.

`LoraModel.push_to_hub(repo_id)` writes the adapter(s) with `save_pretrained` into a temporary
folder (every check of saving runs before the hub is contacted), adds a model card (README.md),
and uploads that folder in one commit through `huggingface_hub.HfApi.upload_folder`:

    adapter_config.json, adapter_model.safetensors    (and <name>/... for every other adapter)
    README.md                                          only if the repo has none yet

The wrapped transformers model has its own push_to_hub, which would upload the whole base model
(its weights under `base_layer.weight` keys): a 20 MB adapter would go up as a 14 GB model. That
method is never reached through a LoraModel.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

README = "README.md"
# config fields the card lists, when the adapter's method has them
SETTINGS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_r", "target_r",
            "num_virtual_tokens", "adapter_len")


def push_to_hub(model, repo_id: str, *, commit_message: Optional[str] = "Upload adapter",
                commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
                revision: Optional[str] = None, create_pr: bool = False,
                selected_adapters: Optional[Sequence[str]] = None, tags: Optional[Sequence[str]] = None):
    """Upload `model`'s adapters to hub repo `repo_id` (created if missing); returns the CommitInfo.

    An existing README.md in the repo is kept (never replaced); otherwise a model card naming the
    base model, the LoRA settings and how to load the adapter goes up with it.
    """
    from huggingface_hub import HfApi

    from . import io

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        io.save_adapters(model, folder, selected_adapters)  # checks everything before the hub is asked
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if not api.file_exists(repo, README, revision=revision):
            (folder / README).write_text(model_card(model, repo, tags), encoding="utf-8")
        return api.upload_folder(repo_id=repo, folder_path=folder, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision,
                                 create_pr=create_pr,
                                 allow_patterns=[io.CONFIG_NAME, io.WEIGHTS_NAME, README,
                                                 f"*/{io.CONFIG_NAME}", f"*/{io.WEIGHTS_NAME}"])


def create_or_update_model_card(model, output_dir) -> Path:
    """Write README.md in `output_dir` (peft's method): a new model card, or, when one exists, the
    same text with the hub metadata (library_name, base_model, tags) filled in."""
    from huggingface_hub import ModelCard

    path = Path(output_dir) / README
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(model_card(model, Path(output_dir).name), encoding="utf-8")
        return path
    card = ModelCard.load(path)
    meta = _metadata(model, card.data.tags)
    for key, value in meta.items():
        if getattr(card.data, key, None) in (None, []):
            setattr(card.data, key, value)
    card.data.tags = meta["tags"]
    card.save(path)
    return path


def model_card(model, title: str, tags: Optional[Sequence[str]] = None) -> str:
    """The README.md text: hub metadata, what the adapter is, how to load it."""
    from huggingface_hub import ModelCardData

    meta = _metadata(model, tags)
    config = model.peft_config[model.active_adapters[0]]
    base = config.base_model_name_or_path
    targets = getattr(config, "target_modules", None)
    targets = sorted(targets) if isinstance(targets, set) else targets
    settings = ", ".join(f"{k}={getattr(config, k)}" for k in SETTINGS if hasattr(config, k))
    auto = _auto_class(config.task_type)
    lines = [
        "---", ModelCardData(**meta).to_yaml(), "---", "",
        f"# {title}", "",
        f"A {config.peft_type} adapter in PEFT format{f' for `{base}`' if base else ''}, trained with lorafuse.",
        "",
        f"- {settings}",
        f"- target_modules: {targets}",
        f"- adapters: {sorted(model.peft_config)}",
    ]
    quant = getattr(getattr(model.base_model, "config", None), "quantization_config", None)
    if quant is not None:
        q = quant if isinstance(quant, dict) else quant.to_dict()
        kind = (f"4-bit {q.get('bnb_4bit_quant_type')}" if q.get("load_in_4bit")
                else "8-bit" if q.get("load_in_8bit") else str(q.get("quant_method")))
        lines.append(f"- trained on a {kind} quantized base")
    lines += ["", "## Use", "", "```python",
              f"from lora_core import {auto}", f"model = {auto}.from_pretrained({title!r})",
              f"# or with peft: peft.AutoPeft{auto[len('AutoLora'):]}.from_pretrained({title!r})",
              "```", ""]
    return "\n".join(lines)


def _metadata(model, extra_tags=None) -> dict:
    config = model.peft_config[model.active_adapters[0]]
    base = config.base_model_name_or_path
    hub_base = base if base and _is_hub_id(base) else None
    tags = sorted(set(extra_tags or []) | {"lora", "lorafuse"}
                  | ({f"base_model:adapter:{hub_base}"} if hub_base else set()))
    meta = {"library_name": "peft", "tags": tags}
    if hub_base:
        meta["base_model"] = hub_base
    if config.task_type == "CAUSAL_LM":
        meta["pipeline_tag"] = "text-generation"
    return meta


def _is_hub_id(name: str) -> bool:
    """A base named by hub id (a local path means nothing on the hub, and the hub rejects it)."""
    from .io import _looks_like_repo_id
    return not os.path.exists(name) and _looks_like_repo_id(name)


def _auto_class(task_type) -> str:
    from .auto import AutoLoraModel, _TASK_CLASSES
    return next((c.__name__ for c in _TASK_CLASSES if c.task_type == task_type), AutoLoraModel.__name__)
