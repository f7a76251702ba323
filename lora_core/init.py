"""Data-dependent LoRA inits (PiSSA, OLoRA, LoftQ) and the conversion of such an adapter to plain LoRA.

These inits read the base weight W [N, K] (dequantized to fp32; GPT-2's Conv1D read as [N, K]),
set A [r, K] and B [N, r] from it, and rewrite the base as peft 0.21 does:

    "pissa"            W = U S V^T (torch.linalg.svd); S_r' = S_r / scaling;
                       A = diag(sqrt(S_r')) V_r^T, B = U_r diag(sqrt(S_r'))
    "pissa_niter_<N>"  the same from torch.svd_lowrank(W, r, niter=N) (random: draws from torch's
                       generator, in peft's order)
    "olora"            W = Q R (torch.linalg.qr); A = R[:r], B = Q[:, :r]
        base -> the residual W - scaling * B @ A (so the output is unchanged at init)
    "loftq"            alternate: Q_t = quantize(W - L_{t-1} R_{t-1}) (nf4 or int8, bitsandbytes' own
                       quantizer, on CPU or GPU), L_t R_t = the rank-r SVD of W - Q_t;
                       A = R / sqrt(scaling), B = L / sqrt(scaling)
        base -> Q (dequantized, in the base dtype): W ~ Q + scaling * B @ A

Where we differ from peft, on purpose: LoftQ runs without CUDA, divides by sqrt(scaling) (peft's
A = R, B = L ignores the scaling, so its init is off by that factor unless lora_alpha = r) and
reports the reconstruction error it reached (`LoraModel.loftq_errors`); GPT-2's Conv1D ([in, out]
storage) is read as [out, in] by every init (peft's OLoRA and LoftQ factor the stored [in, out]
matrix); PiSSA also runs on 4-bit / int8 bases, as peft's OLoRA does (dequantize, init,
re-quantize the residual from fp32 (4-bit; int8 from fp16): lossy, so the output moves by about
one quantization step).

Conversion (`save_pretrained(dir, path_initial_model_for_weight_conversion=init_dir)`, peft's
`subtract_mutated_init`): with A0, B0 the adapter right after init (saved to init_dir before
training), the trained adapter on the residual base equals the original base plus
scaling * (B A - B0 A0) = scaling' * [B, -B0] @ [A; A0], a rank-2r LoRA adapter (r' = 2r,
lora_alpha' = 2 lora_alpha, or sqrt(2) lora_alpha with use_rslora, so scaling' = scaling) that
applies to the ORIGINAL base.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import quant
from .config import LoraConfig, init_kind, pissa_niter

LOFTQ_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which peft's LoftQ quantizes with


@dataclass
class LoftQErrors:
    """Frobenius reconstruction errors of one layer's LoftQ init.

    quantization: ||W - Q(W)|| (the base quantized alone, no LoRA); per_iteration: ||W - (Q_t +
    scaling * B_t A_t)|| after each alternating step t (the last one is the init's).
    """

    quantization: float
    per_iteration: list[float] = field(default_factory=list)


# ---- the inits, on W [N, K] fp32 ------------------------------------------------------------------
def pissa(W: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, K], B [N, r]) from the top-r singular triplets of W, in peft's order of operations."""
    if niter is None:
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)   # W = V diag(S) Uh
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=niter)     # draws a random [K, r] start
        Sr, Uhr = Sr / scaling, Ur.t()
    A = torch.diag(torch.sqrt(Sr)) @ Uhr                      # [r, K]
    B = Vr @ torch.diag(torch.sqrt(Sr))                       # [N, r]
    return A, B


def olora(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = R[:r] [r, K], B = Q[:, :r] [N, r]) from W = Q R."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _quantize(W: torch.Tensor, bits: int) -> Callable[[], torch.Tensor]:
    """bitsandbytes' nf4 (blocksize 64, no double quantization) or int8 (per row, from fp16)
    quantization of W [N, K] fp32; returns the dequantizer (fp32 [N, K]), which holds only the
    quantized storage."""
    import bitsandbytes.functional as bnbf

    if bits == 4:
        packed, state = bnbf.quantize_4bit(W.contiguous(), blocksize=LOFTQ_BLOCKSIZE, compress_statistics=False,
                                           quant_type="nf4")
        return lambda: bnbf.dequantize_4bit(packed, state).float()
    CB, SCB, _ = bnbf.int8_vectorwise_quant(W.to(torch.float16).contiguous())
    return lambda: bnbf.int8_vectorwise_dequant(CB, SCB).float()


def loftq(W: torch.Tensor, r: int, scaling: float, bits: int, iters: int
          ) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor], LoftQErrors]:
    """(A [r, K], B [N, r], the dequantizer of the final Q, the errors): LoftQ's alternating
    quantization and rank-r SVD of the residual, as peft's loftq_init, then A and B divided by
    sqrt(scaling) so that W ~ Q + scaling * B @ A."""
    residual = W
    errors = None
    for t in range(iters):
        dequantize = _quantize(residual, bits)
        Q = dequantize()                                               # [N, K]
        if errors is None:
            errors = LoftQErrors(quantization=(W - Q).norm().item())
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :r])                       # [N, r]
        R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh                      # [r, K]
        LR = L @ R
        errors.per_iteration.append((W - Q - LR).norm().item())
        residual = W - LR                                              # what the next step quantizes
    root = math.sqrt(scaling)
    return R / root, L / root, dequantize, errors


# ---- on a layer -------------------------------------------------------------------------------------
def _data_init(config) -> Optional[str]:
    """"pissa" | "olora" | "loftq" for a LoraConfig asking for a data-dependent init, else None
    (other methods' configs included)."""
    if getattr(config, "peft_type", "LORA") != "LORA":
        return None
    kind = init_kind(config.init_lora_weights)
    return kind if kind in ("pissa", "olora", "loftq") else None


def check_layer(config: LoraConfig, path: str, base_layer: nn.Module) -> None:
    """Raise ValueError if `config`'s init cannot run on this base layer (before the model changes)."""
    from .inject import pattern_value

    kind = _data_init(config)
    if kind is None or not quant.is_linear(base_layer):  # an embedding's builder refuses these inits itself
        return
    r = pattern_value(config.rank_pattern, path, config.r)
    k_in, n_out = quant.in_out_features(base_layer)
    if r > min(n_out, k_in):
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} on {path!r}: r={r} is larger than "
                         f"min(out, in) = {min(n_out, k_in)}, the number of components W [{n_out}, {k_in}] has. "
                         f"Fix: a smaller r (or a rank_pattern entry for this layer).")
    if kind == "loftq" and quant.is_quantized(base_layer):
        raise ValueError(f"init_lora_weights='loftq' on {path!r}: the base is already quantized. LoftQ "
                         f"quantizes the full-precision weight itself (its Q replaces the base). Fix: load "
                         f"the base unquantized (then save it and load that in 4/8 bit), as with peft.")


@dataclass
class BaseRewrite:
    """A base weight rewrite an init computed, applied once every new adapter is built."""

    layer: nn.Module
    new_weight: Callable[[], torch.Tensor]  # -> W' [N, K] fp32

    def apply(self) -> None:
        # a 4-bit base is re-quantized from the fp32 residual, as peft's OLoRA does (its QuantState
        # then dequantizes to fp32): one rounding fewer than going through the compute dtype
        quant.requantize_into(self.layer, self.new_weight(), source_dtype=torch.float32)


@torch.no_grad()
def prepare(adapter: nn.Module, config: LoraConfig, base_layer: nn.Module) -> Optional[BaseRewrite]:
    """Set `adapter`'s A and B from `base_layer`'s weight as config.init_lora_weights says (the
    random draws peft makes, at the point it makes them) and return the base rewrite to apply
    later, or None for inits that leave the base alone. Reads the base; changes nothing in it."""
    kind = _data_init(config)
    if kind is None:
        return None
    init = config.init_lora_weights
    W = quant.dequantize_base(base_layer)                               # [N, K] fp32 copy
    r, s = adapter.r, adapter.scaling
    if kind == "pissa":
        A, B = pissa(W, r, s, pissa_niter(init))
    elif kind == "olora":
        A, B = olora(W, r)
    else:
        A, B, dequantize, errors = loftq(W, r, s, config.loftq_config.get("loftq_bits", 4),
                                         config.loftq_config.get("loftq_iter", 1))
        adapter.loftq_errors = errors
    adapter.lora_A.weight.copy_(A)
    adapter.lora_B.weight.copy_(B)
    if kind == "loftq":
        return BaseRewrite(base_layer, dequantize)
    lora_A, lora_B = A, B  # the fp32 factors, as peft subtracts them

    def residual() -> torch.Tensor:
        # peft's expression and order: W - scaling * B @ A  (= W - (scaling * B) @ A)
        return quant.dequantize_base(base_layer) - s * lora_B @ lora_A
    return BaseRewrite(base_layer, residual)


# ---- conversion to plain LoRA ------------------------------------------------------------------------
def conversion_problem(config: LoraConfig) -> Optional[str]:
    """Why an adapter with `config` cannot be converted to a plain LoRA adapter on the original base."""
    if config.use_dora:
        return ("a DoRA adapter's change of W depends on its magnitude vector, which a plain LoRA pair "
                "cannot carry (peft would drop it silently)")
    if init_kind(config.init_lora_weights) == "loftq":
        return ("a LoftQ init replaced the base by its quantization Q, which differs from the original "
                "weight by more than the initial adapter: the difference is no LoRA pair")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        return "use_rslora with rank_pattern / alpha_pattern cannot keep every layer's scaling (as in peft)"
    return None


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: rank 2r, alpha doubled (sqrt(2) with rslora), init True."""
    out = config.copy()
    out.init_lora_weights = True
    out.r *= 2
    out.lora_alpha = out.lora_alpha * (2 ** 0.5 if out.use_rslora else 2)
    out.rank_pattern = {k: 2 * v for k, v in out.rank_pattern.items()}
    out.alpha_pattern = {k: 2 * v for k, v in out.alpha_pattern.items()}
    return out


def convert_to_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's subtract_mutated_init on two state dicts with the same keys: every `...lora_A.weight`
    becomes [A; A0] (rows, [2r, K]) and `...lora_B.weight` becomes [B, -B0] (columns, [N, 2r]);
    other tensors (modules_to_save copies, trained biases) are kept as trained (peft drops them).
    Raises ValueError naming the keys when the two adapters do not have the same LoRA tensors."""
    lora = [k for k in trained if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    missing = [k for k in lora if k not in initial]
    bad = [k for k in lora if k in initial and initial[k].shape != trained[k].shape]
    if missing or bad:
        raise ValueError(f"the initial adapter does not match the trained one: missing {missing[:3]}, "
                         f"other shapes {bad[:3]}. Fix: pass the folder saved right after the init of this "
                         f"adapter (same r, target_modules).")
    out = dict(trained)
    for k in lora:
        t, t0 = trained[k], initial[k].to(device=trained[k].device, dtype=trained[k].dtype)
        out[k] = torch.cat([t, t0], dim=0) if k.endswith(".lora_A.weight") else torch.cat([t, -t0], dim=1)
    return out


def warn_quantized_conversion(model) -> None:
    if any(quant.is_quantized(layer.base_layer) for layer in model.lora_layers().values()):
        warnings.warn("converting an adapter trained on a quantized residual base: Q(W_res) + B A is not "
                      "Q(W) + the converted adapter exactly (peft warns the same); the difference is about "
                      "one quantization step.")
