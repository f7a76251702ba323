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
(when scaling is a power of two, as with peft's usual alpha = r or 2r, scaling commutes exactly
with every rounding, so the code multiplies the thin dB and v instead of g: same bits, one
[M, N] pass fewer.)
    dA = v^T @ dropout(x.to(A.dtype))           [r, K]
    dx = g @ deq(W) + dropout_bwd(v @ A).to(x.dtype)   [M, K] in x.dtype; dropout_bwd = same mask
                                                        and scale as forward
Base weight W is frozen: no gradient for it. The bias gradient (bias="all" training) is g.sum(0),
computed by the autograd Function, not here.

A = B = None means the base layer alone: lora_forward returns (y_base, None).
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Optional

import torch
import torch.nn.functional as F

from .weights import BaseWeight, DenseWeight, Int8Weight, Quant4bitWeight

__all__ = ["dequantize", "dequantize_fast", "philox_randint", "uniform_from_uint32", "dropout_mask", "apply_dropout",
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
    (Exception: bnb 0.50's CPU 4-bit kernel scales per row-block, which is wrong when K is not a
    multiple of the blocksize; this spec follows the flat blocks bnb's quantizer writes.)
    """
    if isinstance(weight, DenseWeight):
        w = weight.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    if isinstance(weight, Int8Weight):
        # fp32 [N, K] = (CB * SCB) * (1/127), bnb's expression and rounding order; the second
        # product in place (same bits, one [N, K] temporary fewer)
        w = (weight.CB * weight.SCB.view(-1, 1)).mul_(INT8_INV_127)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    if isinstance(weight, Quant4bitWeight):
        w = _dequantize_4bit_f32(weight).to(weight.dtype)  # what bnb returns
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    raise TypeError(f"unknown base weight type {type(weight).__name__}: expected DenseWeight, "
                    "Quant4bitWeight or Int8Weight (kernels.weights)")


def dequantize_fast(weight: BaseWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`dequantize`, bit for bit, through bitsandbytes' own kernel for 4-bit weights when it can.

    What the torch backend's forward and backward use. `dequantize` above stays the specification
    (and is what the tests compare with bitsandbytes); this only swaps its many full-size PyTorch
    temporaries for one call of `bitsandbytes.functional.dequantize_4bit` (about 30x faster on CPU
    at 1024 x 1024), and falls back to `dequantize` whenever bitsandbytes cannot take the record:
    not importable, a device it has no kernel for, a blocksize or dtype it rejects, K not a multiple
    of the blocksize (bnb's CPU kernel gets blocks that straddle rows wrong), or a code table other
    than its built-in NF4 / FP4 one (its CPU and CUDA kernels ignore `code`). The tests check
    fast == spec exactly for nf4 / fp4, with and without nested absmax, fp32 / bf16 / fp16.
    """
    if isinstance(weight, Quant4bitWeight):
        bnbf = _bnb_functional() if _bnb_can_dequantize(weight) else None
        if bnbf is not None:
            memo = weight.__dict__.get("_bnb_args")
            if memo is None:  # built once per record: views of the record's tensors, no copies
                # packed as bnb's uint8 [bytes, 1] column (a [1, bytes] row would come back transposed)
                packed = weight.packed.reshape(-1)
                packed = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).view(-1, 1)
                memo = (packed, _bnb_quant_state(bnbf, weight))
                object.__setattr__(weight, "_bnb_args", memo)
            w = bnbf.dequantize_4bit(*memo)  # [N, K] in weight.dtype
            return w if dtype is None or w.dtype == dtype else w.to(dtype)
    return dequantize(weight, dtype)


# bitsandbytes is imported lazily, on the first quantized call: it imports a package named
# `kernels` during its own import (a hub loader), so importing it while ours is being imported
# would be circular. False = not tried yet; None = not importable here.
_BNB_FUNCTIONAL = False
_BNB_DEVICES = ("cpu", "cuda")  # devices whose bnb 4-bit kernels are known to equal the spec
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_functional():
    global _BNB_FUNCTIONAL
    if _BNB_FUNCTIONAL is False:
        try:
            import bitsandbytes.functional as bnbf
            _BNB_FUNCTIONAL = bnbf
        except Exception:  # not installed, or no kernel library for this platform
            _BNB_FUNCTIONAL = None
    return _BNB_FUNCTIONAL


def _bnb_can_dequantize(weight: Quant4bitWeight) -> bool:
    """Whether bitsandbytes' dequantize_4bit gives exactly `dequantize(weight)` for this record.

    Memoised on the (frozen) record, so a layer that keeps its record pays the table check once.
    """
    ok = weight.__dict__.get("_bnb_ok")
    if ok is None:
        ok = (weight.device.type in _BNB_DEVICES and weight.blocksize in _BNB_BLOCKSIZES
              and weight.quant_type in ("nf4", "fp4") and weight.code.numel() == 16
              # bnb 0.50's CPU kernel applies absmax per row-block: wrong when a block straddles
              # two rows (K not a multiple of blocksize; the spec's flat blocks are what its
              # quantizer wrote). Real layers have K a multiple of the blocksize.
              and weight.shape[1] % weight.blocksize == 0
              and weight.dtype in _BNB_DTYPES and weight.packed.numel() * weight.packed.element_size() > 1
              and _bnb_functional() is not None)
        if ok:  # bnb's kernels use their built-in table, not `code`: only take records that carry it
            table = _bnb_functional().get_4bit_type(weight.quant_type, device=weight.code.device)
            ok = torch.equal(weight.code.float(), table.float())
        object.__setattr__(weight, "_bnb_ok", ok)
    return ok


def _bnb_quant_state(bnbf, weight: Quant4bitWeight):
    """A bitsandbytes QuantState viewing the record's tensors (no copies)."""
    state2, offset = None, None
    if weight.nested is not None:
        nest = weight.nested
        state2 = bnbf.QuantState(absmax=nest.absmax, code=nest.code, blocksize=nest.blocksize,
                                 dtype=torch.float32)
        offset = nest.offset  # bnb adds it in place to the fp32 absmax: an fp32 add, as the spec's
    return bnbf.QuantState(absmax=weight.absmax, shape=torch.Size(weight.shape), code=weight.code,
                           blocksize=weight.blocksize, quant_type=weight.quant_type, dtype=weight.dtype,
                           offset=offset, state2=state2)


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
    """keep [M, K] bool: keep[m, k] = tl.rand(seed, m*K + k) >= float32(p). See the module doc.

    Computes exactly `uniform_from_uint32(philox_randint(seed, offsets)) >= float32(p)` (the tests
    check the two bit for bit), with fewer tensor passes: see `_philox_keep_chunk`.
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be an int in [0, 2**63), got {seed}")
    device = torch.device("cpu") if device is None else torch.device(device)
    keep = torch.empty(M * K, dtype=torch.bool, device=device)  # flat [M*K]: offset m*K + k
    # Chunks of a power of two (so none straddles a multiple of 2**32: the counter's high word is
    # one number per chunk). On CPU: large enough that the ~90 torch calls per chunk cost little
    # next to the work, small enough for the six int64 buffers to stay in cache.
    chunk = min(_CPU_CHUNK if device.type == "cpu" else 1 << 20, _pow2_ceil(M * K))
    bufs = [torch.empty(chunk, dtype=torch.int64, device=device) for _ in range(6)]
    threshold = _keep_threshold(p)
    for start in range(0, M * K, chunk):
        n = min(chunk, M * K - start)
        _philox_keep_chunk(seed, start, n, threshold, [b[:n] for b in bufs] if n < chunk else bufs,
                           keep[start:start + n])
    return keep.view(M, K)


# 32768 offsets: 6 x 256 KiB of int64 state. Measured on a 2-core EPYC, 1 thread, 512 x 1024 mask:
# 2**13: 18.7 ms, 2**14: 13.8, 2**15: 12.0, 2**16: 12.1, 2**17: 13.5.
_CPU_CHUNK = 1 << 15


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _keep_threshold(p: float) -> int:
    """The smallest v in [0, 2**31] with float32(float32(v) * SCALE) >= float32(p).

    tl.rand's u = float32(v) * float32(SCALE) is a non-decreasing function of the integer v (both
    roundings are monotone), so `u >= p` is exactly `v >= T`: the mask needs no float conversion at
    all. Found by bisection with exact float32 arithmetic (struct rounds a double to the nearest
    float32; the product of two float32 values is exact in a double, so one rounding, as in fp32).
    2**31 means no v qualifies (nothing is kept).
    """
    p32, scale = _f32(p), _f32(_UINT_TO_FLOAT_SCALE)

    def keeps(v: int) -> bool:
        return _f32(_f32(float(v)) * scale) >= p32

    lo, hi = 0, 2**31  # invariant: keeps(hi) or hi == 2**31; not keeps(v) for v < lo
    while lo < hi:
        mid = (lo + hi) // 2
        if keeps(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _philox_keep_chunk(seed: int, start: int, n: int, threshold: int, bufs: list, out: torch.Tensor) -> None:
    """out[i] = keep for offsets start + i (i < n): Philox4x32-10 as in `philox_randint`, rearranged.

    Same integer results, fewer passes over memory (the chunk never straddles a multiple of 2**32):
      - every op writes into one of six preallocated int64 buffers (no allocation per op);
      - c1 = start >> 32 is one number for the chunk and c2 = c3 = 0 at the start, so rounds 1-2
        have several words that are plain Python ints (computed once, not per element);
      - lo32(const * c) words (c1, c3) are kept unmasked: they are only XORed into c0 / c2, whose
        one final `& 0xFFFFFFFF` removes their high bits too (XOR and AND act bitwise);
      - the last round computes c0 only (tl.randint returns c0), and the float step is replaced by
        an integer threshold (`_keep_threshold`): v = c0 if c0 < 2**31 else 2**32 - 1 - c0, and
        v >= T  <=>  (c0 - T) mod 2**32 <= 2**32 - 1 - 2T.
    """
    c0, c2, c1, c3, pb, pa = bufs  # int64 [n] each; c1 / c3 hold raw (unmasked) products
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    torch.arange(start & _M32, (start & _M32) + n, dtype=torch.int64, out=c0)  # counter low word
    c1s = start >> 32  # counter high word (same for the whole chunk)
    # round 1 (c2 = c3 = 0): c0' = c1 ^ k0 (a number), c2' = umulhi(A, c0) ^ k1, c1' = 0, c3' = A * c0
    torch.mul(c0, _PHILOX_ROUND_A, out=c3)
    torch.bitwise_right_shift(c3, 32, out=c2).bitwise_xor_(k1).bitwise_and_(_M32)
    c0s = c1s ^ k0
    k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    # round 2 (c0 a number, c1 = 0): A * c0 is a number too
    pa_s = c0s * _PHILOX_ROUND_A
    torch.mul(c2, _PHILOX_ROUND_B, out=pb)
    torch.bitwise_right_shift(pb, 32, out=c0).bitwise_xor_(k0).bitwise_and_(_M32)
    c3.bitwise_xor_(((pa_s >> 32) & _M32) ^ k1).bitwise_and_(_M32)  # c2'' = umulhi(A, c0) ^ c3 ^ k1
    c2, c3 = c3, c2
    c1, pb = pb, c1
    c3s = pa_s & _M32  # c3'' = lo32(A * c0): a number
    k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    # round 3 (c3 a number)
    torch.mul(c2, _PHILOX_ROUND_B, out=pb)
    torch.mul(c0, _PHILOX_ROUND_A, out=pa)
    torch.bitwise_right_shift(pb, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_M32)
    torch.bitwise_right_shift(pa, 32, out=c2).bitwise_xor_(c3s ^ k1).bitwise_and_(_M32)
    c1, pb = pb, c1
    c3, pa = pa, c3
    k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    # rounds 4-9: the general round, in place
    for _ in range(6):
        torch.mul(c2, _PHILOX_ROUND_B, out=pb)
        torch.mul(c0, _PHILOX_ROUND_A, out=pa)
        torch.bitwise_right_shift(pb, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_M32)
        torch.bitwise_right_shift(pa, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_M32)
        c1, pb = pb, c1
        c3, pa = pa, c3
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    # round 10: c0 only, then the threshold ((c0 - T) & M32 == (c0 & M32 - T) & M32)
    torch.mul(c2, _PHILOX_ROUND_B, out=pb)
    torch.bitwise_right_shift(pb, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0)
    c0.sub_(threshold).bitwise_and_(_M32)
    torch.le(c0, _M32 - 2 * threshold, out=out)


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
    w = dequantize_fast(weight, x.dtype)  # [N, K], exactly `dequantize(weight, x.dtype)`
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, w, bias)


def lora_forward(
    x: torch.Tensor,
    weight: BaseWeight,
    bias: Optional[torch.Tensor],
    A: Optional[torch.Tensor],
    B: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    keep: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y [M, N] in x.dtype, u [M, r] = dropout(x) @ A^T in the LoRA dtype). See the module doc.

    x [M, K]; A [r, K], B [N, r] (or both None: returns (base output, None)); `seed` is required
    when dropout_p > 0. `keep`: dropout_mask(seed, M, K, dropout_p) when the caller already has it.
    """
    y = base_forward(x, weight, bias)  # [M, N] x.dtype
    if A is None:
        return y, None
    xl = x if x.dtype == A.dtype else x.to(A.dtype)  # [M, K] LoRA dtype
    if keep is None and dropout_p > 0.0:
        keep = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    u = F.linear(_dropout_with(xl, keep, dropout_p), A)  # [M, r]
    if _exact_scale(scaling) and y.dtype == u.dtype and not y.requires_grad:
        lora = torch.addmm(y, u, B.t(), beta=0, alpha=scaling)  # [M, N]: y only gives the shape
    else:  # F.linear: one autograd node where u.mm(B.t()) records two (when autograd is on)
        lora = F.linear(u, B).mul_(scaling)  # [M, N] LoRA dtype: (u @ B^T) * scaling
    if lora.dtype == y.dtype:
        return y.add_(lora), u  # y + lora in place: same single rounding, one [M, N] buffer fewer
    return (y + lora).to(x.dtype), u  # the sum in the promoted dtype, then one rounding


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
    keep: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dx [M, K] in x.dtype or None, dA [r, K], dB [N, r] in the LoRA dtype) for g = dL/dy [M, N].

    u [M, r] is what lora_forward returned (any float dtype); the dropout mask is regenerated from
    `seed` unless the forward's `keep` is passed. With A = B = None use `base_backward`.
    """
    lora_dtype = A.dtype
    gl = g if g.dtype == lora_dtype else g.to(lora_dtype)  # [M, N]
    ul = u if u.dtype == lora_dtype else u.to(lora_dtype)  # [M, r]
    if _exact_scale(scaling):  # scale the thin products: no [M, N] g * scaling pass
        dB = _scaled_mm(gl.t(), ul, scaling, B)  # [N, r] = (g^T u) * s
        v = _scaled_mm(gl, B, scaling, ul)  # [M, r] = (g B) * s
    else:  # peft's order (g * s first): scaling after the product would round differently
        gs = gl * scaling  # [M, N]
        dB = gs.t().mm(ul)  # [N, r]
        v = gs.mm(B)  # [M, r]
    if keep is None and dropout_p > 0.0:
        keep = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    xl = x if x.dtype == lora_dtype else x.to(lora_dtype)
    dA = v.t().mm(_dropout_with(xl, keep, dropout_p))  # [r, K], the forward's mask again
    if not needs_dx:
        return None, dA, dB
    dxl = _dropout_with(v.mm(A), keep, dropout_p)  # [M, K]: same mask and scale as forward
    dx = base_backward(g, x, weight)  # [M, K] x.dtype, a fresh buffer
    return (dx.add_(dxl) if dxl.dtype == dx.dtype else dx.add_(dxl.to(dx.dtype))), dA, dB


def _exact_scale(s: float) -> bool:
    """True when s is a power of two: then fl(a * s) == fl(a) * s for every finite product that
    neither overflows nor underflows, so where s is applied does not change the bits."""
    return abs(math.frexp(s)[0]) == 0.5


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float, like: torch.Tensor) -> torch.Tensor:
    """fl(a @ b) * s [m, n], bit for bit, in one BLAS call when s is a power of two.

    `like`: any tensor of the result's shape and dtype; addmm ignores it with beta=0 (it is never
    read into the result, and not written). Where that is not possible (or `like` is in an autograd
    graph, which would then get a zero gradient pass): mm, then an in-place scale.
    """
    if (_exact_scale(s) and like.dtype == a.dtype and not like.requires_grad
            and like.shape == (a.shape[0], b.shape[1])):
        return torch.addmm(like, a, b, beta=0, alpha=s)  # BLAS applies alpha: exact for 2**k
    return a.mm(b).mul_(s)


def base_backward(g: torch.Tensor, x: torch.Tensor, weight: BaseWeight) -> torch.Tensor:
    """dx [M, K] = g @ deq(W) in x.dtype (the base layer's input gradient)."""
    return (g if g.dtype == x.dtype else g.to(x.dtype)).mm(dequantize_fast(weight, x.dtype))
