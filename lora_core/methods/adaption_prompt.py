"""Llama-Adapter (Zhang et al. 2023): learned prompts with zero-init gates in the top attention layers,
peft's ADAPTION_PROMPT.

In each of the top `adapter_layers` attention modules, the layer's own queries also attend to
`adapter_len` learned prompt tokens P [1, L, hidden], separately from the sequence:

    k, v  = k_proj(P), v_proj(P)                      [b, heads, L, head_dim] (kv heads repeated)
    s     = gate * softmax(q k^T / sqrt(head_dim))    softmax in fp32; q as the layer computes it
                                                      (after rotary embedding); gate starts at 0
    out   = attention(x) + o_proj(s v)                [b, seq, hidden]

so the model starts exactly as the base. No causal or padding mask applies to the prompt. GPT-2
(peft supports it too): k, v from c_attn(P), and the prompt term is added without c_proj, as peft
does. Parameters: `adaption_prompt` [1, L, hidden] (N(0, 1)) and `adaption_gate` [1] in the base
attention's dtype (fp32 for a quantized base), as peft. File keys: `<attention path>.adaption_prompt`
and `.adaption_gate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import MethodConfig

# model_type -> (attention module name, key projection, value projection, output projection);
# peft 0.21's TRANSFORMERS_MODEL_CONFIG for adaption prompts (facts).
ARCHITECTURES = {
    "llama": ("self_attn", "k_proj", "v_proj", "o_proj"),
    "mistral": ("self_attn", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("attn", "c_attn", None, None),
}


@dataclass
class AdaptionPromptConfig(MethodConfig):
    """peft's AdaptionPromptConfig: adapter_len prompt tokens in the top adapter_layers attention
    modules (target_modules: their name, None = the architecture's: "self_attn" for Llama)."""

    task_type: Optional[str] = None
    peft_type: str = "ADAPTION_PROMPT"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    modules_to_save = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.peft_type != "ADAPTION_PROMPT":
            raise ValueError(f"peft_type={self.peft_type!r}: AdaptionPromptConfig is peft_type 'ADAPTION_PROMPT'")
        self._check_common()
        for name in ("adapter_len", "adapter_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(f"target_modules={self.target_modules!r}: the attention modules' name, a string")

    def prepare_for(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(f"adaption prompts (Llama-Adapter) are implemented for model types "
                             f"{sorted(ARCHITECTURES)}, not {model_type!r} (peft has the same list).")
        if self.target_modules is None:
            self.target_modules = ARCHITECTURES[model_type][0]


class AdaptionPrompt(nn.Module):
    """One adapter's prompt and gate in one attention module."""

    method = "adaption_prompt"

    def __init__(self, adapter_len: int, hidden_size: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden_size, device=device,
                                                        dtype=dtype).normal_())  # [1, L, hidden]
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))  # zero-init gate


class AdaptedAttention(nn.Module):
    """An attention module (`base_layer`) plus named adaption prompts (`adapters`)."""

    def __init__(self, base_layer: nn.Module, model_type: str):
        super().__init__()
        self.base_layer = base_layer
        self.model_type = model_type
        self.adapters = nn.ModuleDict()
        self._active: list[str] = []
        self.disabled = False

    def set_adapter(self, names: Sequence[str]) -> None:
        self._active = [names] if isinstance(names, str) else list(names)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # model code may read e.g. .layer_idx or .config of its attention
            if name == "base_layer":  # not registered (a copy being built): no recursion
                raise
            return getattr(self.base_layer, name)

    def forward(self, *args, **kwargs):
        outputs = self.base_layer(*args, **kwargs)  # (attn_output [b, seq, hidden], weights, ...)
        active = [self.adapters[n] for n in self._active if n in self.adapters]
        if self.disabled or not active:
            return outputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [b, seq, hidden]
        query = self._query(hidden, kwargs, args)  # [b, heads, seq, head_dim]
        out = outputs[0]
        for adapter in active:
            out = out + self._prompt_term(adapter, query)
        return (out.to(query.dtype),) + tuple(outputs[1:])

    def _query(self, hidden: torch.Tensor, kwargs: dict, args: tuple) -> torch.Tensor:
        """The queries the attention computed, recomputed (transformers does not return them)."""
        attn = self.base_layer
        b, seq, _ = hidden.shape
        if self.model_type == "gpt2":
            q, _, _ = attn.c_attn(hidden).split(attn.split_size, dim=2)
            return q.view(b, seq, -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(hidden).view(b, seq, -1, attn.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = q.shape[-1] // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)  # rotate_half
        return q * cos + rotated * sin

    def _prompt_term(self, adapter: AdaptionPrompt, query: torch.Tensor) -> torch.Tensor:
        """gate * softmax(q k^T / sqrt(d)) v for the prompt's keys and values, projected out."""
        attn = self.base_layer
        b, heads, seq, head_dim = query.shape
        prompt = adapter.adaption_prompt  # [1, L, hidden]
        L = prompt.shape[1]
        _, k_name, v_name, o_name = ARCHITECTURES[self.model_type]
        if v_name is None:  # GPT-2: one c_attn gives q, k, v
            _, key, value = getattr(attn, k_name)(prompt).split(attn.embed_dim, dim=2)
        else:
            key, value = getattr(attn, k_name)(prompt), getattr(attn, v_name)(prompt)  # [1, L, kv * d]
        kv_heads = key.shape[-1] // head_dim
        key = key.view(1, L, kv_heads, head_dim).repeat(b, 1, 1, 1).transpose(1, 2)      # [b, kv, L, d]
        value = value.view(1, L, kv_heads, head_dim).repeat(b, 1, 1, 1).transpose(1, 2)
        key = torch.repeat_interleave(key, repeats=heads // kv_heads, dim=1)             # [b, heads, L, d]
        value = torch.repeat_interleave(value, repeats=heads // kv_heads, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3).to(query.dtype)) / math.sqrt(head_dim)  # [b, h, seq, L]
        scores = adapter.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(scores, value).transpose(1, 2).reshape(b, seq, -1)             # [b, seq, h * d]
        return getattr(attn, o_name)(out) if o_name is not None else out


def _prompt_dtype(attn: nn.Module, model_type: str) -> torch.dtype:
    """peft: the dtype of the attention's first projection weight; fp32 when it is quantized."""
    w = (attn.c_proj if model_type == "gpt2" else attn.q_proj).weight
    return torch.float32 if w.dtype in (torch.int8, torch.uint8) else w.dtype


def target_paths(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    """The top `adapter_layers` modules whose name ends with `.<target_modules>`, in model order."""
    found = [p for p, _ in iter_modules_through(model) if p.endswith(f".{config.target_modules}")]
    if len(found) < config.adapter_layers:
        raise ValueError(f"adapter_layers={config.adapter_layers} but the model has only {len(found)} modules "
                         f"named {config.target_modules!r}. Fix: adapter_layers <= {len(found)}.")
    return found[-config.adapter_layers:]


def iter_modules_through(model: nn.Module, prefix: str = ""):
    """(path, module) like named_modules(), with an AdaptedAttention standing for the module it wraps."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, AdaptedAttention):
            yield from iter_modules_through(child, path + ".")


def build(model: nn.Module, config: AdaptionPromptConfig) -> dict[str, AdaptionPrompt]:
    """{attention path: a new AdaptionPrompt} for `config` (nothing in the model changes)."""
    model_type = model.config.model_type
    out = {}
    for path in target_paths(model, config):
        attn = model.get_submodule(path)
        base = attn.base_layer if isinstance(attn, AdaptedAttention) else attn
        w = next(base.parameters())
        out[path] = AdaptionPrompt(config.adapter_len, model.config.hidden_size, _prompt_dtype(base, model_type),
                                   device=w.device)
    return out


def inject(model: nn.Module, name: str, config: AdaptionPromptConfig, active: Sequence[str]) -> list[str]:
    """Put adapter `name` into its attention modules (wrapping them once); returns their paths."""
    new = build(model, config)  # everything is built before the model changes
    for path, adapter in new.items():
        attn = model.get_submodule(path)
        if not isinstance(attn, AdaptedAttention):
            attn.requires_grad_(False)
            wrapper = AdaptedAttention(attn, model.config.model_type)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper)
            attn = wrapper
        if name in attn.adapters:
            raise ValueError(f"{path} already holds an adaption prompt named {name!r}")
        attn.adapters[name] = adapter
    for m in model.modules():
        if isinstance(m, AdaptedAttention):
            m.set_adapter(active)
    return list(new)
