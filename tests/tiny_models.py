"""Tiny Hugging Face models built from configs, saved and loaded back through `from_pretrained`.

Dimensions are multiples of 64 so every linear layer fits bitsandbytes' CPU constraints
(out_features % 32 == 0, in_features % blocksize(64) == 0), except the output heads, which LoRA
never targets by default and which bitsandbytes keeps in full precision (`llm_int8_skip_modules`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

HIDDEN = 64
VOCAB = 128

# name -> (config class, kwargs, model class). One entry per architecture family the tests cover.
ARCHS = {
    "llama": (
        "LlamaConfig",
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             tie_word_embeddings=False),
        "LlamaForCausalLM",
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128),
        "GPT2LMHeadModel",
    ),
    "bloom": (
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4),
        "BloomForCausalLM",
    ),
    "t5": (
        "T5Config",
        dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
             num_heads=4, decoder_start_token_id=0, pad_token_id=0),
        "T5ForConditionalGeneration",
    ),
}


def save_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """Build `arch` from its config with a fixed seed and `save_pretrained` it to `path`."""
    cfg_cls, kwargs, model_cls = ARCHS[arch]
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    # Random non-zero biases and norms so bias handling and fp32-cast paths are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def load_tiny(path: Path, arch: str, quantization: str = "none", dtype: torch.dtype = torch.float32):
    """Load a saved tiny model the way users do: `from_pretrained`, optionally through bitsandbytes.

    quantization: "none" | "nf4" (double quant) | "fp4" | "int8". 4-bit models compute in `dtype`.
    """
    model_cls = getattr(transformers, ARCHS[arch][2])
    kwargs: dict = {"dtype": dtype}
    if quantization in ("nf4", "fp4"):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=(quantization == "nf4"), bnb_4bit_compute_dtype=dtype)
    elif quantization == "int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}")
    model = model_cls.from_pretrained(path, **kwargs)
    model.eval()
    return model


def example_inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    """A batch of random token ids (and decoder ids for T5) with labels for a loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    if arch == "t5":
        dec = torch.randint(1, VOCAB, (batch, seq), generator=g)
        return {"input_ids": ids, "labels": dec}
    return {"input_ids": ids, "labels": ids.clone()}
