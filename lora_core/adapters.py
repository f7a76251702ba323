"""What one adapter holds and computes: the one place that maps a method to its math.

A layer (`LoraLinear`) keeps ONE registry, `adapters: ModuleDict[name -> adapter]`; each adapter is
a small module that owns its parameters and settings and answers the layer's four questions:

    fused_args()          (A [r, K], B [N, r], scaling, dropout_p) when a single
                          `kernels.lora_linear` call can compute base + this adapter (the fused
                          path, taken when it is the only active adapter); None when it cannot
    forward(x, result)    `result` with this adapter applied, in peft's order of operations: the
                          general path (several active adapters, a mixed batch, a method the fused
                          kernel cannot compute). result is the base output [..., N] (plus the
                          adapters before this one); x [..., K] the layer input
    delta_weight()        the change of W, [N, K] in fp32, that merging adds
    reset_parameters(init)
and, for methods whose effect is a plain addition (LoRA), term(x) -> the added [..., N], which
lets a mixed batch add it to its rows in place (peft's `result[rows] += term`).

The optional parts of the interface (what DoRA, IA3, AdaLoRA, ... need beyond the four questions)
are listed above METHODS below.

Initialisations: True, "gaussian", False and "orthogonal" (random, drawn here in peft's order
from torch's generator) happen when the adapter is built; the data-dependent ones (PiSSA, OLoRA,
LoftQ) read and rewrite the base weight and live in `lora_core.init`.

`METHODS` maps a method name to its class and `method_of(config)` picks it. LoRA variants (DoRA's
magnitude vector, lora_bias) and other methods (IA3, a bottleneck adapter = LoRA with an activation
on u) slot in as classes here: the layer, the model, saving and merging ask these four questions
and never look inside.

Why a module per adapter rather than peft's per-attribute dicts (`lora_A[name]`, `scaling[name]`,
`r[name]`, ...): adding, deleting, moving or freezing an adapter is then one dict operation on
one object, and a new method adds one class instead of one more dict on every layer. The layer
still offers peft's dict names as read-only views (`layer.lora_A[name]`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

import kernels

from .config import init_kind


@dataclass
class BaseContext:
    """What an adapter with `needs_base` reads of its layer's base during one forward.

    record: the `kernels` record of W [N, K]; bias: [N] or None; output: base(x) [..., N] (bias
    included, base output dtype) for the rows the adapter applies to.
    """

    record: Any
    bias: Optional[torch.Tensor]
    output: torch.Tensor

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] dequantized to `dtype` (bitsandbytes' bits for 4-bit / int8 bases)."""
        return kernels.dequantize(self.record, dtype)


class LoraAdapter(nn.Module):
    """One LoRA adapter of a layer: W' = W + scaling * B @ A, with dropout on the LoRA input.

    lora_A: nn.Linear(K, r) (weight [r, K]); lora_B: nn.Linear(r, N) (weight [N, r], and with
    lora_bias a bias [N]: W' x = W x + scaling * (B A x + b)); lora_dropout: nn.Dropout(p), or
    nn.Identity when p = 0 (peft's modules and names); scaling = lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora.
    """

    method = "lora"
    needs_base = False

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, lora_bias: bool = False):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={lora_dropout!r}: must be in [0, 1)")
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Created in peft's order (A, then B, each drawing nn.Linear's default init), so the same
        # seed gives the same weights as peft.
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)   # [r, K]
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias, device=device, dtype=dtype)  # [N, r] (+ [N])
        self.lora_bias = lora_bias
        self.reset_parameters(init_lora_weights)

    @property
    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        """peft's rules. True: A kaiming-uniform(a=sqrt(5)), B (and its bias) zeros: the output
        starts at the base. "gaussian": A ~ N(0, (1/r)^2), B zeros. False: A and B keep nn.Linear's
        random init (B != 0), drawing nothing more (as peft: the same seed then gives the same
        weights). "orthogonal": see `_orthogonal`. The data-dependent inits ("pissa...", "olora",
        "loftq") draw nothing here: lora_core.init sets A and B from the base weight."""
        kind = init_kind(init_lora_weights)
        with torch.no_grad():
            if kind in ("none", "pissa", "olora", "loftq"):
                return
            if kind == "orthogonal":
                self._orthogonal()
                return
            if kind == "default":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            elif kind == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                raise ValueError(f"init_lora_weights={init_lora_weights!r}: use True, False or one of "
                                 f"'gaussian', 'orthogonal', 'pissa', 'pissa_niter_<N>', 'olora', 'loftq'")
            nn.init.zeros_(self.lora_B.weight)
            if self.lora_B.bias is not None:
                nn.init.zeros_(self.lora_B.bias)

    def _orthogonal(self) -> None:
        """peft's orthogonal init (r even), drawing what peft draws, in its order, on the CPU
        generator: X ~ randn [r, r] -> Q (QR); A = (randn [K, r/2] @ Q[0::2]).T / 10 and
        B = randn [r/2, N].T @ Q[1::2] / 10. B A = G_B^T (Q[1::2] Q[0::2]^T) G_A^T = 0 (distinct
        rows of Q are orthogonal): the output starts at the base with A and B both non-zero.
        (peft rounds A and B to the base dtype; ours keep the LoRA dtype, as every other init
        here does.)"""
        r = self.r
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
        if self.lora_A.weight.device.type == "meta":
            return  # a shape-only adapter (io's load planning): draw nothing
        in_features, out_features = self.lora_A.in_features, self.lora_B.out_features
        Q, _ = torch.linalg.qr(torch.randn(r, r))                                   # [r, r] orthogonal
        A = torch.randn(in_features, r // 2).mm(Q[0::2, :]).T / 10.0                 # [r, K]
        B = torch.randn(r // 2, out_features).T.mm(Q[1::2, :]) / 10.0                # [N, r]
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)

    def fused_args(self):
        if self.lora_bias:
            return None  # the general path adds scaling * (B A x + b), in peft's order
        return self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout_p

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(dropout(x))) [..., N] in the LoRA dtype, x [..., K] cast to it (peft's order)."""
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # peft's lora.Linear.forward for one adapter: the sum in the promoted dtype (the layer
        # rounds once at the end). x [..., K] -> result [..., N].
        return result + self.term(x)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, [N, K] like W (fan_in_fan_out only changes how W is stored)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # [N, r] @ [r, K]

    def merge_bias(self, b: torch.Tensor, sign: int) -> torch.Tensor:
        """The base bias b [N] (fp32) with lora_bias's scaling * lora_B.bias added (peft's merge),
        or b itself when the adapter has no bias. The layer refuses to merge a lora_bias adapter
        into a base without a bias (LoraLinear.mergeable)."""
        if self.lora_B.bias is None:
            return b
        return b + sign * self.scaling * self.lora_B.bias.float()


from .dora import DoraAdapter  # noqa: E402  (dora.py subclasses LoraAdapter, defined above)

from .methods.adalora import AdaLoraAdapter  # noqa: E402 (the other per-layer methods, one module each)
from .methods.bottleneck import BottleneckAdapter  # noqa: E402
from .methods.ia3 import IA3Adapter  # noqa: E402

# method name -> adapter class. One entry per method; `method_of` says which one a config asks for.
# Besides the four questions above, an adapter class may have:
#   from_config(config, path, in, out, dtype, device)  how a config builds it (else LoRA's arguments)
#   transform_input(x) -> x        applied to the layer input before the base (IA3 feed-forward,
#                                  a serial bottleneck adapter on the input side)
#   merge_into(W [N, K] fp32, sign) / merge_bias(b, sign)   a merge that is not W + delta (IA3;
#                                  lora_bias's scaling * b on the base bias)
#   merge_refusal                  why it cannot be merged at all (a bottleneck's nonlinearity)
#   tensors_to_save(config, path)  what the file holds, if not its parameters (AdaLoRA's pruning)
#   fixed_parameters               parameter names never trained or saved (AdaLoRA's ranknum)
#   kernel_reason                  why the fused kernels cannot compute it (None: the base can still
#                                  run on any backend and the term in PyTorch)
#   needs_base = True              forward(x, result, base=BaseContext) also gets the base layer's
#                                  weight record, bias and output, and merging asks
#                                  merge_scale(W0) -> f [N]: it adds (f - 1) * W0 + f * delta, W0 = the
#                                  base without merged adapters (DoRA, lora_core.dora)
METHODS: dict[str, type] = {"lora": LoraAdapter, "dora": DoraAdapter, "ia3": IA3Adapter,
                            "adalora": AdaLoraAdapter, "bottleneck": BottleneckAdapter}
_PEFT_TYPE_METHOD = {"IA3": "ia3", "ADALORA": "adalora", "BOTTLENECK": "bottleneck"}


def method_of(config) -> str:
    """The METHODS key for a config (its peft_type and variant flags: use_dora -> "dora")."""
    peft_type = getattr(config, "peft_type", "LORA")
    if peft_type in _PEFT_TYPE_METHOD:
        return _PEFT_TYPE_METHOD[peft_type]
    return "dora" if getattr(config, "use_dora", False) else "lora"


def saved_tensors(adapter: nn.Module, config, path: str) -> dict[str, torch.Tensor]:
    """{name under the layer's path on disk: tensor} of one adapter (its parameters, unless the
    method says otherwise)."""
    if hasattr(adapter, "tensors_to_save"):
        return adapter.tensors_to_save(config, path)
    fixed = getattr(adapter, "fixed_parameters", ())
    return {n: p for n, p in adapter.named_parameters() if n not in fixed}


def merged_weight(adapter: nn.Module, w: torch.Tensor, sign: int) -> torch.Tensor:
    """W [N, K] fp32 with `adapter` merged in (sign +1) or taken out (-1)."""
    if hasattr(adapter, "merge_into"):
        return adapter.merge_into(w, sign)
    return w + sign * adapter.delta_weight()


def build_adapter(config, path: str, in_features: int, out_features: int, dtype: torch.dtype,
                  device: Optional[torch.device]) -> nn.Module:
    """The adapter `config` puts on the layer at `path` (rank_pattern / alpha_pattern applied).
    Data-dependent inits (PiSSA, OLoRA, LoftQ) are completed by lora_core.init with the base."""
    from .inject import pattern_value  # the name-pattern rule lives with the other matching rules

    cls = METHODS[method_of(config)]
    if hasattr(cls, "from_config"):
        return cls.from_config(config, path, in_features, out_features, dtype, device)
    return cls(in_features, out_features, r=pattern_value(config.rank_pattern, path, config.r),
               lora_alpha=pattern_value(config.alpha_pattern, path, config.lora_alpha),
               lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
               use_rslora=config.use_rslora, dtype=dtype, device=device,
               lora_bias=getattr(config, "lora_bias", False))
