"""Tiny task models (classification, token classification, question answering) built from configs.

Heads as transformers names them: Llama's `score` (sequence and token classification) and
`qa_outputs`; BERT's `classifier`. Sizes follow tests/tiny_models.py (multiples of 64).
"""
from __future__ import annotations

import torch
import transformers

NUM_LABELS = 3
CONFIGS = {
    "llama": ("LlamaConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  pad_token_id=0, num_labels=NUM_LABELS)),
    "bert": ("BertConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, num_labels=NUM_LABELS)),
}
TASK_CLASS_SUFFIX = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
                     "QUESTION_ANS": "ForQuestionAnswering"}
PREFIX = {"llama": "Llama", "bert": "Bert"}


def task_config(arch: str):
    cfg_cls, kwargs = CONFIGS[arch]
    return getattr(transformers, cfg_cls)(**kwargs)


def build_task_model(arch: str, task: str, seed: int = 0):
    """`arch` with the head of `task` (a peft task_type), fp32, eval mode, the same weights per seed."""
    torch.manual_seed(seed)
    cls = getattr(transformers, PREFIX[arch] + TASK_CLASS_SUFFIX[task])
    return cls(task_config(arch)).eval()


def save_task_model(arch: str, task: str, path, seed: int = 0):
    build_task_model(arch, task, seed).save_pretrained(path)
    return path


def task_inputs(batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    """Token ids (no padding, id 0 is the pad id) and an attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
