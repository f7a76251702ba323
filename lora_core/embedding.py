"""LoRA on embedding layers (peft's `lora.Embedding`): an adapter and a layer for `nn.Embedding`.

An embedding is a linear map of one-hot inputs whose weight is stored [in, out]:
W_emb [num_embeddings V, embedding_dim D] works as a linear layer with K = V inputs, N = D outputs
and fan_in_fan_out (as GPT-2's Conv1D). So `LoraEmbedding` is a `LoraLinear` with
fan_in_fan_out=True: the adapter registry, active / merged / disabled bookkeeping, mixed batches,
merge (finite-checked, the delta transposed into W's layout), saving and loading all carry over
unchanged; only the two lookups differ:

    y = embed(ids; W) + scaling * embed(ids; A^T) @ B^T          A [r, V], B [D, r]

with embed(ids; T) = F.embedding(ids, T, <the base's padding_idx, max_norm, norm_type,
scale_grad_by_freq, sparse>) and, for embeddings that scale their output (Gemma's `embed_scale`),
the adapter term scaled the same way. Facts from peft 0.21's `lora.Embedding`: the parameters are
`lora_embedding_A` / `lora_embedding_B` (plain parameters, so the file keys are
`<path>.lora_embedding_A` without `.weight`); both are drawn from randn first, then with
init_lora_weights True or "gaussian" A becomes zeros and B ~ N(0, 1) (microsoft/LoRA's choice: the
output starts at the base, and B is not zero so A gets a gradient); `lora_dropout` exists but is
never applied (dropping token ids has no meaning); the merged delta is (B @ A)^T * scaling, without
embed_scale, because the base forward scales W + delta as a whole.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import method_of
from .layer import LoraLinear


class LoraEmbeddingAdapter(nn.Module):
    """One LoRA adapter of an embedding layer: lora_embedding_A [r, V], lora_embedding_B [D, r]."""

    method = "lora"

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer")
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        # peft creates it and never applies it (see the module docstring); kept for the same status
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # peft draws randn on the CPU in this order (A, then B) whatever the base's device; on the
        # meta device (shape-only adapters, lora_core.io) nothing is drawn
        draw = torch.empty if torch.device(device or "cpu").type == "meta" else torch.randn
        where = "meta" if draw is torch.empty else "cpu"
        A = draw((r, num_embeddings), device=where)  # [r, V]
        B = draw((embedding_dim, r), device=where)  # [D, r]
        _init(A, B, init_lora_weights)  # on the CPU too, before the move (peft's order of draws)
        self.lora_embedding_A = nn.Parameter(A.to(device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(B.to(device=device, dtype=dtype))
        self.__dict__["_embedding"] = None  # the base nn.Embedding, set by LoraEmbedding (not a submodule)

    @property
    def dropout_p(self) -> float:
        return 0.0  # never applied, as in peft

    def reset_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        """peft's rule for embeddings: True or "gaussian": A zeros, B ~ N(0, 1); False: keep the weights."""
        _init(self.lora_embedding_A, self.lora_embedding_B, init_lora_weights)

    def bind(self, embedding: nn.Module) -> None:
        """Read the lookup options from `embedding` at each call, as peft does. Kept outside the
        module tree: the layer owns the base, and the adapter's state dict is its two parameters."""
        self.__dict__["_embedding"] = embedding

    def fused_args(self):
        return None  # no fused kernel for a lookup: the layer takes its general path

    def term(self, ids: torch.Tensor) -> torch.Tensor:
        """scaling * embed(ids; A^T) @ B^T [..., D] in the LoRA dtype (times embed_scale if any)."""
        base = self._embedding
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=base.padding_idx,  # [..., r]
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        out = (after_a @ self.lora_embedding_B.T) * self.scaling  # [..., r] @ [r, D]
        scale = _embed_scale(base)
        return out if scale is None else out * scale.to(out.dtype)

    def forward(self, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self.term(ids)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, [D, V]: the [N, K] layout; the layer transposes it into W's [V, D]."""
        return self.scaling * (self.lora_embedding_B.float() @ self.lora_embedding_A.float())  # [D, r] @ [r, V]


class LoraEmbedding(LoraLinear):
    """An nn.Embedding plus named LoRA adapters (see the module docstring for why a LoraLinear).

    in_features = num_embeddings V, out_features = embedding_dim D (peft's convention).
    tied_modules: paths of other modules sharing this embedding's weight (a tied output head), set
    at injection: merging would change them too, so merge() refuses.
    """

    def __init__(self, base_layer: nn.Embedding, adapter: LoraEmbeddingAdapter, adapter_name: str = "default",
                 backend: str = "auto", tied_modules: Optional[list[str]] = None):
        super().__init__(base_layer, fan_in_fan_out=True, backend=backend, adapter_name=adapter_name,
                         adapter=adapter)
        self.tied_modules = list(tied_modules or [])

    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        if not isinstance(adapter, LoraEmbeddingAdapter):
            raise TypeError(f"an embedding layer takes embedding adapters, got {type(adapter).__name__}")
        adapter.bind(self.base_layer)
        super().add_adapter(name, adapter)

    # peft's Embedding keeps its adapters in these two dicts and leaves lora_A / lora_B empty
    lora_embedding_A = property(lambda self: {n: a.lora_embedding_A for n, a in self.adapters.items()})
    lora_embedding_B = property(lambda self: {n: a.lora_embedding_B for n, a in self.adapters.items()})
    lora_A = property(lambda self: {})
    lora_B = property(lambda self: {})

    @property
    def bias(self) -> None:
        return None

    def _base(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(ids)  # [..., D]

    def _note_torch_terms(self, x: torch.Tensor, why: str) -> None:
        pass  # every embedding adapter runs in PyTorch; nothing to report

    def merge(self, adapter_names=None) -> float:
        if self.tied_modules:
            raise ValueError(
                f"this embedding's weight is shared with {self.tied_modules} (tied word embeddings): merging "
                f"its LoRA delta would change that module too, which the adapter never did. Fix: load the base "
                f"with tie_word_embeddings=False (and a copied output head), or keep the adapter unmerged.")
        return super().merge(adapter_names)


def build_embedding_adapter(config, path: str, base: nn.Embedding, dtype: torch.dtype,
                            device: Optional[torch.device]) -> LoraEmbeddingAdapter:
    """The adapter `config` puts on the embedding at `path` (rank_pattern / alpha_pattern applied)."""
    from .inject import pattern_value  # inject imports this module

    if method_of(config) != "lora":
        raise ValueError(f"{path} is an embedding layer: only plain LoRA adapts embeddings here, "
                         f"not {method_of(config)!r}. Fix: leave it out of target_modules.")
    if getattr(config, "lora_bias", False):  # peft refuses it on embeddings too
        raise ValueError(f"{path} is an embedding layer: lora_bias=True is not supported there (as in "
                         f"peft). Fix: leave it out of target_modules, or lora_bias=False.")
    return LoraEmbeddingAdapter(base.num_embeddings, base.embedding_dim,
                                r=pattern_value(config.rank_pattern, path, config.r),
                                lora_alpha=pattern_value(config.alpha_pattern, path, config.lora_alpha),
                                lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                                use_rslora=config.use_rslora, dtype=dtype, device=device)


def _init(A: torch.Tensor, B: torch.Tensor, init_lora_weights: Union[bool, str]) -> None:
    if init_lora_weights is False:
        return
    if not (init_lora_weights is True or (isinstance(init_lora_weights, str)
                                          and init_lora_weights.lower() == "gaussian")):
        raise ValueError(f"init_lora_weights={init_lora_weights!r}: use True, 'gaussian' or False")
    with torch.no_grad():
        A.zero_()  # [r, V]
        B.normal_()  # [D, r]


def _embed_scale(base: nn.Module) -> Optional[torch.Tensor]:
    """The base's scalar `embed_scale` (Gemma-style scaled embeddings), else None (peft's rule)."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None
