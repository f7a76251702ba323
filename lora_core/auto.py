"""Open an adapter from its folder (or hub id) alone, as peft's AutoPeftModel* do.

    model = AutoLoraModelForCausalLM.from_pretrained("runs/a/adapter", dtype=torch.bfloat16,
                                                     quantization_config=bnb_config, device_map="auto")

The adapter's adapter_config.json names the base (`base_model_name_or_path`, `revision`); the base
is loaded with the transformers auto class of the adapter's task type (AutoModelForCausalLM for
CAUSAL_LM, ...; lora_core.tasks.AUTO_CLASSES) and every keyword argument, then the adapter with
`LoraModel.from_pretrained`. Loading by hand gives the same model:

    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, **kwargs)
    model = LoraModel.from_pretrained(base, "runs/a/adapter")

An adapter saved without a task type carries peft's `auto_mapping` ({"base_model_class":
"LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"}): the generic
`AutoLoraModel` opens it with that class (imported only from transformers, as peft's allowlist).
Unlike peft's AutoPeftModel, `AutoLoraModel` also opens an adapter that has a task type, with that
task's auto class. A task-specific class given an adapter of another task refuses, naming the class
that fits, before the base is loaded.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

from .tasks import AUTO_CLASSES

ALLOWED_LIBRARIES = ("transformers",)  # auto_mapping may import from these packages only
TOKENIZER_CONFIG = "tokenizer_config.json"


class AutoLoraModel:
    """Opens any adapter: the base class from its task type, else from its auto_mapping."""

    task_type: Optional[str] = None  # the task a subclass opens; None: any

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not instantiated; use "
                        f"{type(self).__name__}.from_pretrained(adapter_dir_or_hub_id, **base_kwargs)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs):
        """The LoraModel of the adapter in `pretrained_model_name_or_path` (a folder or hub id) on
        the base its config names. kwargs go to the base's `from_pretrained` (dtype,
        quantization_config, device_map, revision, ...; the config's `revision` is the default).
        Everything about the adapter's config is checked before the base is loaded."""
        from . import io
        from .model import LoraModel

        config = io.read_config(pretrained_model_name_or_path)
        model_class = cls._base_class(config, pretrained_model_name_or_path)
        base_id = config.base_model_name_or_path
        if not base_id:
            raise ValueError(f"adapter {str(pretrained_model_name_or_path)!r} does not name its base model "
                             f"(base_model_name_or_path is empty in adapter_config.json). Fix: load the base "
                             f"yourself, then LoraModel.from_pretrained(base, {str(pretrained_model_name_or_path)!r}).")
        if config.revision is not None:
            kwargs.setdefault("revision", config.revision)
        base = model_class.from_pretrained(base_id, **kwargs)
        _resize_to_adapter_tokenizer(base, pretrained_model_name_or_path)
        return LoraModel.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                         is_trainable=is_trainable)

    @classmethod
    def _base_class(cls, config, where):
        import transformers

        task = config.task_type
        if cls.task_type is not None:
            if task is not None and task != cls.task_type:
                fits = next(c.__name__ for c in _TASK_CLASSES if c.task_type == task)
                raise ValueError(f"adapter {str(where)!r} was saved for task_type={task!r}, not "
                                 f"{cls.task_type!r}. Fix: open it with lora_core.{fits}.")
            return getattr(transformers, AUTO_CLASSES[cls.task_type])
        if task is not None:
            return getattr(transformers, AUTO_CLASSES[task])
        mapping = config.auto_mapping or {}
        name, library = mapping.get("base_model_class"), mapping.get("parent_library")
        if not name or not library:
            raise ValueError(f"adapter {str(where)!r} has neither a task_type nor an auto_mapping, so the "
                             f"class of its base model is unknown. Fix: open it with the class for its task, "
                             f"e.g. lora_core.AutoLoraModelForCausalLM.")
        if not any(library == lib or library.startswith(lib + ".") for lib in ALLOWED_LIBRARIES):
            raise ValueError(f"adapter {str(where)!r}: auto_mapping names {library}.{name}; only classes from "
                             f"{list(ALLOWED_LIBRARIES)} are imported. Fix: load the base yourself, then "
                             f"LoraModel.from_pretrained(base, adapter).")
        try:
            return getattr(importlib.import_module(library), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"adapter {str(where)!r}: auto_mapping names {library}.{name}, which this "
                             f"transformers does not have ({e}).") from e


def _resize_to_adapter_tokenizer(base, where) -> None:
    """peft's rule: a tokenizer saved beside the adapter with more tokens than the base's input
    embedding rows means the vocabulary was grown for training: grow the base the same way. Only
    for a local folder (a hub adapter is fetched without its tokenizer)."""
    path = Path(os.fspath(where)).expanduser()
    if not (path / TOKENIZER_CONFIG).is_file() or not hasattr(base, "get_input_embeddings"):
        return
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rows = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        base.resize_token_embeddings(len(tokenizer))


class AutoLoraModelForCausalLM(AutoLoraModel):
    task_type = "CAUSAL_LM"


class AutoLoraModelForSeq2SeqLM(AutoLoraModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoLoraModelForSequenceClassification(AutoLoraModel):
    task_type = "SEQ_CLS"


class AutoLoraModelForTokenClassification(AutoLoraModel):
    task_type = "TOKEN_CLS"


class AutoLoraModelForQuestionAnswering(AutoLoraModel):
    task_type = "QUESTION_ANS"


class AutoLoraModelForFeatureExtraction(AutoLoraModel):
    task_type = "FEATURE_EXTRACTION"


_TASK_CLASSES = (AutoLoraModelForCausalLM, AutoLoraModelForSeq2SeqLM, AutoLoraModelForSequenceClassification,
                 AutoLoraModelForTokenClassification, AutoLoraModelForQuestionAnswering,
                 AutoLoraModelForFeatureExtraction)
