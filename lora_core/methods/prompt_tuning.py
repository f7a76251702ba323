"""Prompt tuning (Lester et al. 2021): learned virtual tokens prepended to the input, peft's PROMPT_TUNING.

    causal LM:  inputs_embeds = [prompt (n, d); embed(input_ids)]      attention mask: n ones first,
                labels: n times -100 first; the logits then cover the virtual positions too
                ([batch, n + seq, vocab], as peft's)
    seq2seq:    the encoder input gets the prompt; the decoder is unchanged

The prompt is `prompt_encoder[<adapter>].embedding.weight` [n * num_transformer_submodules, d]
(peft's module names; seq2seq models get 2n rows of which the encoder uses the first n, as peft).
File key: `prompt_embeddings` (no prefix). Init: "RANDOM" (nn.Embedding's N(0, 1)), "SAMPLE_VOCAB"
(rows of the word embeddings at random token ids) or "TEXT" (the embeddings of a tokenized text,
repeated or cut to n). Unlike peft, a saved prompt can be loaded trainable (is_trainable=True) to
continue training.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import MethodConfig

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(MethodConfig):
    """peft's PromptTuningConfig, field for field. token_dim / num_layers / num_attention_heads /
    num_transformer_submodules are filled from the model when None (peft does the same)."""

    task_type: Optional[str] = None
    peft_type: str = "PROMPT_TUNING"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    target_modules = None  # no layer is adapted

    def __post_init__(self):
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        self.validate()

    def validate(self) -> None:
        if self.peft_type != "PROMPT_TUNING":
            raise ValueError(f"peft_type={self.peft_type!r}: PromptTuningConfig is peft_type 'PROMPT_TUNING'")
        self._check_common()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_virtual_tokens={n!r}: must be a positive integer (e.g. 8)")
        if self.prompt_tuning_init not in INITS:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r}: use one of {list(INITS)}")
        if self.prompt_tuning_init == "TEXT" and not (self.tokenizer_name_or_path and self.prompt_tuning_init_text):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("tokenizer_kwargs only apply with prompt_tuning_init='TEXT' (as in peft)")
        if self.modules_to_save:
            raise ValueError("modules_to_save with prompt tuning is not implemented in lorafuse")

    def prepare_for(self, model: nn.Module) -> None:
        """peft's _prepare_prompt_learning_config: the model's sizes where the config has None."""
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()

        def first(*names):
            for name in names:
                if getattr(cfg, name, None) is not None:
                    return getattr(cfg, name)
            raise ValueError(f"cannot read {names[0]} from the model config. Fix: set it in PromptTuningConfig.")

        if self.num_layers is None:
            self.num_layers = first("num_hidden_layers", "num_layers", "n_layer")
        if self.token_dim is None:
            self.token_dim = first("hidden_size", "n_embd", "d_model")
        if self.num_attention_heads is None:
            self.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1


class PromptEmbedding(nn.Module):
    """The virtual tokens of one prompt-tuning adapter: `embedding` [total, token_dim] (fp32)."""

    method = "prompt_tuning"

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding, initialise: bool = True):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.num_virtual_tokens = config.num_virtual_tokens
        self.disabled = False
        self.embedding = nn.Embedding(total, config.token_dim)  # N(0, 1) init: peft's "RANDOM"
        if not initialise or config.inference_mode:  # weights come from a file (peft skips it too)
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
            self._copy_rows(word_embeddings, ids)
        elif config.prompt_tuning_init == "TEXT":
            from transformers import AutoTokenizer
            kwargs = dict(config.tokenizer_kwargs or {})
            kwargs.pop("trust_remote_code", None)  # never run a tokenizer's code from a config
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
            ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            ids = (ids * math.ceil(total / len(ids)))[:total]  # repeat or cut to `total`
            self._copy_rows(word_embeddings, torch.tensor(ids, dtype=torch.long))

    def _copy_rows(self, word_embeddings: nn.Embedding, ids: torch.Tensor) -> None:
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)

    def forward(self, batch_size: int) -> torch.Tensor:
        """[batch, total, token_dim]: looked up per row as peft does (so gradients sum the same way)."""
        w = self.embedding.weight
        ids = torch.arange(w.shape[0], device=w.device).unsqueeze(0).expand(batch_size, -1)
        return self.embedding(ids)


def word_embeddings(model: nn.Module) -> nn.Embedding:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"prompt tuning needs the model's input embedding (get_input_embeddings()); "
                         f"{type(model).__name__} gives {type(emb).__name__}")
    return emb


def _drop_unsupported(kwargs: dict) -> None:
    for key in ("position_ids", "token_type_ids"):
        if kwargs.get(key) is not None:
            warnings.warn(f"{key} are ignored with prompt tuning (as in peft): the virtual tokens shift every "
                          f"position.")
            kwargs[key] = None


def prepend(encoder: PromptEmbedding, base: nn.Module, input_ids=None, attention_mask=None, inputs_embeds=None,
            labels=None, seq2seq: bool = False) -> dict:
    """The keyword arguments for the base model's forward / generate with the prompt in front."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds")
        inputs_embeds = word_embeddings(base)(input_ids)  # [b, seq, d]
    b, n = inputs_embeds.shape[0], encoder.num_virtual_tokens
    out = {}
    if attention_mask is not None:
        ones = torch.ones(b, n, dtype=attention_mask.dtype, device=attention_mask.device)
        out["attention_mask"] = torch.cat((ones, attention_mask), dim=1)  # [b, n + seq]
    if labels is not None:
        out["labels"] = labels if seq2seq else torch.cat(
            (torch.full((b, n), -100, dtype=labels.dtype, device=labels.device), labels), dim=1)
    prompts = encoder(b)[:, :n].to(inputs_embeds.dtype)  # [b, n, d] (seq2seq: the encoder's half)
    out["inputs_embeds"] = torch.cat((prompts, inputs_embeds), dim=1)  # [b, n + seq, d]
    return out


def forward(encoder: PromptEmbedding, base: nn.Module, *args, **kwargs):
    """base(...) with the prompt prepended (positional arguments: input_ids, attention_mask)."""
    names = ("input_ids", "attention_mask")
    if len(args) > len(names):
        raise TypeError("with prompt tuning pass the inputs by keyword (input_ids=..., attention_mask=..., labels=...)")
    kwargs.update(zip(names, args))
    _drop_unsupported(kwargs)
    seq2seq = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
    inputs = {k: kwargs.pop(k, None) for k in ("input_ids", "attention_mask", "inputs_embeds", "labels")}
    kwargs.update(prepend(encoder, base, seq2seq=seq2seq, **inputs))
    return base(**kwargs)


def generate(encoder: PromptEmbedding, base: nn.Module, *args, **kwargs):
    """base.generate with the prompt prepended. Returns input_ids followed by the new tokens
    (decoder-only models; what peft returns), or the decoder's tokens (seq2seq)."""
    if args:
        kwargs["input_ids"] = args[0]
    _drop_unsupported(kwargs)
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("generate with prompt tuning needs input_ids")
    seq2seq = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
    kwargs.update(prepend(encoder, base, input_ids=input_ids, attention_mask=kwargs.pop("attention_mask", None),
                          seq2seq=seq2seq))
    out = base.generate(**kwargs)
    if seq2seq or not isinstance(out, torch.Tensor):  # a generate output object: as transformers gives it
        return out
    # transformers returns only the new tokens when generation starts from inputs_embeds
    return torch.cat((input_ids, out), dim=1)
