"""The triton backend's side of a call: what the kernels cannot take, and the two entry points.

    reason(call) -> str | None          why the kernels cannot run this validated LoraCall
    forward(call, seed) -> (y, u)        y [M, N] x.dtype, u [M, r] fp32 (None without LoRA)
    backward(g, x, u, weight, A, B, scaling, dropout_p, seed, needs_dx) -> (dx, dA, dB)

Each pass runs the strategy `strategy.choose` predicts fastest for its shapes ("gemv": decode.py,
"dequant-mm": mm.py, "fused": forward.py / backward.py) and records it (`strategy.report`).
`kernels.backends.TritonBackend` asks `reason` before choosing this backend, so the launchers check
nothing again. Every launch runs on the tensors' device (`device_of`), not on torch's current one:
with device_map="auto" a model spans several GPUs.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton.language as tl

from .. import backends, formats
from . import configs, decode, interpreting, mm, strategy
from .backward import GPU_CONFIGS as BACKWARD_CONFIGS
from .backward import fused_backward
from .forward import GPU_CONFIGS as FORWARD_CONFIGS
from .forward import fused_forward

ACT_DTYPES = (torch.float16, torch.bfloat16)
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128  # R = next_pow2(r) accumulators [BLOCK_M, R] fp32 live in registers: 128 is the cap

_smem: dict[int, int] = {}  # device index -> bytes of shared memory a block may use


def smem_limit(device: Optional[torch.device] = None) -> Optional[int]:
    """Shared memory per block (bytes) of `device` (default: the current CUDA device); None under the
    interpreter (no limit)."""
    if interpreting():
        return None
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _smem:
        from triton.runtime import driver

        _smem[index] = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    return _smem[index]


def reason(call) -> Optional[str]:
    """Why the Triton kernels cannot take this call (device and import are the backend's checks)."""
    x = call.x
    if x.dtype not in ACT_DTYPES:
        what = "fp32" if x.dtype == torch.float32 else str(x.dtype)
        return (f"{what} activations are not supported by the triton kernels (they take fp16 / bf16: "
                "run under torch.autocast(dtype=torch.bfloat16))")
    if call.A is not None:
        if call.A.dtype not in LORA_DTYPES:
            return f"LoRA weights in {call.A.dtype}: the triton kernels take fp16 / bf16 / fp32 ones"
        if not 1 <= call.r <= MAX_RANK:
            return f"LoRA rank r={call.r} is outside the triton kernels' range [1, {MAX_RANK}]"
    if call.bias is not None and call.bias.dtype not in LORA_DTYPES:
        return f"a {call.bias.dtype} bias: the triton kernels take fp16 / bf16 / fp32 ones"
    try:
        call.weight.kernel_args()
    except formats.Unsupported as e:
        return str(e)
    return None  # the gemv and dequant-mm strategies take every rank; "fused" only where it fits


@functools.lru_cache(maxsize=None)
def _some_config_fits(kernel: str, R: int, limit: Optional[int]) -> bool:
    cands = {"forward": FORWARD_CONFIGS, "backward": BACKWARD_CONFIGS}[kernel]
    return bool(configs.fitting(kernel, cands, R, limit))


def choose(pass_: str, M: int, weight, r: int, x: torch.Tensor, dropout_p: float, needs_dx: bool = True):
    """strategy.choose for this pass, "fused" excluded where none of its configs fits the device's
    shared memory at this rank (then the next fastest runs, and `why` says so)."""
    wa = weight.kernel_args()
    choice = strategy.choose(pass_, M, wa.N, wa.K, r, wa.fmt, x.element_size(), dropout_p > 0, needs_dx)
    if choice.strategy == "fused" and not _some_config_fits(pass_, configs.rank_block(max(r, 1)),
                                                             smem_limit(x.device)):
        rest = [t for t in choice.predicted_us if t[0] in strategy.AUTO[pass_]]
        choice = strategy.Choice(min(rest, key=lambda t: t[1])[0], "no fused config fits the shared memory at "
                                 f"rank {r}; fastest predicted of the others", choice.predicted_us)
    return choice


def forward(call, seed: Optional[torch.Tensor]):
    """(y [..., N] x.dtype, u [M, r] fp32 or None); seed: int64 [1] device tensor when dropout_p > 0."""
    x = call.x.reshape(-1, call.K)  # [M, K]: a view when x is contiguous
    if x.shape[1] > 1 and x.stride(1) != 1:  # rows may be strided, features may not
        x = x.contiguous()
    bias = None if call.bias is None else call.bias.contiguous()  # the kernels read bias as [N] contiguous
    wa = call.weight.kernel_args()
    M = x.shape[0]
    if M == 0:
        y, u = torch.empty((0, wa.N), dtype=x.dtype, device=x.device), torch.empty((0, call.r), device=x.device)
    else:
        choice = choose(strategy.FORWARD, M, call.weight, call.r, x, call.dropout_p)
        args = (bias, call.A, call.B, call.scaling, call.dropout_p, seed)
        with device_of(x):
            if choice.strategy == "gemv":
                y, u = decode.gemv_forward(x, call.weight, *args)
            elif choice.strategy == "dequant-mm":
                y, u = mm.mm_forward(x, call.weight, *args)
            else:
                y, u = fused_forward(x, wa, *args)
        backends.record(strategy.FORWARD, "triton", choice.strategy, choice.why,
                        (M, wa.N, wa.K, call.r, strategy.format_name(wa.fmt)), choice.predicted_us)
    return y.view(*call.x.shape[:-1], wa.N), (None if call.A is None else u)


def backward(g, x, u, weight, A, B, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
             needs_dx: bool = True):
    """(dx [..., K] x.dtype or None, dA [r, K] A.dtype, dB [N, r] B.dtype) for g = dL/dy [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    g = g.reshape(-1, g.shape[-1]).to(x.dtype).contiguous()  # [M, N]: read row by row in x.dtype
    u = None if u is None else u.contiguous()
    r = 0 if A is None else A.shape[0]
    wa = weight.kernel_args()
    M = x2.shape[0]
    choice = choose(strategy.BACKWARD, M, weight, r, x2, dropout_p, needs_dx)
    with device_of(x):
        if choice.strategy == "dequant-mm":
            dx, dA, dB = mm.mm_backward(g, x2, u, weight, A, B, scaling, dropout_p, seed, needs_dx)
        else:
            dx, dA, dB = fused_backward(g, x2, u, wa, A, B, scaling, dropout_p, seed, needs_dx)
    backends.record(strategy.BACKWARD, "triton", choice.strategy, choice.why,
                    (M, wa.N, wa.K, r, strategy.format_name(wa.fmt)), choice.predicted_us)
    return (None if dx is None else dx.view(x.shape)), dA, dB


# ---- helpers of the launchers ------------------------------------------------------------------

def device_of(t: torch.Tensor):
    """Enter t's CUDA device for a launch (Triton launches on the current device); a no-op elsewhere."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def tl_dtype(dt: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dt]


def format_constexprs(wa: formats.KernelArgs) -> dict:
    """The weight-format constexprs every fused kernel takes (tiles.load_w_tile)."""
    return dict(FMT=wa.fmt, NESTED=wa.nested, BLOCKSIZE=wa.blocksize, NESTED_BLOCKSIZE=wa.nested_blocksize,
                K_EVEN=wa.K % 2 == 0, ALIGNED=wa.fmt == formats.FMT_4BIT and wa.K % wa.blocksize == 0,
                W_DTYPE=tl_dtype(wa.w_dtype))


def dummy_if_none(dummy: torch.Tensor, *tensors):
    """Each tensor, or `dummy` in place of a None: a pointer the kernel never reads (a constexpr
    switches that code off), so the launch has the same argument list in every case."""
    return tuple(dummy if t is None else t for t in tensors)
