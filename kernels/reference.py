"""The specification of every LoRA op, in plain PyTorch: what the Triton kernels implement.

Written to be read, not to be fast (the torch backend's speed paths are in `kernels.torch_ops`,
tested equal to this file). Shapes: W is the base weight [N = out_features, K = in_features];
x [M, K] in the base compute dtype; A [r, K], B [N, r] in "the LoRA dtype" (fp32 under peft's
default autocast_adapter_dtype=True); bias [N] or None; u [M, r] = dropout(x) @ A^T, the only thin
activation kept between the passes. A = B = None means the base layer alone.

    dequantize(weight, dtype=None)                                -> W [N, K]
    dropout_mask(seed, M, K, p, device=None)                      -> keep: bool [M, K]
    lora_forward(x, weight, bias, A, B, scaling, dropout_p, seed) -> (y [M, N], u [M, r])
    lora_backward(g, x, u, weight, A, B, scaling, dropout_p, seed, needs_dx) -> (dx, dA, dB)

Dropout here is the Triton kernels' contract, Philox4x32-10 keyed by `seed` (Triton 3.x's tl.rand,
triton/language/random.py): element (m, k) uses the counter off = m*K + k and is kept when
    tl.rand(seed, off) >= p        (both float32)
    key k0, k1 = low / high 32 bits of seed (an int in [0, 2**63)); counter c0, c1 = low / high
    32 bits of off, c2 = c3 = 0; 10 rounds of
        c0' = umulhi(0xCD9E8D57, c2) ^ c1 ^ k0;  c2' = umulhi(0xD2511F53, c0) ^ c3 ^ k1
        c1' = lo32(0xCD9E8D57 * c2);            c3' = lo32(0xD2511F53 * c0)
        k0 += 0x9E3779B9; k1 += 0xBB67AE85   (all mod 2**32)
    r = c0; as int32 s, v = ~s if s < 0 else s; u = float32(v) * float32(4.6566127342e-10)
and dropout(x) = where(keep, x * (1 / (1 - p)), 0), applied in the LoRA dtype. Both passes draw the
same mask from the seed, so no mask is stored. (The torch backend draws peft's mask instead, from
torch's generator: see kernels.torch_ops. The two backends then drop different elements.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .call import SEED_END
from .formats import DenseWeight, Int8Weight, Quant4bitWeight, check_weight
from .formats.int8 import INT8_INV_127

__all__ = ["dequantize", "philox_randint", "uniform_from_uint32", "dropout_mask", "apply_dropout",
           "lora_forward", "lora_backward"]


# ---------------------------------------------------------------------------------------------
# Dequantization: bit for bit what bitsandbytes.functional.dequantize_4bit / int8_vectorwise_dequant give
# ---------------------------------------------------------------------------------------------

def dequantize(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W [N, K] in `dtype` (default: the record's own: dense W's, fp32 for int8, weight.dtype for 4-bit).

    4-bit values are computed in fp32, rounded to the dtype W was quantized from (as bnb returns
    them), and only then cast to `dtype`. A DenseWeight comes back as is (a view) when no cast is
    needed. (bnb 0.50's CPU 4-bit kernel scales per row-block, which is wrong when K is not a
    multiple of the blocksize; this spec follows the flat blocks bnb's quantizer writes.)
    """
    check_weight(weight)
    if isinstance(weight, DenseWeight):
        w = weight.weight  # [N, K]
    elif isinstance(weight, Int8Weight):
        # fp32 [N, K], bnb's order. The literal is INT8_INV_127 (a test checks): the name, read
        # inside an autograd.Function under torch.compile(dynamic=True), fails (see ops.matmul_4bit)
        w = weight.CB * weight.SCB.view(-1, 1) * 7.874015718698502e-3
    else:
        w = _dequantize_4bit_f32(weight).to(weight.dtype)  # [N, K], what bnb returns
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def _dequantize_4bit_f32(weight: Quant4bitWeight) -> torch.Tensor:
    """fp32 W [N, K] = code[q] * absmax[flat // blocksize], nibbles high-first."""
    N, K = weight.shape
    packed = weight.packed_bytes  # uint8 [(N*K + 1) // 2]
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: N * K]  # flat codes [N*K]
    absmax = weight.absmax  # fp32 [n_blocks]
    if weight.nested is not None:  # double quantization: uint8 absmax codes with their own absmax
        nest = weight.nested
        outer = torch.arange(absmax.numel(), device=absmax.device) // nest.blocksize  # [n_blocks]
        absmax = nest.code[absmax.int()] * nest.absmax[outer] + nest.offset  # fp32: product, then offset
    scale = absmax.repeat_interleave(weight.blocksize)[: N * K]  # [N*K]: element f has absmax[f // blocksize]
    return (weight.code[q.int()] * scale).view(N, K)


# ---------------------------------------------------------------------------------------------
# Dropout: Triton's tl.rand >= p (Philox4x32-10 in int64 arithmetic; see the module doc)
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UINT_TO_FLOAT_SCALE = 4.6566127342e-10  # tl.rand's scale: (2**23 - 1) / 2**23 * 2**-31


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """tl.randint(seed, offsets): uint32 values held in int64, same shape as the int64 `offsets`.

    The state words are uint32 values in int64; const * c needs 64 unsigned bits, and int64
    multiplication wraps modulo 2**64, so the wrapped product still has the exact low 64 bits:
    hi = (prod >> 32) & 0xFFFFFFFF, lo = prod & 0xFFFFFFFF.
    """
    if not 0 <= seed < SEED_END:
        raise ValueError(f"dropout seed must be an int in [0, 2**63), got {seed}")
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = offsets & _M32, offsets >> 32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    for _ in range(n_rounds):
        prod_b, prod_a = c2 * _PHILOX_ROUND_B, c0 * _PHILOX_ROUND_A
        c0 = ((prod_b >> 32) & _M32) ^ c1 ^ k0
        c2 = ((prod_a >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = prod_b & _M32, prod_a & _M32
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0


def uniform_from_uint32(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit values: float32 in [0, 1)."""
    v = torch.where(r >= 2**31, _M32 - r, r)  # as int32 s: ~s when s < 0, i.e. 2**32 - 1 - r
    return v.to(torch.float32) * torch.tensor(_UINT_TO_FLOAT_SCALE, dtype=torch.float32, device=r.device)


def dropout_mask(seed: int, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """keep [M, K] bool: keep[m, k] = tl.rand(seed, m*K + k) >= float32(p).

    Materialises int64 [M*K] Philox state: a spec, not a fast path.
    """
    offsets = torch.arange(M * K, dtype=torch.int64, device=device)  # flat m*K + k
    u = uniform_from_uint32(philox_randint(seed, offsets))  # [M*K] float32
    return (u >= torch.tensor(p, dtype=torch.float32, device=u.device)).view(M, K)


def apply_dropout(x: torch.Tensor, keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """where(keep, x * (1 / (1 - p)), 0) for x [M, K] (the scale in Python float); keep None: x."""
    return x if keep is None else torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


# ---------------------------------------------------------------------------------------------
# Forward and backward, in peft's order of operations (fp32 results equal peft's exactly)
# ---------------------------------------------------------------------------------------------

def lora_forward(x, weight, bias, A, B, scaling: float, dropout_p: float = 0.0, seed: Optional[int] = None):
    """(y [M, N] in x.dtype, u [M, r] in the LoRA dtype); u is None when A is None.

    y = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T: the base in x.dtype (bias cast to it,
    as nn.Linear and bnb do), the LoRA branch in A.dtype, their sum rounded once to x.dtype. (peft's
    bnb layers round the LoRA term to the output dtype before adding: the same in fp32.)
    """
    y = F.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))  # [M, N]
    if A is None:
        return y, None
    keep = dropout_mask(seed, *x.shape, dropout_p, x.device) if dropout_p > 0 else None
    xd = apply_dropout(x.to(A.dtype), keep, dropout_p)  # [M, K] LoRA dtype
    u = F.linear(xd, A)  # [M, r]
    lora = F.linear(u, B) * scaling  # [M, N]
    return (y + lora).to(x.dtype), u


def lora_backward(g, x, u, weight, A, B, scaling: float, dropout_p: float = 0.0, seed: Optional[int] = None,
                  needs_dx: bool = True):
    """(dx [M, K] in x.dtype or None, dA [r, K], dB [N, r] in the LoRA dtype) for g = dL/dy [M, N].

    u: what lora_forward returned (any float dtype: a kernel may keep it in fp32). Autograd's order
    for peft's graph (g * scaling first). The base weight is frozen: no gradient for it; the bias
    gradient g.sum(0) is left to the caller. A = B = None: (dx, None, None).
    """
    dx = g.to(x.dtype) @ dequantize(weight, x.dtype) if needs_dx else None  # [M, K]
    if A is None:
        return dx, None, None
    gs = g.to(A.dtype) * scaling  # [M, N]
    dB = gs.t() @ u.to(A.dtype)  # [N, r]
    v = gs @ B  # [M, r]
    keep = dropout_mask(seed, *x.shape, dropout_p, x.device) if dropout_p > 0 else None  # forward's mask
    dA = v.t() @ apply_dropout(x.to(A.dtype), keep, dropout_p)  # [r, K]
    if needs_dx:
        dx = dx + apply_dropout(v @ A, keep, dropout_p).to(x.dtype)  # [M, K]
    return dx, dA, dB
