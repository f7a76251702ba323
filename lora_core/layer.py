"""LoraLinear: one flat LoRA layer around a frozen base linear layer.

    y = base(x) + scaling * lora_B(lora_A(dropout(x)))       A: [r, K], B: [N, r]

The forward hands all the math to one call of `kernels.lora_linear`, which reads the base weight
through `quant.base_weight` (dense, bitsandbytes 4-bit or int8). bitsandbytes' own forward never
runs on a wrapped layer, so its in-place CPU repacking cannot corrupt the storage we read.

Merging is explicit (`merge()` / `unmerge()`), guarded by `merged`, finite-checked before anything
is written, and never triggered by `train()` / `eval()`.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

import kernels

from . import quant


class LoraLinear(nn.Module):
    """A base linear layer plus a rank-`r` update, with peft's attribute names.

    base_layer: nn.Linear | transformers Conv1D | bnb Linear4bit | bnb Linear8bitLt (frozen).
    lora_dtype: dtype of lora_A / lora_B (fp32 by default, as peft's autocast_adapter_dtype does;
    pass the compute dtype, e.g. torch.bfloat16, to keep the LoRA branch in half precision).
    kernel: backend of `kernels.lora_linear` ("auto" | "torch" | "triton").
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 fan_in_fan_out: bool = False, lora_dtype: torch.dtype = torch.float32, kernel: str = "auto"):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={lora_dropout!r}: must be in [0, 1)")
        _check_kernel(kernel)
        self.base_layer = base_layer
        self.in_features, self.out_features = quant.in_out_features(base_layer)  # K, N
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.dropout_p = float(lora_dropout)
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)  # [r, K]
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)  # [N, r]
        self.reset_lora_parameters(init_lora_weights)
        self.kernel = kernel
        self.merged = False
        self.disabled = False  # set by LoraModel.disable_adapter(): base output only

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (model code such as T5's reads `.weight` of its linear layers)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        """peft's rules. True: A kaiming-uniform(a=sqrt(5)), B zeros (output starts equal to the base).
        "gaussian": A ~ N(0, (1/r)^2), B zeros. False: A and B keep nn.Linear's random init (B != 0)."""
        with torch.no_grad():
            if init_lora_weights is False:
                self.lora_A.reset_parameters()
                self.lora_B.reset_parameters()
                return
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                raise ValueError(f"init_lora_weights={init_lora_weights!r}: use True, 'gaussian' or False")
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x [..., K] -> y [..., N]
        active = not (self.disabled or self.merged)
        # seed=None: the backend draws the dropout mask from torch's generator (the torch backend
        # exactly as peft's nn.Dropout does), so torch.manual_seed reproduces a run and activation
        # checkpointing, which restores the RNG state before recomputing, redraws the same mask.
        return kernels.lora_linear(
            x, self._base_record(), quant.base_bias(self.base_layer),
            self.lora_A.weight if active else None, self.lora_B.weight if active else None,
            self.scaling, self.dropout_p, self.training, backend=self.kernel)

    def _base_record(self):
        """The `kernels` record of the base weight, rebuilt only when the base storage changed.

        Rebuilding it (and re-validating it in `kernels`) every forward costs several microseconds
        per layer; `quant.base_weight_key` says when the cached one no longer describes the layer
        (weight or quant_state replaced, `.to()`, merge's re-quantization, bnb's CPU repacking).
        """
        key = quant.base_weight_key(self.base_layer)
        cache = self.__dict__.get("_record_cache")
        if cache is None or cache[0] != key:
            # keep the keyed objects alive with the record (which holds absmax / SCB), so their ids
            # cannot be reused by new objects meanwhile
            cache = (key, quant.base_weight(self.base_layer), self.base_layer.weight,
                     quant.quant_state_or_none(self.base_layer))
            self.__dict__["_record_cache"] = cache
        return cache[1]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace the base storage: drop the cached record now rather than
        # at the next forward (it would otherwise keep the old storage alive until then)
        self.__dict__.pop("_record_cache", None)
        return super()._apply(fn, *args, **kwargs)

    # ---- merge -----------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, laid out [N, K] like W (fan_in_fan_out only changes storage)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # [N, r] @ [r, K]

    def merge(self) -> float:
        """Add the LoRA delta into the base weight; returns the max |stored W - (W + delta)|.

        A no-op (with a warning) if already merged. Nothing is written unless the merged weight is
        finite. For 4-bit / int8 bases the sum is re-quantized, so the result (and a later unmerge)
        carries the quantization error, which the return value reports.
        """
        if self.merged:
            warnings.warn("LoraLinear.merge(): already merged; nothing done (no double add).")
            return 0.0
        return self._apply_delta(+1)

    def unmerge(self) -> float:
        """Subtract the delta again. Exact up to rounding for dense bases; for quantized bases the
        base comes back within about one quantization step (re-quantization is lossy)."""
        if not self.merged:
            warnings.warn("LoraLinear.unmerge(): not merged; nothing done.")
            return 0.0
        return self._apply_delta(-1)

    def _apply_delta(self, sign: int) -> float:
        with torch.no_grad():
            delta = self.delta_weight()  # [N, K] fp32
            if not torch.isfinite(delta).all():
                raise ValueError("LoRA delta (scaling * B @ A) has non-finite values; refusing to merge. "
                                 "The base weight is unchanged. Fix: check the adapter weights for NaN/inf.")
            if quant.is_quantized(self.base_layer):
                target = quant.dequantize_base(self.base_layer) + sign * delta  # [N, K] fp32
                _check_finite(target)
                quant.requantize_into(self.base_layer, target)
            else:
                w = self.base_layer.weight  # [N, K], or [K, N] when fan_in_fan_out (Conv1D)
                d = delta.T if self.fan_in_fan_out else delta
                target = w.float() + sign * d
                # Sum in fp32 and round once to the base dtype (peft rounds delta to the base dtype
                # first and then the sum: two roundings in bf16 / fp16).
                new = target.to(w.dtype)
                _check_finite(new)
                w.data.copy_(new)
                if self.fan_in_fan_out:
                    target = target.T
            err = (quant.dequantize_base(self.base_layer) - target).abs().max().item()
        self.merged = sign > 0
        return err


def _check_finite(w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError("merged weight would have non-finite values (overflow in the base dtype); "
                         "refusing to merge. The base weight is unchanged.")


def _check_kernel(name: str) -> None:
    if name not in kernels.BACKENDS:
        raise ValueError(f"kernel={name!r}: unknown backend. Fix: use one of {list(kernels.BACKENDS)}.")


def _device_of(layer: nn.Module) -> Optional[torch.device]:
    for p in layer.parameters():
        return p.device
    return None
