"""The PyTorch specification of every LoRA op: the spec the Triton kernels implement, and the CPU path.

Pure PyTorch, any device, written to be read. Every Triton op file (`lora_4bit.py`, `lora_int8.py`,
`lora_dense.py`) implements the same four functions with the same signatures and meaning:

    dequantize(weight, dtype=None) -> W [N, K]
    dropout_mask(seed, M, K, p, device) -> keep: bool [M, K]
    lora_forward(x, weight, bias, A, B, scaling, dropout_p, seed) -> (y [M, N], u [M, r])
    lora_backward(g, x, u, weight, A, B, scaling, dropout_p, seed, needs_dx=True) -> (dx, dA, dB)

and, optionally, `unsupported_reason(x, weight, bias, A, B, dropout_p) -> str | None`, which
`kernels.lora_linear(backend="auto")` asks before choosing the Triton op (None = supported).

Names and shapes (W is the base weight [N = out_features, K = in_features]):
    x [M, K]  activations, the base compute dtype (fp32 / fp16 / bf16; fp64 in tests)
    A [r, K], B [N, r]  LoRA weights, both in "the LoRA dtype" (fp32 under peft's default
              autocast_adapter_dtype=True; the autocast dtype under torch.autocast, since the entry
              point casts them before calling an op)
    bias [N] or None (any float dtype; cast to x's dtype as nn.Linear / bnb do)
    u [M, r] = dropout(x) @ A^T, returned by forward and handed back to backward (the only thin
              activation saved between the passes; nothing [N, K]-sized is saved)

Dtypes, the same order of operations as peft's `lora.Linear.forward`:
    y_base = F.linear(x, deq(W) in x.dtype, bias in x.dtype)            [M, N]  x.dtype
    xl     = x.to(A.dtype); xd = dropout(xl)                             [M, K]  LoRA dtype
    u      = xd @ A^T                                                   [M, r]  LoRA dtype
    lora   = (u @ B^T) * scaling                                         [M, N]  LoRA dtype
    y      = (y_base + lora).to(x.dtype)   # the sum in the promoted dtype, then one rounding
(peft's bnb 4-bit/8-bit layers instead round `lora` to the output dtype before adding: identical in
fp32, up to one extra rounding of the output dtype in fp16/bf16.) A Triton kernel may keep u in fp32
(its accumulator): backward accepts u in any float dtype and computes in the LoRA dtype.

Dropout (bit-exact contract with the Triton kernels; `keep` = True means the element is kept):
    Element (m, k) of the [M, K] activation uses the flat offset  off = m * K + k  and
        keep[m, k] = tl.rand(seed, off) >= p        (both sides float32; p rounded to float32)
    with Triton 3.x's `tl.rand` (triton/language/random.py), i.e. Philox4x32-10:
        key    k0 = seed & 0xFFFFFFFF, k1 = (seed >> 32) & 0xFFFFFFFF     (seed: int in [0, 2**63))
        counter c0 = off & 0xFFFFFFFF, c1 = off >> 32, c2 = c3 = 0
                 (a kernel whose offsets are int32 gets c1 = 0: use int64 offsets when M*K >= 2**31)
        10 rounds of: c0' = umulhi(0xCD9E8D57, c2) ^ c1 ^ k0;  c2' = umulhi(0xD2511F53, c0) ^ c3 ^ k1
                      c1' = lo32(0xCD9E8D57 * c2);            c3' = lo32(0xD2511F53 * c0)
                      k0 += 0x9E3779B9; k1 += 0xBB67AE85   (all mod 2**32)
        r = c0 after the rounds (tl.randint); as int32 s, v = ~s if s < 0 else s  (v in [0, 2**31))
        u = float32(v) * float32(4.6566127342e-10)                        (tl.rand, in [0, 1))
    dropout(x) = where(keep, x * (1 / (1 - p)), 0), the scale computed in Python float (double),
    applied in the LoRA dtype. Forward and backward regenerate the same mask from the seed, so no
    mask tensor is ever stored. Dropout is applied only when dropout_p > 0 (the caller passes
    dropout_p = 0 outside training).

Backward (g = dL/dy [M, N]; autograd's own order for peft's graph, so fp32 results match peft):
    gs = g.to(A.dtype) * scaling                [M, N]
    dB = gs^T @ u                               [N, r]
    v  = gs @ B                                 [M, r]
    dA = v^T @ dropout(x.to(A.dtype))           [r, K]
    dx = g @ deq(W) + dropout_bwd(v @ A).to(x.dtype)   [M, K] in x.dtype; dropout_bwd = same mask
                                                        and scale as forward
Base weight W is frozen: no gradient for it. The bias gradient (bias="all" training) is g.sum(0),
computed by the autograd Function, not here.

A = B = None means the base layer alone: lora_forward returns (y_base, None).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .weights import BaseWeight, DenseWeight, Int8Weight, Quant4bitWeight

__all__ = ["dequantize", "philox_randint", "uniform_from_uint32", "dropout_mask", "apply_dropout",
           "base_forward", "lora_forward", "lora_backward"]

# bitsandbytes' int8 dequantization multiplies by this constant (1/127 as bnb writes it) instead of
# dividing by 127; the two differ in the last bit for some values, and bnb is the ground truth.
INT8_INV_127 = 7.874015718698502e-3


# ---------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------

def _absmax_f32(weight: Quant4bitWeight) -> torch.Tensor:
    """fp32 absmax [n_blocks], undoing bitsandbytes' double quantization when `nested` is set."""
    if weight.nested is None:
        return weight.absmax.float()
    nest = weight.nested
    q = weight.absmax.reshape(-1).int()  # uint8 codes [n_blocks]
    scale = nest.absmax.reshape(-1).repeat_interleave(nest.blocksize)[: q.numel()]  # [n_blocks]
    return nest.code[q] * scale + nest.offset  # fp32: product, then offset, as bnb does


def _dequantize_4bit_f32(weight: Quant4bitWeight) -> torch.Tensor:
    """fp32 W [N, K] = code[q] * absmax[flat // blocksize], nibbles high-first (bnb's layout)."""
    n, k = weight.shape
    numel, bs = n * k, weight.blocksize
    packed = weight.packed.reshape(-1)  # uint8 [(N*K + 1) // 2]
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bnb's quant_storage may be another dtype: same bytes
    q = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)  # [2 * bytes]
    q[0::2] = packed >> 4  # flat element 2j: the HIGH nibble of byte j
    q[1::2] = packed & 0xF  # flat element 2j+1: the low nibble
    w = weight.code.float()[q[:numel].int()]  # fp32 [N*K]
    absmax = _absmax_f32(weight)  # fp32 [n_blocks]
    full = numel // bs * bs
    w[:full].view(-1, bs).mul_(absmax[: numel // bs, None])  # whole blocks
    if full < numel:
        w[full:].mul_(absmax[numel // bs])  # the last, partial block
    return w.view(n, k)


def dequantize(weight: BaseWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W [N, K] as a dense tensor of `dtype` (default: the weight's own dtype).

    Bit-for-bit what bitsandbytes.functional.dequantize_4bit / int8_vectorwise_dequant produce:
    4-bit values are computed in fp32, rounded to the dtype the weight was quantized from
    (`weight.dtype`, as bnb returns it), and only then cast to `dtype`. Int8 gives fp32
    CB * SCB * (1/127). A DenseWeight is returned as is (a view) when no cast is needed.
    """
    if isinstance(weight, DenseWeight):
        w = weight.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    if isinstance(weight, Int8Weight):
        w = weight.CB * weight.SCB.view(-1, 1) * INT8_INV_127  # fp32 [N, K], bnb's expression
        return w if dtype is None else w.to(dtype)
    if isinstance(weight, Quant4bitWeight):
        w = _dequantize_4bit_f32(weight).to(weight.dtype)  # what bnb returns
        return w if dtype is None else w.to(dtype)
    raise TypeError(f"unknown base weight type {type(weight).__name__}: expected DenseWeight, "
                    "Quant4bitWeight or Int8Weight (kernels.weights)")


# ---------------------------------------------------------------------------------------------
# Philox4x32-10 dropout (Triton's tl.rand, reimplemented with int64 arithmetic)
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UINT_TO_FLOAT_SCALE = 4.6566127342e-10  # tl.rand's scale: (2**23 - 1) / 2**23 * 2**-31


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """Triton's `tl.randint(seed, offsets)`: uint32 values held in int64, same shape as offsets.

    offsets: int64 tensor of non-negative counters (c0 = low 32 bits, c1 = high 32 bits).
    The state words are uint32 values kept in int64. const * c (both < 2**32) needs 64 bits
    unsigned; int64 multiplication wraps modulo 2**64 (two's complement, on CPU and CUDA), so the
    wrapped product still carries the exact low 64 bits: hi = (prod >> 32) & 0xFFFFFFFF,
    lo = prod & 0xFFFFFFFF. The tests check the result bit for bit against Triton.
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be an int in [0, 2**63), got {seed}")
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = offsets & _M32
    c1 = offsets >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        prod_b = c2 * _PHILOX_ROUND_B  # 0xCD9E8D57 * c2 mod 2**64
        prod_a = c0 * _PHILOX_ROUND_A  # 0xD2511F53 * c0 mod 2**64
        c0 = (prod_b >> 32).bitwise_and_(_M32).bitwise_xor_(c1).bitwise_xor_(k0)  # umulhi(B, c2) ^ c1 ^ k0
        c2 = (prod_a >> 32).bitwise_and_(_M32).bitwise_xor_(c3).bitwise_xor_(k1)  # umulhi(A, c0) ^ c3 ^ k1
        c1 = prod_b.bitwise_and_(_M32)  # lo32(B * c2)
        c3 = prod_a.bitwise_and_(_M32)  # lo32(A * c0)
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0


def uniform_from_uint32(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit values: float32 in [0, 1)."""
    v = torch.where(r >= 2**31, _M32 - r, r)  # as int32 s: ~s when s < 0, i.e. 2**32 - 1 - r
    return v.to(torch.float32) * torch.tensor(_UINT_TO_FLOAT_SCALE, dtype=torch.float32,
                                              device=r.device)


def dropout_mask(seed: int, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """keep [M, K] bool: keep[m, k] = tl.rand(seed, m*K + k) >= float32(p). See the module doc."""
    device = torch.device("cpu") if device is None else torch.device(device)
    keep = torch.empty(M * K, dtype=torch.bool, device=device)  # flat [M*K]: offset m*K + k
    p32 = torch.tensor(p, dtype=torch.float32, device=device)
    # Chunked so the ~40 int64 temporaries of the rounds stay in cache on CPU (about 2x faster).
    chunk = 1 << 16 if device.type == "cpu" else 1 << 24
    for start in range(0, M * K, chunk):
        offsets = torch.arange(start, min(start + chunk, M * K), dtype=torch.int64, device=device)
        torch.ge(uniform_from_uint32(philox_randint(seed, offsets)), p32, out=keep[start:start + chunk])
    return keep.view(M, K)


def apply_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dropout(x) = where(keep, x * (1 / (1 - p)), 0) for x [M, K]; identity when p == 0."""
    if p == 0.0:
        return x
    return _dropout_with(x, dropout_mask(seed, x.shape[0], x.shape[1], p, x.device), p)


def _dropout_with(x: torch.Tensor, keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """where(keep, x * (1 / (1 - p)), 0) for a given mask (None: p == 0, identity)."""
    if keep is None:
        return x
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------

def base_forward(x: torch.Tensor, weight: BaseWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, N] = x @ deq(W)^T + bias, in x.dtype (what nn.Linear / bnb's Linear4bit compute)."""
    w = dequantize(weight, x.dtype)  # [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def lora_forward(
    x: torch.Tensor,
    weight: BaseWeight,
    bias: Optional[torch.Tensor],
    A: Optional[torch.Tensor],
    B: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y [M, N] in x.dtype, u [M, r] = dropout(x) @ A^T in the LoRA dtype). See the module doc.

    x [M, K]; A [r, K], B [N, r] (or both None: returns (base output, None)); `seed` is required
    when dropout_p > 0.
    """
    y = base_forward(x, weight, bias)  # [M, N] x.dtype
    if A is None:
        return y, None
    xd = apply_dropout(x.to(A.dtype), seed, dropout_p)  # [M, K] LoRA dtype
    u = F.linear(xd, A)  # [M, r]
    lora = F.linear(u, B) * scaling  # [M, N] LoRA dtype
    return (y + lora).to(x.dtype), u


def lora_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    weight: BaseWeight,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    needs_dx: bool = True,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dx [M, K] in x.dtype or None, dA [r, K], dB [N, r] in the LoRA dtype) for g = dL/dy [M, N].

    u [M, r] is what lora_forward returned (any float dtype); the dropout mask is regenerated from
    `seed`. With A = B = None use `base_backward`.
    """
    lora_dtype = A.dtype
    gs = g.to(lora_dtype) * scaling  # [M, N]
    dB = gs.t().mm(u.to(lora_dtype))  # [N, r]
    v = gs.mm(B)  # [M, r]
    keep = None if dropout_p == 0.0 else dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    xd = _dropout_with(x.to(lora_dtype), keep, dropout_p)  # [M, K], the forward's mask again
    dA = v.t().mm(xd)  # [r, K]
    if not needs_dx:
        return None, dA, dB
    dxl = _dropout_with(v.mm(A), keep, dropout_p)  # [M, K]: same mask and scale as forward
    return base_backward(g, x, weight) + dxl.to(x.dtype), dA, dB


def base_backward(g: torch.Tensor, x: torch.Tensor, weight: BaseWeight) -> torch.Tensor:
    """dx [M, K] = g @ deq(W) in x.dtype (the base layer's input gradient)."""
    return g.to(x.dtype).mm(dequantize(weight, x.dtype))
