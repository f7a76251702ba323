"""Task types as peft has them: which heads a task trains in full, and which transformers auto
class opens the base model an adapter of that task was trained on.

For LoRA, peft's task classes (PeftModelForSequenceClassification, ...) differ in one thing: the
model's task head goes into `modules_to_save`, so it trains in full (it starts at a random init)
and is saved with the adapter:

    SEQ_CLS, TOKEN_CLS      "classifier", "score"
    QUESTION_ANS            "qa_outputs"
    CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION, None: no head

The head names are added to the config before the targets are matched, and a modules_to_save
module is never a target, so a head is never LoRA-wrapped, also under target_modules="all-linear".
peft 0.21 adds TOKEN_CLS's names only after injecting: with "all-linear" it puts LoRA on the random
head and then fails; here every task adds them first.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

# task_type -> module names (suffixes) peft adds to modules_to_save (peft_model.py, 0.21)
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# task_type -> the transformers auto class that builds its base model (peft's AutoPeftModelFor*)
AUTO_CLASSES: dict[Optional[str], str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def add_task_heads(config) -> None:
    """Append the task's head names to config.modules_to_save (in place; names already listed are
    not repeated, unlike peft, which appends them again on every load)."""
    heads = TASK_HEADS.get(config.task_type, ())
    if not heads or not hasattr(config, "modules_to_save"):  # a method without modules to save
        return
    names = list(config.modules_to_save or [])
    config.modules_to_save = names + [h for h in heads if h not in names]


def check_task_heads(model: nn.Module, config) -> None:
    """Refuse a task type whose head this model lacks (peft then silently trains no head, and the
    classifier stays at its random init). Call after add_task_heads."""
    heads = TASK_HEADS.get(config.task_type, ())
    if not heads or not hasattr(config, "modules_to_save"):
        return
    paths = [name for name, _ in model.named_modules()]
    if not any(p.endswith(m) for p in paths for m in config.modules_to_save or []):
        raise ValueError(
            f"task_type={config.task_type!r} trains the model's head in full, but this "
            f"{type(model).__name__} has no module named {' or '.join(map(repr, heads))}. Fix: load the "
            f"base with transformers.{AUTO_CLASSES[config.task_type]}, or name its head in modules_to_save.")
