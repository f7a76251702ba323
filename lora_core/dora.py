"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"), as peft 0.21 computes it.

The adapted weight is a magnitude times a direction, per output row n:

    W'[n] = m[n] * (W + s * B @ A)[n] / ||(W + s * B @ A)[n]||        m: lora_magnitude_vector [N]

m starts at ||W[n]|| (so W' = W when B = 0) and trains; the norm is treated as a constant
(detached: section 4.3 of the paper, and peft). With f = m / ||W + s B A|| [N] and x_d the LoRA
input (dropped out in training), the forward adds to the base output y = W x + bias:

    (f - 1) * (W x_d) + f * s * B A x_d          (f broadcast over the last dim)

where W x_d is the base output without its bias when there is no dropout (peft reuses it), else
F.linear(x_d, W) again. On disk the magnitude is `<path>.lora_magnitude_vector` (peft's key, no
".weight"). Merging adds (f - 1) * W0 + f * s * B @ A to the base (W0: the base without other
merged adapters), which is f * (W0 + s B A) when DoRA is the only merged adapter: peft's merged
weight. The fused kernels do not apply the column scale f: the layer computes this adapter in
PyTorch ("auto" says so once; backend "triton" refuses with the reason).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import BaseContext, LoraAdapter


class DoraAdapter(LoraAdapter):
    """A LoRA adapter plus DoRA's trainable magnitude `lora_magnitude_vector` [N].

    The magnitude is set from the base weight by `init_magnitude(W)` once the adapter sits on its
    layer (lora_core.inject does it, after any data-dependent init rewrote the base); until then
    the forward refuses to run rather than use a placeholder.
    """

    method = "dora"
    needs_base = True
    kernel_reason = ("DoRA's magnitude / weight-norm output scale is not fused into the triton kernels "
                     "(the adapter runs in PyTorch)")

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(out_features, dtype=self.lora_A.weight.dtype, device=self.lora_A.weight.device))  # [N]
        self.magnitude_ready = False

    def weight_norm(self, W: torch.Tensor) -> torch.Tensor:
        """||W + s * B @ A|| per output row [N], detached, rounded to W's dtype (peft's
        get_weight_norm, with the LoRA product taken without gradient); W [N, K]."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach()  # [N, r] @ [r, K]
        return torch.linalg.norm(W + self.scaling * lora_weight, dim=1).to(W.dtype).detach()

    @torch.no_grad()
    def init_magnitude(self, W: torch.Tensor) -> None:
        """m = ||W + s * B @ A|| per row, from the base weight W [N, K] as it is stored (dense: its
        dtype; 4-bit: bitsandbytes' dequantized dtype; int8: fp32), rounded like peft's."""
        self.lora_magnitude_vector.copy_(self.weight_norm(W))
        self.magnitude_ready = True

    term = None  # not a plain addition: the DoRA term depends on the base output (see forward)

    def fused_args(self):
        return None

    def forward(self, x: torch.Tensor, result: torch.Tensor, base: Optional[BaseContext] = None) -> torch.Tensor:
        # x [..., K] (cast to the LoRA dtype, as peft), result [..., N] -> result + the DoRA term
        if base is None:
            raise ValueError("DoraAdapter.forward needs the base layer (base=BaseContext); it runs "
                             "inside LoraLinear")
        if not self.magnitude_ready:
            raise RuntimeError("DoRA magnitude not initialised: call init_magnitude(W) with the base "
                               "weight (lora_core.inject does this when it adds the adapter)")
        x = x.to(self.lora_A.weight.dtype)
        W = base.weight(x.dtype)                                          # [N, K]
        f = self.lora_magnitude_vector / self.weight_norm(W)              # [N]
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            x = self.lora_dropout(x)
            base_out = F.linear(x, W)                                     # [..., N], W x_d
        else:
            base_out = base.output if base.bias is None else base.output - base.bias  # W x, no bias
        lora = self.lora_B(self.lora_A(x))                                # [..., N]
        # peft's order: the DoRA term summed first, then added to the result
        return result + ((f - 1) * base_out + f * lora * self.scaling)

    def merge_scale(self, W0: torch.Tensor) -> torch.Tensor:
        """f = m / ||W0 + s B A|| [N] in fp32, W0 [N, K] fp32: the base without merged adapters."""
        norm = torch.linalg.norm(W0 + self.delta_weight(), dim=1)
        return self.lora_magnitude_vector.detach().float() / norm
