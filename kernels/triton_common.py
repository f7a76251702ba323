"""Host-side helpers shared by the Triton launchers: input checks and the generic weight arguments.

Every launcher checks its inputs here BEFORE anything is allocated or launched, so bad input gives
a clear error naming the problem and the fix (usually: backend="torch"), never a wrong answer or a
crash inside a kernel. `unsupported_reason` turns the same checks into the string that
`kernels.lora_linear(backend="auto")` prints when it falls back to the PyTorch reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16)
MAX_RANK = 128  # R = next_pow2(r) accumulators [BLOCK_M, R] fp32 live in registers: 128 is the cap
INT32_MAX = 2**31 - 1


class TritonInputError(ValueError):
    """Input the Triton LoRA ops do not accept (wrong shape, device, layout or dtype)."""


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1, tests without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def autotune_enabled() -> bool:
    """LORAFUSE_AUTOTUNE=0 keeps only each kernel's first config (GPU test runs: fewer compiles)."""
    return os.environ.get("LORAFUSE_AUTOTUNE", "1") != "0"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def gemm_configs(tiles: list[tuple[int, int, int, int, int]]) -> list:
    """One triton.Config per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), grouped by 8 rows."""
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=warps, num_stages=stages) for bm, bn, bk, warps, stages in tiles]


def active_configs(gpu_configs: list, interpreter_config=None) -> list:
    """What autotuning may pick: under the interpreter one small config (tuning is pure cost there;
    default: a 32x32x64 GEMM tile); on a GPU every config, or just the first with LORAFUSE_AUTOTUNE=0."""
    if interpreting():
        if interpreter_config is None:
            import triton

            interpreter_config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4},
                                               num_warps=4, num_stages=1)
        return [interpreter_config]
    return gpu_configs if autotune_enabled() else gpu_configs[:1]


def prune_tall_row_tiles(configs, named_args, **kwargs) -> list:
    """Autotune pruner: drop row tiles far taller than M (a 256-row tile for M=32 is wasted MMA work)."""
    cap = max(64, next_pow2(named_args["M"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs


def lora_rank_block(r: int) -> int:
    """R: the rank padded to a power of two >= 16 (tl.dot's smallest dimension)."""
    return max(16, next_pow2(r))


@dataclass(frozen=True)
class WeightArgs:
    """The generic weight arguments every fused kernel takes (see lora_tiles.load_w_tile).

    w: dense W | CB | packed bytes (flat); s1: SCB | absmax (fp32 or uint8 codes); code: 4-bit
    table; code2 / s2 / offset: nested absmax state. Unused tensors are dummies (never read).
    """

    N: int
    K: int
    w: torch.Tensor
    s1: torch.Tensor
    code: torch.Tensor
    code2: torch.Tensor
    s2: torch.Tensor
    offset: float
    stride_wn: int
    stride_wk: int
    fmt: int  # lora_tiles.FMT_*
    nested: bool = False
    bs: int = 64
    bs2: int = 256
    k_even: bool = True
    w_dtype: torch.dtype = torch.float32  # 4-bit: what bnb's dequantization rounds to

    def kernel_args(self) -> tuple:
        """Positional arguments, in load_w_tile's order (w_ptr ... stride_wk)."""
        return (self.w, self.s1, self.code, self.code2, self.s2, self.offset, self.stride_wn,
                self.stride_wk)

    def constexprs(self) -> dict:
        return dict(FMT=self.fmt, NESTED=self.nested, BS=self.bs, BS2=self.bs2,
                    K_EVEN=self.k_even, ALIGNED=self.fmt == 2 and self.K % self.bs == 0,
                    W_DTYPE=tl_dtype(self.w_dtype))


def tl_dtype(dt: torch.dtype):
    import triton.language as tl  # deferred: importing kernels must not import triton

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dt]


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise TritonInputError(f"{name} is on {t.device} but x is on {device}: move both to the same "
                               "device")


def check_activation(x: torch.Tensor, K: int) -> None:
    """x [M, K]: fp16/bf16, contiguous, on CUDA (or CPU under the interpreter)."""
    if not isinstance(x, torch.Tensor):
        raise TritonInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        raise TritonInputError(f"the Triton LoRA kernels need CUDA tensors, x is on {x.device} "
                               "(use backend='torch', or TRITON_INTERPRET=1 for the CPU interpreter)")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"the Triton LoRA kernels take fp16/bf16 activations, x is {x.dtype}: use "
                        "backend='torch', or run under torch.autocast(dtype=torch.bfloat16)")
    if x.dim() != 2:
        raise TritonInputError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}: flatten the "
                               "leading dimensions first (x.reshape(-1, K))")
    if x.shape[1] != K:
        raise TritonInputError(f"x has {x.shape[1]} features but the weight expects K={K} "
                               "(W is [out_features, in_features])")
    if x.shape[1] > 1 and x.stride(1) != 1:  # rows may be strided (a view); features may not
        raise TritonInputError(f"x must be contiguous along K (strides {x.stride()} for shape "
                               f"{tuple(x.shape)}): call x.contiguous() first")
    if x.shape[0] * max(x.stride(0), x.shape[1]) > INT32_MAX:
        raise TritonInputError(f"x {tuple(x.shape)} spans more than 2**31 elements; the kernels "
                               "index with int32: split the batch")


def check_out(name: str, t: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype,
              device: torch.device) -> None:
    """An optional caller-provided output buffer: exact shape and dtype, contiguous."""
    if t is not None and (tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device
                          or not t.is_contiguous()):
        raise TritonInputError(f"{name} must be a contiguous {dtype} {tuple(shape)} tensor on {device},"
                               f" got {t.dtype} {tuple(t.shape)} on {t.device}")


def check_lora(A: Optional[torch.Tensor], B: Optional[torch.Tensor], N: int, K: int,
               device: torch.device) -> int:
    """A [r, K], B [N, r] float tensors on x's device (or both None). Returns r (0 when None)."""
    if A is None and B is None:
        return 0
    if A is None or B is None:
        raise TritonInputError("lora_A and lora_B must be both given or both None")
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")
        check_device(name, t, device)
        if t.dim() != 2:
            raise TritonInputError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    r = A.shape[0]
    if tuple(A.shape) != (r, K) or tuple(B.shape) != (N, r):
        raise TritonInputError(f"LoRA shapes do not fit W [N={N}, K={K}]: lora_A {tuple(A.shape)} "
                               f"must be [r, {K}] and lora_B {tuple(B.shape)} must be [{N}, r]")
    if not 1 <= r <= MAX_RANK:
        raise TritonInputError(f"LoRA rank r={r} is outside the Triton kernels' range [1, {MAX_RANK}]"
                               " (register accumulators): use backend='torch'")
    return r


def check_bias(bias: Optional[torch.Tensor], N: int, device: torch.device) -> None:
    if bias is None:
        return
    check_device("bias", bias, device)
    if not torch.is_floating_point(bias) or bias.dim() != 1 or bias.shape[0] != N:
        raise TritonInputError(f"bias must be a float [N={N}] tensor, got {bias.dtype} "
                               f"{tuple(bias.shape)}")


def check_dropout(dropout_p: float, seed: Optional[int]) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise TritonInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and (seed is None or not 0 <= int(seed) < 2**63):
        raise TritonInputError(f"dropout_p={dropout_p} needs an int seed in [0, 2**63), got {seed}")


def check_grad(g: torch.Tensor, M: int, N: int, device: torch.device) -> None:
    check_device("grad_output", g, device)
    if tuple(g.shape) != (M, N):
        raise TritonInputError(f"grad_output must be [M={M}, N={N}], got {tuple(g.shape)}")
    if not torch.is_floating_point(g):
        raise TypeError(f"grad_output must be a float tensor, got {g.dtype}")
