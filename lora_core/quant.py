"""Base-weight access: turn a base layer into the plain records `kernels` reads, and back for merge.

Supported bases: `nn.Linear`, transformers' `Conv1D` (weight stored [in, out]), bitsandbytes
`Linear4bit` (nf4 / fp4, with or without double quantization) and `Linear8bitLt`.

`base_weight(layer)` returns views of the layer's own storage, never copies. bitsandbytes' CPU
inference path (`Linear4bit.forward` in eval mode on an input without grad, on CPUs with
AVX512-BF16) repacks the 4-bit weight in place into a CPU-only layout and rounds absmax to bf16;
reading that storage as bitsandbytes' normal layout would give a wrong W, so we detect the state
(`quant_state.packing_format_for_cpu`) and refuse, pointing at `unpack_cpu_layout` (lossy) or a
reload. `LoraLinear` never lets bitsandbytes' forward run on a layer it wraps.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kernels import DenseWeight, Int8Weight, Quant4bitWeight
from kernels import dequantize as _dequantize

try:  # bitsandbytes is a dependency, but keep dense-only use working without it
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
except Exception:  # pragma: no cover - exercised only where bitsandbytes is missing
    bnb = None
    Linear4bit = Linear8bitLt = ()

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()

try:
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - torch built without distributed
    DTensor = ()

LINEAR_TYPES = tuple(t for t in (nn.Linear, Conv1D) if isinstance(t, type))


def is_linear(module: nn.Module) -> bool:
    """True for the layer types LoRA can wrap (nn.Linear and its bnb subclasses, Conv1D)."""
    return isinstance(module, LINEAR_TYPES)


def is_quantized(layer: nn.Module) -> bool:
    return _is_4bit(layer) or _is_int8(layer)


def _is_4bit(layer) -> bool:
    return isinstance(Linear4bit, type) and isinstance(layer, Linear4bit)


def _is_int8(layer) -> bool:
    return isinstance(Linear8bitLt, type) and isinstance(layer, Linear8bitLt)


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features K, out_features N) of a supported base layer."""
    if isinstance(Conv1D, type) and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]  # Conv1D weight is [K, N]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Embedding):  # a lookup is a linear map of one-hot ids (lora_core.embedding)
        return layer.num_embeddings, layer.embedding_dim
    raise TypeError(f"unsupported base layer {type(layer).__name__}")


def _quant_state(layer):
    qs = getattr(layer.weight, "quant_state", None)
    if qs is None:
        qs = getattr(layer, "quant_state", None)
    if qs is None:
        raise RuntimeError(f"{type(layer).__name__} has no quant_state: the 4-bit weight was never "
                           f"quantized (was the model loaded with a BitsAndBytesConfig?).")
    return qs


def _check_not_cpu_packed(layer) -> None:
    if getattr(_quant_state(layer), "packing_format_for_cpu", False):
        raise RuntimeError(
            "this Linear4bit was repacked in place by bitsandbytes' CPU inference path "
            "(quant_state.packing_format_for_cpu=True: its forward ran in eval mode on an input without "
            "grad), so its storage is no longer bitsandbytes' standard 4-bit layout. Fix: reload the "
            "model and wrap it with LoRA before running it, or call "
            "lora_core.quant.unpack_cpu_layout(model) first (lossy: bitsandbytes rounded absmax to bf16).")


def _int8_scb(layer) -> torch.Tensor:
    # bnb moves CB/SCB from the parameter to layer.state on its first forward (init_8bit_state).
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = getattr(layer.state, "SCB", None)
    if scb is None:
        raise RuntimeError("Linear8bitLt has no SCB: the weight was never quantized to int8 "
                           "(has_fp16_weights=True is not supported).")
    return scb


def _check_not_sharded(layer) -> None:
    if isinstance(layer.weight, DTensor):
        raise RuntimeError(
            f"the base weight of this {type(layer).__name__} is an FSDP shard (a DTensor), not the whole "
            f"weight. Fix: call the layer through the FSDP-wrapped model, whose forward gathers the "
            f"shards first (not a submodule on its own outside that forward).")


def _check_storage_dtype(layer) -> None:
    # The packed bytes may be held as uint8 or viewed as a float dtype (bnb_4bit_quant_storage, for
    # FSDP). Anything that casts that tensor numerically (FSDP mixed precision with another
    # param_dtype) changes the bytes; the dtype then differs from the one the layer was built with.
    want = getattr(layer, "quant_storage", None)
    if want is not None and layer.weight.dtype != want:
        raise RuntimeError(
            f"the packed 4-bit weight is {layer.weight.dtype} but the layer stores it as {want}: something "
            f"cast the packed bytes numerically (FSDP mixed precision with a param_dtype other than the "
            f"quant storage dtype?). Fix: set bnb_4bit_quant_storage to the mixed-precision dtype.")


def base_weight(layer: nn.Module):
    """A `kernels` record describing W [N=out, K=in] of `layer`, made of views of its storage."""
    _check_not_sharded(layer)
    if _is_4bit(layer):
        _check_not_cpu_packed(layer)
        _check_storage_dtype(layer)
        return Quant4bitWeight.from_bnb(layer.weight.data, _quant_state(layer))
    if _is_int8(layer):
        return Int8Weight(CB=layer.weight.data, SCB=_int8_scb(layer))
    if isinstance(Conv1D, type) and isinstance(layer, Conv1D):
        return DenseWeight(layer.weight.T)  # Conv1D stores [K, N]; .T is a strided view [N, K]
    if isinstance(layer, nn.Linear):
        return DenseWeight(layer.weight)
    if isinstance(layer, nn.Embedding):  # W [V, D] is the [K, N] weight of a linear map of one-hot ids
        return DenseWeight(layer.weight.T)
    raise TypeError(f"unsupported base layer {type(layer).__name__}; LoRA wraps nn.Linear, "
                    f"transformers Conv1D, bitsandbytes Linear4bit and Linear8bitLt")


def quant_state_or_none(layer: nn.Module):
    """The bnb QuantState of a 4-bit layer (on its weight, else on the layer), or None."""
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    return getattr(layer, "quant_state", None) if qs is None else qs


def base_weight_key(layer: nn.Module) -> tuple:
    """A cheap fingerprint of everything `base_weight(layer)` reads (object ids, data pointers, the
    bnb CPU-repack flag): while it is unchanged, a record built earlier still describes the layer's
    storage, so callers may reuse it instead of rebuilding one per forward. It changes when the weight
    Parameter, its storage (`.data` swapped by `.to()` / a load), the quant_state or its absmax
    tensors are replaced, or bnb repacks the weight. Hold the objects it names alive (e.g. through
    the record and the layer) so their ids cannot be reused.
    """
    w = layer.weight
    if isinstance(w, DTensor):
        return (id(w), None)  # an FSDP shard: base_weight raises with the fix
    if _is_4bit(layer):
        qs = quant_state_or_none(layer)
        if qs is None:
            return (id(w), w.data_ptr(), None)  # base_weight will raise with the fix
        s2 = qs.state2 if qs.nested else None
        return (id(w), w.data_ptr(), id(qs), id(qs.absmax), qs.absmax.data_ptr(),
                getattr(qs, "packing_format_for_cpu", False),
                None if s2 is None else (id(s2), id(s2.absmax), s2.absmax.data_ptr()))
    if _is_int8(layer):
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(layer, "state", None), "SCB", None)
        return (id(w), w.data_ptr(), id(scb), None if scb is None else scb.data_ptr())
    # dense: DenseWeight holds the Parameter itself (read live); Conv1D's record is a .T view of the
    # storage at build time, hence the data pointer and shape
    return (id(w), w.data_ptr(), w.shape)


def base_bias(layer: nn.Module) -> Optional[torch.Tensor]:
    """The base layer's bias [N] (a Parameter, so bias='all' trains it through the kernel) or None."""
    return getattr(layer, "bias", None)


# ---- merge helpers -------------------------------------------------------------------------------
def dequantize_base(layer: nn.Module) -> torch.Tensor:
    """W [N, K] as a new fp32 tensor (a copy, for merge arithmetic)."""
    return _dequantize(base_weight(layer), torch.float32).float().clone()


def requantize_into(layer: nn.Module, W: torch.Tensor, source_dtype: Optional[torch.dtype] = None) -> None:
    """Store W [N, K] (fp32) into `layer`, in place, with the layer's own storage format.

    dense: copied into weight (transposed for Conv1D), cast to its dtype. 4-bit: re-quantized with
    the same quant type, blocksize, double quantization and source dtype (or `source_dtype`: W is
    cast to it first, and it becomes the QuantState's dtype); packed bytes copied into the existing
    parameter and a fresh QuantState installed. int8: re-quantized per row (new CB and SCB, as
    bitsandbytes' Int8Params does from fp16). Quantized writes are lossy by construction.
    """
    with torch.no_grad():
        if _is_4bit(layer):
            _check_not_cpu_packed(layer)
            qs = _quant_state(layer)
            w = layer.weight
            packed, new_qs = bnb.functional.quantize_4bit(
                W.to(source_dtype or qs.dtype).contiguous(), blocksize=qs.blocksize, compress_statistics=qs.nested,
                quant_type=qs.quant_type, quant_storage=w.data.dtype)
            w.data.copy_(packed.reshape(w.data.shape))
            w.quant_state = new_qs
            if getattr(layer, "quant_state", None) is not None:
                layer.quant_state = new_qs
        elif _is_int8(layer):
            CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.to(torch.float16).contiguous())
            layer.weight.data.copy_(CB)
            _int8_scb(layer).copy_(SCB)
        elif isinstance(Conv1D, type) and isinstance(layer, Conv1D):
            layer.weight.data.copy_(W.T.to(layer.weight.dtype))
        elif isinstance(layer, nn.Linear):
            layer.weight.data.copy_(W.to(layer.weight.dtype))
        else:
            raise TypeError(f"unsupported base layer {type(layer).__name__}")


def unpack_cpu_layout(model: nn.Module) -> int:
    """Undo bitsandbytes' in-place CPU repacking on every Linear4bit of `model`; returns the count.

    Lossy: bitsandbytes rounded absmax to bf16 when it repacked, and double quantization is redone.
    Also turns off the CPU repacking path on every Linear4bit so it cannot happen again.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    n = 0
    for module in model.modules():
        if _is_4bit(module):
            module.support_avx512bf16_for_cpu = False
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, module.weight.quant_state)
                n += 1
    return n


def disable_cpu_repack(model: nn.Module) -> None:
    """Stop bitsandbytes' eval-mode CPU repacking on every Linear4bit of `model` (a speed path only)."""
    for module in model.modules():
        if _is_4bit(module):
            module.__dict__.setdefault("_cpu_repack_before_lora", getattr(module, "support_avx512bf16_for_cpu", None))
            module.support_avx512bf16_for_cpu = False


def restore_cpu_repack(model: nn.Module) -> None:
    """Undo disable_cpu_repack (unload: the base layers compute as bitsandbytes would without us)."""
    for module in model.modules():
        before = module.__dict__.pop("_cpu_repack_before_lora", None) if _is_4bit(module) else None
        if before is not None:
            module.support_avx512bf16_for_cpu = before
